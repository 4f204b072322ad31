"""dattri's attributors: influence functions (explicit Hessian, CG), TracIn and Grad-Dot.

dattri's ``AttributionTask`` takes ``loss_func(params, data)``; ours is the batch-mean of the
user's per-sample loss, evaluated with ``torch.func.functional_call`` on a fresh module whose
parameters dattri sets from the run's checkpoints. Every attributor returns an (N, Q) matrix of
``⟨T(∇l(z)), ∇l(v_q)⟩`` summed over its checkpoints with their weights, where T is the
identity (TracIn, Grad-Dot) or the inverse Hessian of the mean training loss (IF, its
``cache`` given one batch of all N samples). Signs are diffin's:

* influence functions: ``⟨∇l(v), (H + λI)⁻¹ ∇l(z)⟩`` is minus the derivative of the target
  under up-weighting z, so removing z (ε = −1/N) changes f by ``+(1/N)``× it:
  score = ``mean_q(·) / N``.
* TracIn: checkpoints closing each segment with weights ``Σ η`` over the segment (diffin's
  ``tracin``); score = ``mean_q(·) / N``.
* Grad-Dot: the final checkpoint with weight 1; score = ``mean_q ⟨∇l(v), ∇l(z)⟩ / N``, the
  first-order effect of removing z from one more full-batch step with unit learning rate: a
  ranking, not a prediction of the removal effect.

dattri allocates its score matrix with torch's default dtype; the adapter sets it to the run's
dtype while dattri runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from .._errors import ConfigError
from ._base import Peer, PeerInputs, default_dtype, take_options

_MODULES = ("dattri.task", "dattri.algorithm.influence_function", "dattri.algorithm.tracin")


def _task(inp: PeerInputs, steps: list[int]) -> Any:
    from dattri.task import AttributionTask

    model = inp.model_factory()

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        x, y, _ = inp.batched(x, y)
        return inp.mean_loss(functional_call(model, params, (x,)), y)

    def load(m: nn.Module, step: int) -> nn.Module:
        return inp.load_into(m, step)

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=list(steps),
                           checkpoints_load_func=load)


def _loaders(inp: PeerInputs, train_batch: int, target_batch: int) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(TensorDataset(*inp.train), batch_size=train_batch, shuffle=False),
            DataLoader(TensorDataset(*inp.target), batch_size=target_batch, shuffle=False))


class _DattriIF(Peer):
    package = "dattri"
    modules = _MODULES
    defaults: dict[str, Any] = {}

    def attributor(self, task: Any, opt: dict[str, Any]) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        opt = take_options(
            options,
            {"regularization": 0.0, "batch_size": 64, "train_batch_size": None,
             "hessian_samples": None, "seed": 0, **self.defaults},
            self.name,
        )
        n_params = sum(p.numel() for p in inp.model_factory().parameters() if p.requires_grad)
        if self.name == "dattri-if-explicit" and n_params > opt["max_params"]:
            raise ConfigError(
                f"dattri-if-explicit forms the dense {n_params}×{n_params} Hessian; raise "
                f"max_params (now {opt['max_params']}) if it fits in memory, or use dattri-if-cg"
            )
        task = _task(inp, [inp.final_step])
        hx, hy = inp.train
        m = opt["hessian_samples"]
        if m is not None and int(m) < inp.n_train:  # the Hessian of a random subset's mean loss
            g = torch.Generator().manual_seed(int(opt["seed"]))
            keep = torch.randperm(inp.n_train, generator=g)[: int(m)].sort().values
            hx, hy = hx[keep], hy[keep]
        with default_dtype(inp.dtype):
            att = self.attributor(task, opt)
            att.cache(DataLoader(TensorDataset(hx, hy), batch_size=len(hx), shuffle=False))
            # dattri transforms (inverts the Hessian on) every target batch once per train
            # batch: one train batch of all N samples by default does it once
            train_dl, target_dl = _loaders(inp, int(opt["train_batch_size"] or inp.n_train),
                                           int(opt["batch_size"]))
            raw = att.attribute(train_dl, target_dl)  # (N, Q)
        raw = raw.detach().double().numpy() / inp.n_train
        scores = raw if pairwise else raw.mean(axis=1)
        shown = {k: v for k, v in opt.items()
                 if k not in ("batch_size", "train_batch_size", "hessian_samples", "seed")}
        over = (f"a random subset of {len(hx)} of the N={inp.n_train} samples (seed {opt['seed']})"
                if len(hx) < inp.n_train else "all N samples")
        notes = (
            f"dattri {type(att).__name__}({shown}) at θ_T (step {inp.final_step}), Hessian of the "
            f"mean training loss over one batch of {over}; (N, Q) "
            f"{'' if pairwise else 'averaged over targets, '}divided by N"
        )
        return scores, notes


class DattriIFExplicit(_DattriIF):
    name = "dattri-if-explicit"
    summary = "dattri influence function, dense Hessian inverted explicitly, at θ_T"
    defaults = {"max_params": 5000}

    def attributor(self, task: Any, opt: dict[str, Any]) -> Any:
        from dattri.algorithm.influence_function import IFAttributorExplicit

        return IFAttributorExplicit(task, device="cpu", regularization=float(opt["regularization"]))


class DattriIFCG(_DattriIF):
    name = "dattri-if-cg"
    summary = "dattri influence function, conjugate gradient inverse-HVPs, at θ_T"
    defaults = {"max_iter": 10, "mode": "rev-rev"}  # dattri 0.3 ignores its CG ``tol``

    def attributor(self, task: Any, opt: dict[str, Any]) -> Any:
        from dattri.algorithm.influence_function import IFAttributorCG

        return IFAttributorCG(task, device="cpu", max_iter=int(opt["max_iter"]), mode=opt["mode"],
                              regularization=float(opt["regularization"]))


class _DattriTracInBase(Peer):
    package = "dattri"
    modules = _MODULES

    def steps_and_weights(self, inp: PeerInputs) -> tuple[list[int], list[float]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        from dattri.algorithm.tracin import TracInAttributor

        opt = take_options(options, {"proj_dim": None, "batch_size": 256, "train_batch_size": None,
                                     "seed": 0}, self.name)
        steps, weights = self.steps_and_weights(inp)
        task = _task(inp, steps)
        if opt["proj_dim"] is None:
            proj = {"proj_type": "identity", "proj_dim": -1}
        else:
            proj = {"proj_type": "normal", "proj_dim": int(opt["proj_dim"])}
        # dattri's TracInAttributor updates a module-level dict of projector defaults in
        # place, so every key is passed explicitly here
        proj.update({"proj_max_batch_size": 32, "proj_seed": int(opt["seed"]), "device": "cpu"})
        with default_dtype(inp.dtype):
            att = TracInAttributor(task, weight_list=torch.tensor(weights, dtype=torch.float64),
                                   normalized_grad=False, projector_kwargs=proj, device="cpu")
            # dattri recomputes the target gradients for every train batch: larger train
            # batches (train_batch_size) trade memory (batch × P) for fewer recomputations
            train_dl, target_dl = _loaders(inp, int(opt["train_batch_size"] or opt["batch_size"]),
                                           int(opt["batch_size"]))
            raw = att.attribute(train_dl, target_dl)  # (N, Q)
        raw = raw.detach().double().numpy() / inp.n_train
        scores = raw if pairwise else raw.mean(axis=1)
        notes = (
            f"dattri TracInAttributor(normalized_grad=False, projection {proj['proj_type']}"
            f"{'' if opt['proj_dim'] is None else ' dim ' + str(opt['proj_dim'])}) on checkpoints "
            f"{steps} with weights [{', '.join(f'{w:.4g}' for w in weights)}]; (N, Q) "
            f"{'' if pairwise else 'averaged over targets, '}divided by N"
        )
        return scores, notes


class DattriTracIn(_DattriTracInBase):
    name = "dattri-tracin"
    summary = "dattri TracIn: diffin's checkpoints and learning-rate sums"

    def steps_and_weights(self, inp: PeerInputs) -> tuple[list[int], list[float]]:
        ends = inp.segment_ends()
        return [c for c, _ in ends], [w for _, w in ends]


class DattriGradDot(_DattriTracInBase):
    name = "dattri-grad-dot"
    summary = "dattri Grad-Dot: ⟨∇f, ∇l(z)⟩ at θ_T (a ranking, not a removal effect)"
    units = "rank-only"

    def steps_and_weights(self, inp: PeerInputs) -> tuple[list[int], list[float]]:
        return [inp.final_step], [1.0]
