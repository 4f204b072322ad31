"""TRAK (``traker``), with checkpoints of the recorded run as its ensemble.

TRAK attributes a model *output* — for classifiers the margin
``log p_y − log Σ_{k≠y} p_k`` of each target example (``task="image_classification"``, which
suits any logits classifier with integer labels) — not the loss. Its score is
``φ(v)ᵀ (ΦᵀΦ + λI)⁻¹ φ(z) · Q(z)`` with φ randomly projected gradients of the margin and Q(z)
= 1 − p_y(z), averaged over the ensemble; traker rescales (ΦᵀΦ)⁻¹ by its mean absolute entry,
so the numbers have no unit. A positive score means z raises the target's margin, which lowers
its loss: the sign is diffin's (helpful = positive). The adapter averages over the target
examples and applies no other scaling: **compare TRAK with rank metrics only**.

On CPU traker uses its ``BasicProjector`` with a normal (Gaussian) projection: the fast
Rademacher ``CudaProjector`` needs the CUDA-only ``fast_jl`` extension.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from .._errors import ConfigError
from ._base import Peer, PeerInputs, take_options

_DEFAULTS: dict[str, Any] = {
    "proj_dim": 1024,
    "checkpoints": None,
    "n_checkpoints": None,
    "task": "image_classification",
    "lambda_reg": 0.0,
    "batch_size": 256,
    "seed": 0,
}


class TRAK(Peer):
    name = "trak"
    package = "trak"
    modules = ("trak.traker",)
    summary = "TRAK (traker): projected margin gradients, checkpoints of the run as the ensemble"
    units = "rank-only"

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        from trak import TRAKer

        opt = take_options(options, _DEFAULTS, self.name)
        steps = _ensemble_steps(inp, opt["checkpoints"], opt["n_checkpoints"])
        model = inp.model_factory()
        for p in model.parameters():
            p.requires_grad_(False)
        grad_wrt = list(inp.run.trainable)
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(grad_wrt))
        if int(opt["proj_dim"]) >= min(inp.n_train, n_params) and not opt["lambda_reg"]:
            warnings.warn(
                f"trak: proj_dim={opt['proj_dim']} >= min(N={inp.n_train}, P={n_params}) makes ΦᵀΦ "
                "singular; pass lambda_reg > 0 or a smaller proj_dim",
                stacklevel=2,
            )
        traker = TRAKer(
            model=model, task=opt["task"], train_set_size=inp.n_train, save_dir=workdir,
            load_from_save_dir=True, device="cpu", proj_dim=int(opt["proj_dim"]),
            use_half_precision=False, projector_seed=int(opt["seed"]), grad_wrt=grad_wrt,
            lambda_reg=float(opt["lambda_reg"]), logging_level=logging.WARNING,
        )
        bs = int(opt["batch_size"])
        x, y = inp.train
        for mid, step in enumerate(steps):
            traker.load_checkpoint(inp.state_dict(step), model_id=mid)
            for s in range(0, inp.n_train, bs):
                traker.featurize(batch=(x[s : s + bs], y[s : s + bs]), num_samples=len(x[s : s + bs]))
        traker.finalize_features()
        # traker frees its BasicProjector's matrix in finalize_features and regenerates it only
        # when the model id changes: with one checkpoint and proj_dim <= 100 scoring would hit
        # the freed matrix. An id that matches no model makes it regenerate (seeded by id).
        traker.projector.model_id = -1
        xt, yt = inp.target
        for mid, step in enumerate(steps):
            traker.start_scoring_checkpoint(exp_name="target", checkpoint=inp.state_dict(step),
                                            model_id=mid, num_targets=inp.n_target)
            for s in range(0, inp.n_target, bs):
                traker.score(batch=(xt[s : s + bs], yt[s : s + bs]), num_samples=len(xt[s : s + bs]))
        raw = np.asarray(traker.finalize_scores(exp_name="target"), dtype=np.float64)  # (N, Q)
        scores = raw if pairwise else raw.mean(axis=1)
        notes = (
            f"traker TRAKer(task={opt['task']!r}, proj_dim={opt['proj_dim']}, BasicProjector normal, "
            f"float32, lambda_reg={opt['lambda_reg']}), ensemble = checkpoints {steps}; "
            "scores (N, Q) averaged over targets, no rescaling: NOT loss units, compare ranks only"
        )
        return scores, notes


def _ensemble_steps(inp: PeerInputs, steps: Any, n_last: Any) -> list[int]:
    ends = [c for c, _ in inp.segment_ends()]
    if steps is not None:
        chosen = [int(s) for s in steps]
        bad = [s for s in chosen if s not in inp.run.checkpoint_steps]
        if bad:
            raise ConfigError(f"trak: no checkpoints at steps {bad}; have {inp.run.checkpoint_steps}")
        return chosen
    if n_last is not None:
        return ends[-int(n_last) :]
    return ends
