"""Configuration dataclasses shared by the Python API and the command line.

Every field carries its help text in ``metadata["help"]``; :mod:`diffin.cli` builds its options
from these fields, and every output folder stores the config it was made with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ._errors import ConfigError

T = TypeVar("T")


def config_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (``metadata["help"]``), read by the CLI and the docs.

    Extra keywords go into the metadata too (e.g. ``choices=(...)``)."""
    return field(default=default, metadata={"help": help, **kw})


CONVENTIONS = ("keep", "renormalize")
PREDICTS = ("replay", "retrain")


@dataclass
class ScoreConfig:
    """How to score every training sample against a target."""

    method: str = config_field(
        "diffin",
        "estimator name (see `diffin methods`); 'diffin' picks the best Diff-In variant the run allows",
    )
    hvp: str = config_field(
        "auto",
        "Hessian-vector products: 'central' / 'forward' finite differences of gradients, 'exact' "
        "autograd, or 'auto' (central, unless the model has kinks such as ReLU or max-pool, where "
        "finite differences jump: then exact)",
        choices=("auto", "central", "forward", "exact"),
    )
    fd_eps: float | None = config_field(
        None, "finite-difference step; default: machine-eps^(1/3) (central) times max(1, |theta|)"
    )
    dots: str = config_field(
        "auto",
        "per-sample gradient inner products: 'jvp' (forward-mode, exact), 'fd' (from the losses at "
        "theta +- eps v, free with central differences) or 'auto' (fd with central, else jvp)",
        choices=("auto", "jvp", "fd"),
    )
    convention: str = config_field(
        "keep",
        "removal convention: 'keep' (weight 0, batch divisor stays) or 'renormalize' (divide by |B|-1)",
        choices=CONVENTIONS,
    )
    batch_size: int = config_field(4096, "samples per chunk when streaming over the training or target data")
    proxy_batch_size: int | None = config_field(
        None,
        "proxy batch size for diffin-expected / closed form (default: the recorded batch size, else 128)",
    )
    proxy_batches: int | None = config_field(
        None,
        "proxy batches per checkpoint: diffin-expected cycles through them (default: a fresh one "
        "every step); the closed form averages them (default: 1)",
    )
    first_order: bool = config_field(
        False, "closed form only: add the first-order (TracIn-CP) term to the paper's formula"
    )
    closed_form_checkpoints: int | None = config_field(
        None,
        "closed form only: use m evenly spaced recorded checkpoints (the last always among them) "
        "instead of every checkpoint after step 0 (default); more than the run has uses them all",
    )
    replay_memory_mb: float = config_field(
        1024.0, "memory for replayed parameter states per segment (diffin-exact); beyond it, replay twice"
    )
    damping: float = config_field(
        1e-3,
        "influence functions: damping added to the Hessian (beside the weight decay); raised "
        "automatically until H + damping*I is positive definite when the Hessian is indefinite "
        "(the damping used is in the diagnostics)",
    )
    cg_iters: int = config_field(100, "influence functions (CG): maximum conjugate-gradient iterations")
    cg_tol: float = config_field(1e-8, "influence functions (CG): relative residual tolerance")
    lissa_depth: int = config_field(1000, "influence functions (LiSSA): recursion depth")
    lissa_scale: float | None = config_field(
        None, "influence functions (LiSSA): scale (default: 2 x the largest Hessian eigenvalue)"
    )
    lissa_batch_size: int = config_field(128, "influence functions (LiSSA): samples per stochastic HVP")
    pairwise: bool = config_field(False, "return an N x Q matrix, one column per target example")
    predicts: str = config_field(
        "replay",
        "the question the scores answer: 'replay' (this run replayed without the sample: same "
        "initialisation, same batch order) or 'retrain' (a fresh retraining without it: new batch "
        "order; average several recorded runs for a new initialisation). Selects the variant "
        "'diffin' runs",
        choices=PREDICTS,
    )
    credit_every: int | None = config_field(
        None, "diffin-retrain: pay the expected credit every this many steps (default: once per checkpoint)"
    )
    removal_fraction: float = config_field(
        0.0, "diffin-retrain: the fraction of the training set the decision removes (e.g. 0.9 to keep a tenth); the "
        "sweep then linearises around the run in which every sample has weight 1 - removal_fraction, the expected "
        "run of such a subset (docs/method.md §4.4); 0: an infinitesimal removal, around the recorded run")
    horizon: int | None = config_field(
        None, "diffin-exact / diffin-frozen: carry influence back over the last this many steps only (a "
        "sample's contributions before step T - horizon count 0); None: the whole run. For unstable runs "
        "(docs/guides/trust.md)"
    )
    check_removals: int = config_field(
        0, "after scoring, replay the removal of this many samples with the largest |score| for real and "
        "compare (diagnostics['trust']['removal_error']; 0: off). Costs one replay of training"
    )
    seed: int = config_field(0, "seed for proxy batches and any other randomness of the estimator")
    resume_every_steps: int = config_field(
        500,
        "with an output folder: save the sweep's state (into OUT/.resume) at the first segment boundary "
        "after this many steps since the last save, so a killed scoring continues with resume=True "
        "(--resume); 0: never by steps",
    )
    resume_every_minutes: float = config_field(
        10.0, "as resume_every_steps, after this many minutes since the last save; 0: never by time"
    )
    device: str | None = config_field(
        None,
        "where to score: 'cpu', 'cuda', 'cuda:1', ...; diffin moves a copy of the model and every batch "
        "there (the module passed in stays where it is); default: the model's own device",
    )

    def __post_init__(self) -> None:
        if self.hvp not in ("auto", "central", "forward", "exact"):
            raise ConfigError(f"hvp must be 'auto', 'central', 'forward' or 'exact', got {self.hvp!r}")
        if self.dots not in ("auto", "jvp", "fd"):
            raise ConfigError(f"dots must be 'auto', 'jvp' or 'fd', got {self.dots!r}")
        if self.predicts not in PREDICTS:
            raise ConfigError(f"predicts must be one of {PREDICTS}, got {self.predicts!r}")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if not 0 <= self.removal_fraction < 1:
            raise ConfigError(f"removal_fraction must be in [0, 1), got {self.removal_fraction}")
        if self.fd_eps is not None and not self.fd_eps > 0:
            raise ConfigError(f"fd_eps must be > 0, got {self.fd_eps}")
        for name in ("batch_size", "cg_iters", "lissa_depth", "lissa_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("proxy_batch_size", "proxy_batches", "credit_every", "closed_form_checkpoints", "horizon"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.replay_memory_mb <= 0:
            raise ConfigError("replay_memory_mb must be > 0")
        if self.damping < 0:
            raise ConfigError("damping must be >= 0")
        if isinstance(self.check_removals, bool) or int(self.check_removals) < 0:
            raise ConfigError(f"check_removals must be an int >= 0 (0: no check), got {self.check_removals!r}")
        if int(self.resume_every_steps) < 0 or not self.resume_every_minutes >= 0:
            raise ConfigError(
                "resume_every_steps and resume_every_minutes must be >= 0 (0 turns that criterion off), got "
                f"{self.resume_every_steps} and {self.resume_every_minutes}"
            )
        if self.device is not None:
            if not isinstance(self.device, str):
                raise ConfigError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}")
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(
                    f"device must be a torch device string such as 'cpu', 'cuda' or 'cuda:1', got "
                    f"{self.device!r} ({e})"
                ) from None

    def replace(self, **changes: Any) -> ScoreConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_kwargs(cls: type[T], base: T | None = None, **kwargs: Any) -> T:
    """Build ``cls`` from keyword options, refusing unknown names with the valid ones listed."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(names)}"
        )
    if base is None:
        return cls(**kwargs)
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
