"""kronfluence's influence functions with K-FAC and EK-FAC curvature, at the final parameters.

kronfluence fits Kronecker factors of the Fisher of the *mean* training loss (its covariances
are divided by the number of examples seen) on the ``nn.Linear`` / ``nn.Conv2d`` modules, and
returns pairwise scores ``s(v, z) = ∇m(v; θ_T)ᵀ (F̂ + λI)⁻¹ ∇l(z; θ_T)`` with the measurement m
the query's loss. Up-weighting z by ε changes θ_T by ``−ε (F̂ + λI)⁻¹ ∇l(z)``, so a positive
score means that z lowers the query loss: kronfluence's sign is diffin's (helpful = positive).
Removing z is ε = −1/N: diffin's score is ``mean_q s(v_q, z) / N``.

The Task sums the per-sample losses over the batch (what kronfluence expects) and, for the true
Fisher (kronfluence's default, ``use_empirical_fisher=False``), samples targets from the
model's predictive distribution: a categorical over the last dimension of the outputs for
integer targets, unless ``sample_fn(outputs) -> targets`` is given.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from .._errors import ConfigError
from ._base import Peer, PeerInputs, take_options

_DEFAULTS: dict[str, Any] = {
    "damping_factor": "kronfluence-default",
    "use_empirical_fisher": False,
    "sample_fn": None,
    "batch_size": 256,
    "query_batch_size": 256,
    "dtype": None,
    "seed": 0,
}


def _make_task(inp: PeerInputs, sample_fn: Any) -> Any:
    from kronfluence.task import Task

    loss_fn = inp.loss_fn

    class _DiffinTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            out = model(x)
            if sample:
                with torch.no_grad():
                    y = sample_fn(out.detach()) if sample_fn is not None else _sample_categorical(out, y)
            return loss_fn(out, y).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return loss_fn(model(x), y).sum()

    return _DiffinTask()


def _sample_categorical(out: Tensor, y: Tensor) -> Tensor:
    if y.is_floating_point() or out.ndim != 2:
        raise ConfigError(
            "kronfluence's true Fisher samples targets from the model's outputs; diffin samples a "
            "categorical over the logits for integer class targets only. Pass sample_fn=... or "
            "use_empirical_fisher=True"
        )
    return torch.multinomial(torch.softmax(out.double(), dim=-1), 1).squeeze(1).to(y.dtype)


class _KronfluenceIF(Peer):
    package = "kronfluence"
    modules = ("kronfluence.task",)
    strategy: str = ""

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model

        opt = take_options(options, _DEFAULTS, self.name)
        dt = opt["dtype"] or inp.dtype
        torch.manual_seed(opt["seed"])
        task = _make_task(inp, opt["sample_fn"])
        model = inp.model_at(inp.final_step)
        untracked = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
                     if not isinstance(m, (nn.Linear, nn.Conv2d))
                     for pn, p in m.named_parameters(recurse=False) if p.requires_grad]
        model = prepare_model(model, task)
        analyzer = Analyzer("diffin", model, task, cpu=True, disable_tqdm=True, output_dir=workdir,
                            log_level=40)
        factor_args = FactorArguments(
            strategy=self.strategy, use_empirical_fisher=bool(opt["use_empirical_fisher"]),
            activation_covariance_dtype=dt, gradient_covariance_dtype=dt, lambda_dtype=dt,
            per_sample_gradient_dtype=dt, eigendecomposition_dtype=torch.float64,
        )
        score_kw: dict[str, Any] = {
            "per_sample_gradient_dtype": dt, "precondition_dtype": dt, "score_dtype": dt,
        }
        if opt["damping_factor"] != "kronfluence-default":
            score_kw["damping_factor"] = opt["damping_factor"]
        score_args = ScoreArguments(**score_kw)
        train = TensorDataset(*inp.train)
        analyzer.fit_all_factors("factors", train, per_device_batch_size=opt["batch_size"],
                                 factor_args=factor_args, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            "scores", "factors", TensorDataset(*inp.target), train,
            per_device_query_batch_size=opt["query_batch_size"],
            per_device_train_batch_size=opt["batch_size"], score_args=score_args,
            overwrite_output_dir=True,
        )
        raw = analyzer.load_pairwise_scores("scores")["all_modules"]  # (Q, N)
        raw = raw.double().numpy() / inp.n_train
        scores = raw.T if pairwise else raw.mean(axis=0)
        notes = (
            f"kronfluence {self.strategy} at θ_T (step {inp.final_step}), "
            f"{'empirical' if opt['use_empirical_fisher'] else 'true (sampled)'} Fisher, "
            f"damping_factor={score_args.damping_factor} (None = 0.1 × mean eigenvalue), dtype {dt}; "
            "pairwise scores (Q, N) averaged over queries, divided by N; tracks nn.Linear/nn.Conv2d only"
            + (f" (ignored: {untracked})" if untracked else "")
        )
        return scores, notes


class KronfluenceEKFAC(_KronfluenceIF):
    name = "kronfluence-ekfac"
    summary = "kronfluence influence function, EK-FAC curvature, at θ_T"
    strategy = "ekfac"


class KronfluenceKFAC(_KronfluenceIF):
    name = "kronfluence-kfac"
    summary = "kronfluence influence function, K-FAC curvature, at θ_T"
    strategy = "kfac"
