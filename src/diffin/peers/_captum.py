"""captum's TracIn (``captum.influence.TracInCP`` and ``TracInCPFast``).

Checkpoints and learning rates follow diffin's ``tracin``: for each segment c_k < c_{k+1}
between recorded checkpoints, captum loads θ_{c_{k+1}} and our ``checkpoints_load_func``
returns ``Σ_{t=c_k}^{c_{k+1}−1} η_t`` as that checkpoint's learning rate. captum then returns,
with ``aggregate=True``, ``Σ_c lr_c Σ_q ⟨∇l(v_q; θ_c), ∇l(z; θ_c)⟩`` for every training sample
z; diffin's TracIn-CP score is that divided by Q (mean over the target set) and by N (each
sample is seen ``steps·|B|/N`` times per segment, each step weighing it ``η/|B|``). The sign is
already diffin's: a proponent (positive) is helpful.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .._errors import ConfigError
from ._base import Peer, PeerInputs, default_dtype, take_options


class _CaptumLoss(nn.Module):
    """``loss_fn`` with the ``reduction`` attribute captum checks: ``"sum"`` sums the per-sample
    losses over the batch, ``"none"`` returns them as they are."""

    def __init__(self, loss_fn: Any, reduction: str) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = reduction

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        losses = self.loss_fn(out, y)
        return losses.sum() if self.reduction == "sum" else losses


def _checkpoint_loader(inp: PeerInputs) -> tuple[list[int], Any]:
    ends = inp.segment_ends()
    lr_sum = dict(ends)

    def load(model: nn.Module, step: int) -> float:
        inp.load_into(model, step)
        return lr_sum[step]

    return [c for c, _ in ends], load


class CaptumTracInCP(Peer):
    name = "captum-tracincp"
    package = "captum"
    modules = ("captum.influence",)
    summary = "captum TracInCP: all parameters, diffin's checkpoints and learning-rate sums"

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        from captum.influence import TracInCP

        opt = take_options(options, {"batch_size": 256, "sample_wise_grads_per_batch": None},
                           self.name)
        steps, load = _checkpoint_loader(inp)
        model = inp.model_factory()
        fast = opt["sample_wise_grads_per_batch"]
        if fast is None:  # captum's batched per-sample gradients cover Linear and Conv2d only
            fast = all(isinstance(m, (nn.Linear, nn.Conv2d))
                       for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
        loss = _CaptumLoss(inp.loss_fn, "sum" if fast else "none")
        with default_dtype(inp.dtype):
            tracin = TracInCP(
                model, TensorDataset(*inp.train), steps, checkpoints_load_func=load,
                loss_fn=loss, batch_size=opt["batch_size"], sample_wise_grads_per_batch=fast,
            )
            raw = tracin.influence(inp.target, aggregate=not pairwise)  # (1, N) or (Q, N)
        raw = raw.detach().double().numpy()
        scores = raw.T / inp.n_train if pairwise else raw.reshape(-1) / (inp.n_target * inp.n_train)
        how = ("influence(target, aggregate=False) (Q, N), transposed, divided by N" if pairwise else
               "influence(target, aggregate=True) summed over the Q targets, divided by Q·N")
        notes = (
            f"captum TracInCP on checkpoints {steps} with lr = Σ η over each segment; {how}; "
            f"sample_wise_grads_per_batch={fast}"
        )
        return scores, notes


class CaptumTracInCPFast(Peer):
    name = "captum-tracincp-fast"
    package = "captum"
    modules = ("captum.influence",)
    summary = "captum TracInCPFast: gradients of the final linear layer only"

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        from captum.influence import TracInCPFast

        opt = take_options(options, {"batch_size": 256, "final_fc_layer": None}, self.name)
        steps, load = _checkpoint_loader(inp)
        model = inp.model_factory()
        layer = opt["final_fc_layer"] or _last_linear(model)
        with default_dtype(inp.dtype):
            tracin = TracInCPFast(
                model, layer, TensorDataset(*inp.train), steps, checkpoints_load_func=load,
                loss_fn=_CaptumLoss(inp.loss_fn, "sum"), batch_size=opt["batch_size"],
            )
            raw = tracin.influence(inp.target)  # (Q, N)
        raw = raw.detach().double().numpy() / inp.n_train
        scores = raw.T if pairwise else raw.mean(axis=0)
        notes = (
            f"captum TracInCPFast, final layer {layer!r} only (weight, bias excluded by captum), "
            f"checkpoints {steps} with lr = Σ η over each segment; mean over targets, divided by N. "
            "Loss units but a last-layer truncation of TracIn-CP"
        )
        return scores, notes


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("captum-tracincp-fast needs an nn.Linear final layer; pass final_fc_layer=")
    return names[-1]
