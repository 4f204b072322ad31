"""Shared plumbing of the data-centric tasks: inputs, output folders keyed by what made them,
cached pieces, the retraining recipe.

A task runs either on a built-in setup (recorded into ``OUT/run`` on first use, reused
afterwards) or on the user's own recorded run, model, loss and data (:class:`TaskInputs`).

Every output folder holds ``config.json``: the task's key, made of the task config, the run's
identity (:attr:`diffin.Run.fingerprint`), content hashes of the train / validation / test data,
the built-in setup and its label noise, and the retraining recipe where the task retrains. A
re-run whose key differs is refused (:class:`~diffin._errors.OutputExistsError`) before anything
in the folder is touched, or, with ``overwrite``, starts afresh. Each cached piece (scores,
replays, retrains) carries its own key and is reused only when that key matches, so an
interrupted task resumes where it stopped and never reuses a result made from other inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _tree
from .._api import score
from .._data import fingerprint
from .._errors import ConfigError, DiffinError, OutputExistsError, RecipeError
from .._functional import FlatModel, LossFn
from .._io import write_json, write_npy, write_text
from ..bench.builtin.trainer import TrainConfig
from ..bench.builtin.trainer import evaluate as evaluate_builtin
from ..bench.builtin.trainer import train as train_builtin
from ..config import ScoreConfig
from ..recording.run import Run, load_run
from ..trajectory import Trajectory

if TYPE_CHECKING:
    from ..bench.builtin.setups import Setup

TASK_JSON = "config.json"
BUILDING = ".diffin_setup_building.json"
"""Marker beside a built-in run while it is being recorded (holds the setup's meta)."""


@dataclass
class TaskInputs:
    """Everything a task needs about one recorded training run.

    ``model_factory`` builds a fresh module of the architecture (values come from the run);
    ``train``/``val``/``test`` are ``(inputs, targets)`` pairs (``val``/``test`` optional), inputs a
    tensor or a tuple/list/dict of tensors (docs/method.md §4.7);
    ``flipped`` marks training ids known to be corrupted (wrong labels, mismatched image–text
    pairs: ``noise_kind`` says which) for detection metrics.

    ``evaluate(model, x, y, loss_fn=, params=) -> {"loss", "accuracy"}`` measures retrained models
    (default: :func:`diffin.bench.builtin.trainer.evaluate`, classification accuracy; an image–text setup
    gives zero-shot accuracy). ``pair_scores(model, inputs, params=None) -> (N,)``: for image–text
    pairs, the CLIP score (cosine of each pair under the model), the baseline ``clip-score``;
    ``texts``: the training captions, shown in reports.

    Retraining (pruning, cleanlab's out-of-fold models) uses :meth:`recipe`: ``train_config`` when
    given (a built-in setup's recipe), else the recipe recorded in the run; ``train_overrides``
    (TrainConfig fields the user gave explicitly, e.g. ``{"epochs": 1, "lr": 0.001}``) on top.

    ``setup``: for a built-in setup, the run at ``run`` is recorded from it on first use, after
    the task has checked its output folder (:meth:`ensure_run`); ``None`` for a user's run.
    """

    run: Path
    model_factory: Callable[[], nn.Module]
    loss_fn: LossFn
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None = None
    test: tuple[Tensor, Tensor] | None = None
    flipped: np.ndarray | None = None
    clean_labels: Tensor | None = None
    train_config: TrainConfig | None = None
    description: str = "user run"
    sizes: dict[str, int] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    setup: Setup | None = None
    evaluate: Callable[..., dict[str, float]] = evaluate_builtin
    pair_scores: Callable[..., Any] | None = None
    texts: list[str] | None = None
    noise_kind: str = "training labels flipped"

    def __post_init__(self) -> None:
        self.run = Path(self.run)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train_overrides) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown} in train_overrides; valid: {sorted(names)}")

    @property
    def n_train(self) -> int:
        return _tree.batch_len(self.train[0])

    @property
    def pairs(self) -> bool:
        """Image–text pairs (a CLIP score is defined)."""
        return self.pair_scores is not None

    @property
    def labels(self) -> np.ndarray:
        return self.train[1].detach().cpu().numpy()

    def setup_meta(self) -> dict[str, Any] | None:
        """What identifies the built-in setup (name, noise, recipe); ``None`` for a user's run."""
        from ..bench.builtin.setups import setup_meta

        return None if self.setup is None else setup_meta(self.setup)

    def data_fingerprints(self) -> dict[str, str]:
        """Content hashes of the train, validation and test data."""
        return {"train": fingerprint(self.train), "val": fingerprint(self.val), "test": fingerprint(self.test)}

    def run_state(self) -> str:
        """``"ready"`` (a user's run, or a built-in run recorded from ``setup``), ``"missing"``
        (not recorded yet, or an interrupted recording of this setup) or ``"other"`` (the folder
        holds something else). Reads only."""
        from ..bench.builtin.setups import read_setup_meta, setup_meta

        if self.setup is None:
            return "ready"
        if not self.run.exists() or (self.run.is_dir() and not any(self.run.iterdir())):
            return "missing"
        marker = self.run / BUILDING
        if marker.exists():
            try:
                same = json.loads(marker.read_text(encoding="utf-8")) == self.setup_meta()
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                same = False
            return "missing" if same else "other"
        try:
            recorded = read_setup_meta(self.run)
            load_run(self.run)
        except DiffinError:
            return "other"
        return "ready" if recorded is not None and setup_meta(recorded) == self.setup_meta() else "other"

    def ensure_run(self, overwrite: bool = False, progress: bool = False) -> Run:
        """The recorded run; a built-in setup's run is recorded into ``run`` when missing (or,
        with ``overwrite``, when the folder holds another run)."""
        state = self.run_state()
        if state == "other" and not overwrite:
            raise OutputExistsError(
                f"{self.run} holds another run than the one of setup {self.setup.name!r} "  # type: ignore[union-attr]
                f"(noise {self.setup.noise:g}); choose another output folder or overwrite it"  # type: ignore[union-attr]
            )
        if state != "ready":
            from ..bench.builtin.setups import write_setup_meta

            setup = self.setup
            assert setup is not None  # "missing"/"other" only arise for built-in setups
            data = setup.data()
            write_json(self.run / BUILDING, self.setup_meta())
            train_builtin(setup.model(data), data.x_train, data.y_train, setup.train, self.run,
                          loss=setup.loss_fn, overwrite=True, progress=progress)
            write_setup_meta(self.run, setup)
            (self.run / BUILDING).unlink()
        return load_run(self.run)

    def recipe(self, run: Run | None = None) -> Recipe:
        """The effective retraining recipe (see the class docstring and :class:`Recipe`)."""
        over = dict(self.train_overrides)
        if self.train_config is not None:
            base, lrs, source = self.train_config, None, "built-in setup recipe"
        else:
            base, lrs, source = recorded_recipe(run or load_run(self.run), self.n_train, over)
        if "lr" in over or "schedule" in over:
            lrs = None
        try:
            cfg = dataclasses.replace(base, **over)
        except TypeError as e:
            raise ConfigError(f"bad train_overrides {over}: {e}") from e
        return Recipe(cfg, None if lrs is None else tuple(float(v) for v in lrs), source, over)


@dataclass(frozen=True)
class Recipe:
    """How retrains are trained: a :class:`TrainConfig` and, for a recorded schedule, the per-step
    learning rates it follows by training progress (:func:`diffin.bench.builtin.trainer.step_lrs`)."""

    config: TrainConfig
    lrs: tuple[float, ...] | None
    source: str
    overrides: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        lrs = None
        if self.lrs is not None:
            arr = np.asarray(self.lrs, dtype=np.float64)
            lrs = {"steps": int(arr.size), "min": float(arr.min()), "max": float(arr.max()),
                   "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
        return {"source": self.source, "train": self.config.to_json(), "lrs": lrs,
                "overrides": dict(sorted(self.overrides.items()))}

    def describe(self) -> str:
        """One line, e.g. ``SGD lr 0.02, momentum 0.9, batch 32, 5 epochs (recorded run)``."""
        c = self.config
        lr = (f"lr {min(self.lrs):.3g}–{max(self.lrs):.3g} (recorded per-step schedule)"
              if self.lrs is not None else f"lr {c.lr:g}" + (" cosine" if c.schedule == "cosine" else ""))
        parts = [f"{ {'sgd': 'SGD', 'adam': 'Adam', 'adamw': 'AdamW'}[c.optimizer]} {lr}"]
        if c.optimizer != "sgd":
            parts.append(f"betas ({c.beta1:g}, {c.beta2:g})")
        if c.clip_grad_norm is not None:
            parts.append(f"gradient norm clipped at {c.clip_grad_norm:g}")
        if c.momentum:
            parts.append(f"momentum {c.momentum:g}" + (" (Nesterov)" if c.nesterov else ""))
        if c.weight_decay:
            parts.append(f"weight decay {c.weight_decay:g}")
        parts += [f"batch {c.batch_size}", f"{c.epochs} epoch{'s' if c.epochs != 1 else ''}"]
        extra = f"; overrides: {', '.join(f'{k} {v}' for k, v in sorted(self.overrides.items()))}" \
            if self.overrides else ""
        return ", ".join(parts) + f" ({self.source}{extra})"

    def train(self, model: nn.Module, x: Tensor, y: Tensor, run_dir: Path, keep: np.ndarray, seed: int,
              loss_fn: LossFn) -> None:
        """Train ``model`` in place on the rows ``keep`` of (x, y), recording into ``run_dir``."""
        train_builtin(model, x, y, dataclasses.replace(self.config, seed=seed), run_dir, keep=keep,
                      loss=loss_fn, lrs=self.lrs, overwrite=True)


def recorded_recipe(run: Run, n_train: int, overrides: dict[str, Any]) -> tuple[TrainConfig, np.ndarray | None, str]:
    """The recipe a user's run was recorded with: optimizer (``Run.optimizer``), the per-step
    learning rates ``Run.lrs`` (``None`` when constant: then ``lr`` holds the rate), batch size
    (``Run.batch_size_hint()``) and epochs (steps × batch size / N, rounded).

    Raises :class:`RecipeError` naming the overrides to give when the run does not say."""
    spec = run.optimizer
    source = "recorded run"
    opt: dict[str, Any] = {}
    if spec.is_sgd:
        opt = {"momentum": spec.momentum, "dampening": spec.dampening, "nesterov": spec.nesterov,
               "weight_decay": spec.weight_decay}
        if spec.assumed:
            source = "recorded run; optimizer not recorded, plain SGD assumed"
    elif spec.kind in ("Adam", "AdamW") and spec.groups:
        opt, source = _adam_recipe(run, overrides)
    elif "lr" not in overrides:
        raise RecipeError(
            f"the run at {run.path} was recorded with {spec.kind} (maximize={spec.maximize}, uniform param "
            f"groups={spec.uniform_groups}), which the built-in trainer (torch.optim.SGD) cannot reproduce; "
            "give the SGD recipe to retrain with explicitly: train_overrides lr and, as needed, momentum, "
            "weight_decay, batch_size, epochs (command line: --lr, --momentum, --weight-decay, "
            "--batch-size, --epochs)"
        )
    else:
        source = f"recorded run ({spec.kind} replaced by SGD with the given overrides)"
    bs = overrides.get("batch_size") or run.batch_size_hint()
    if bs is None:
        raise RecipeError(
            f"the run at {run.path} recorded no batch ids, so its batch size is unknown; give "
            "train_overrides batch_size (and epochs) (command line: --batch-size, --epochs)"
        )
    n = run.n_train_recorded or n_train
    epochs = int(overrides.get("epochs") or max(1, round(run.n_steps * int(bs) / n)))
    lrs = np.asarray(run.lrs, dtype=np.float64)
    if lrs.size == 0 or not lrs.max() > 0:
        raise RecipeError(f"the run at {run.path} recorded no positive learning rate; give train_overrides lr")
    constant = bool(np.all(lrs == lrs[0]))
    seed = run.manifest.get("seed")
    if run.clip_grad_norm is not None:
        opt.setdefault("clip_grad_norm", float(run.clip_grad_norm))
    cfg = TrainConfig(epochs=epochs, batch_size=int(bs), lr=float(lrs[0] if constant else lrs.max()),
                      checkpoint_every=0, seed=seed if isinstance(seed, int) else 0, **opt)
    return cfg, None if constant else lrs, source


def _adam_recipe(run: Run, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The built-in trainer's Adam/AdamW options for a recorded Adam/AdamW run: betas and ε of
    its groups (which must agree), and its weight decay on every parameter or, when the groups
    decay differently, on the ≥ 2-dimensional ones only (the trainer's two-group recipe)."""
    hyper = [g["hyper"] for g in run.optimizer.groups]
    h0 = hyper[0]
    if any(h.get("amsgrad") or h.get("maximize") for h in hyper):
        raise RecipeError(f"the run at {run.path} used amsgrad or maximize, which the built-in trainer does "
                          "not reproduce; give the recipe explicitly (train_overrides optimizer, lr, ...)")
    for key in ("beta1", "beta2", "eps"):
        if len({h.get(key) for h in hyper}) > 1:
            raise RecipeError(f"the run's parameter groups use different {key}; the built-in trainer uses one "
                              "value: give it in train_overrides (command line: --" + key + ")")
    if "lr" not in overrides and not np.all(run.group_lrs == run.group_lrs[:, :1]):
        raise RecipeError("the run's parameter groups had different learning rates; the built-in trainer "
                          "uses one: give train_overrides lr (command line: --lr)")
    wds = [float(h.get("weight_decay", 0.0)) for h in hyper]
    decoupled = run.optimizer.kind == "AdamW" or bool(h0.get("decoupled_weight_decay"))
    opt = {"optimizer": "adamw" if decoupled else "adam", "beta1": float(h0.get("beta1", 0.9)),
           "beta2": float(h0.get("beta2", 0.999)), "eps": float(h0.get("eps", 1e-8)),
           "weight_decay": max(wds), "weight_decay_on": "all" if len(set(wds)) == 1 else "weights"}
    note = "" if len(set(wds)) == 1 else "; weight decay on ≥2-d parameters only, as the groups differed"
    return opt, f"recorded run ({run.optimizer.kind}{note})"


def builtin_inputs(setup_name: str, noise: float | None, out: str | os.PathLike[str],
                   train_overrides: dict[str, Any] | None = None, seed: int | None = None) -> TaskInputs:
    """:class:`TaskInputs` of a built-in setup whose run lives in ``out/run``.

    ``seed``: train with this seed (initialisation and batch order) instead of the setup's; the
    corrupted samples stay those of the setup's noise seed (or of its own training seed).

    Nothing is written here: the task records the run there on first use, after checking its
    output folder (:meth:`TaskInputs.ensure_run`)."""
    from ..bench.builtin import get_setup

    setup = get_setup(setup_name)
    if noise is not None:
        setup = setup.with_changes(noise=noise)
    if seed is not None and seed != setup.train.seed:
        keep = setup.train.seed if setup.noise_seed is None else setup.noise_seed
        setup = setup.with_changes(train=dataclasses.replace(setup.train, seed=seed), noise_seed=keep)
    data = setup.data()
    captions = getattr(data, "captions", None)
    return TaskInputs(
        run=Path(out) / "run",
        model_factory=lambda: setup.model(data),
        loss_fn=setup.loss_fn,
        train=(data.x_train, data.y_train),
        val=(data.x_val, data.y_val) if len(data.y_val) else None,
        test=(data.x_test, data.y_test) if len(data.y_test) else None,
        flipped=data.flipped if setup.noise else None,
        clean_labels=data.y_train_clean,
        train_config=setup.train,
        description=setup.description + (f"; {setup.noise:.0%} of {setup.noise_kind}" if setup.noise else ""),
        sizes=data.sizes(),
        train_overrides=dict(train_overrides or {}),
        setup=setup,
        evaluate=setup.evaluate,
        pair_scores=setup.pair_scores,
        texts=captions() if callable(captions) else None,
        noise_kind=setup.noise_kind,
    )


# ---------------------------------------------------------------------- output folders
@dataclass
class TaskState:
    """A task's checked output folder (``None``: nothing is saved), its run and its key."""

    out: Path | None
    run: Run
    key: dict[str, Any]
    trust: dict[str, Any] = field(default_factory=dict)
    """``diagnostics["trust"]`` of each scoring done for the task, by method (``-self`` appended for
    self-influence); shown in the task's report."""

    @property
    def run_id(self) -> str:
        return self.run.fingerprint

    @property
    def data(self) -> dict[str, str]:
        return self.key["data"]


def prepare_task(inp: TaskInputs, task: str, config: Any, out: str | os.PathLike[str] | None,
                 overwrite: bool, progress: bool = False, recipe: Recipe | None = None) -> TaskState:
    """Check ``out`` against the task's key, then (only then) write to it.

    Same key: resume (cached pieces are reused). Other key: :class:`OutputExistsError` naming
    what differs, without touching anything, unless ``overwrite`` (then ``out`` is emptied, a
    built-in run that still matches its setup kept). A built-in setup's run is recorded after
    the check."""
    key = canonical({"task": task, "config": dataclasses.asdict(config), "setup": inp.setup_meta(),
                     "data": inp.data_fingerprints(), "recipe": None if recipe is None else recipe.to_json()})
    state = inp.run_state()
    key["run"] = load_run(inp.run).fingerprint if state == "ready" else None
    outp = None if out is None else Path(out)
    if outp is not None and (outp / TASK_JSON).exists():
        try:
            old = json.loads((outp / TASK_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = {"unreadable": True}
        if old != key:
            if not overwrite:
                raise OutputExistsError(
                    f"{outp} holds {task} results made from other inputs ({_diff(old, key)}); choose "
                    "another folder or overwrite them"
                )
            _empty(outp, keep=inp.run if state == "ready" else None)
    run = inp.ensure_run(overwrite=overwrite, progress=progress)
    key["run"] = run.fingerprint
    if outp is not None:
        outp.mkdir(parents=True, exist_ok=True)
        write_json(outp / TASK_JSON, key)
    return TaskState(outp, run, key)


def _empty(out: Path, keep: Path | None) -> None:
    """Remove everything in ``out`` except the folder holding ``keep`` (and a user's run)."""
    keep_r = None if keep is None else keep.resolve()
    for child in out.iterdir():
        c = child.resolve()
        if keep_r is not None and (c == keep_r or c in keep_r.parents):
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _diff(old: Any, new: Any, path: str = "") -> str:
    """What differs between two keys, e.g. ``setup.noise: 0.1 -> 0.2; data.train changed``."""
    out: list[str] = []

    def walk(a: Any, b: Any, p: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if a.get(k) != b.get(k):
                    walk(a.get(k), b.get(k), f"{p}.{k}" if p else str(k))
        elif p == "run" or (isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64):
            out.append(f"{p} changed" if b is not None else f"{p} missing or replaced")
        else:
            out.append(f"{p}: {_short(a)} -> {_short(b)}")

    walk(old, new, path)
    more = f"; and {len(out) - 6} more" if len(out) > 6 else ""
    return "; ".join(out[:6]) + more


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, numpy scalars → numbers), so that a
    key compares equal to its saved copy."""
    return json.loads(json.dumps(obj, default=_json_scalar))


def _json_scalar(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_piece(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A saved piece (JSON with ``"key"``) when its key equals ``key``, else ``None``."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("key") == key else None


def cached_score(inp: TaskInputs, state: TaskState, method: str, target: Any, progress: bool,
                 tag: str | None = None, **options: Any) -> np.ndarray:
    """Scores (N,) by ``method`` against ``target`` (validation data or ``"self"``), reusing
    ``out/scores-<method>[-self][-<tag>]`` (``tag``: one of several targets of one method) only
    when it was made from the same run, data and config."""
    cfg = ScoreConfig(method=method, **options)
    self_target = isinstance(target, str)
    key = canonical({"run": state.run_id, "train": state.data["train"],
                     "target": target if self_target else fingerprint(target), "config": cfg.to_json()})
    label = f"{method}{'-self' if self_target else ''}" + (f"-{tag}" if tag else "")
    folder = None if state.out is None else state.out / f"scores-{label}"
    if folder is not None:
        meta = load_piece(folder / "scores.json", key)
        if meta is not None and (folder / "scores.npy").exists():
            arr = np.load(folder / "scores.npy", allow_pickle=False)
            if arr.shape == (inp.n_train,):
                state.trust[label] = (meta.get("diagnostics") or {}).get("trust")
                return arr
        (folder / "scores.json").unlink(missing_ok=True)
    res = score(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=target, config=cfg,
                progress=progress)
    state.trust[label] = res.diagnostics.get("trust")
    if folder is not None:
        write_npy(folder / "scores.npy", res.scores)
        write_json(folder / "scores.json", {**res.to_json(), "key": key})
    return res.scores


def theta_final(inp: TaskInputs, run: Run | None = None) -> tuple[FlatModel, Tensor, Run]:
    """The functional model and θ_T of the run (buffers installed)."""
    run = run or load_run(inp.run)
    fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
    return fm, Trajectory(run, fm).theta(run.n_steps), run


@torch.no_grad()
def losses_at(fm: FlatModel, theta: Tensor, data: tuple[Any, Tensor], chunk: int = 2048) -> np.ndarray:
    """Per-sample losses (N,) at θ, float64, in chunks of ``chunk`` rows. For a batch-coupled loss
    (docs/method.md §4.7) each sample's share ℓ_i = B·∂L/∂ω_i at ω = 1 within its chunk as one
    batch (its own loss terms and its part in its chunk mates' denominators)."""
    x, y = data
    n = _tree.batch_len(x)
    return torch.cat([fm.losses(theta, _tree.index(x, slice(s, s + chunk)), y[s : s + chunk])
                      for s in range(0, n, chunk)]).double().numpy()


def pair_scores_at(inp: TaskInputs, run: Run | None = None) -> np.ndarray:
    """CLIP score (N,) float64 of every training pair under θ_T of the run (cosine of image and
    caption; low = suspicious); a named error for a setup that is not image–text pairs."""
    if inp.pair_scores is None:
        raise ConfigError("clip-score needs image-text pairs (a setup such as mnist-captions, or TaskInputs "
                          "pair_scores=); choose another method")
    fm, theta, _ = theta_final(inp, run)
    return np.asarray(inp.pair_scores(fm.model, inp.train[0], fm.unflatten(theta)), dtype=np.float64)


def fraction_count(n: int, fraction: float | None, count: int | None, what: str) -> int:
    """How many samples a fraction (0, 1] or a count means; named errors for bad values."""
    if count is not None:
        if not 1 <= count <= n:
            raise ConfigError(f"{what} count must be in [1, {n}], got {count}")
        return int(count)
    if fraction is None or not 0 < fraction <= 1:
        raise ConfigError(f"{what} fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * n)))


def read_ids(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Id groups from a file: one group per line (ids separated by commas or spaces), or a
    .npy array of ids (one group)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"ids file {p} does not exist")
    if p.suffix == ".npy":
        return [np.load(p, allow_pickle=False).astype(np.int64).reshape(-1)]
    groups = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            groups.append(np.array([int(t) for t in line.replace(",", " ").split()], dtype=np.int64))
        except ValueError as e:
            raise ConfigError(f"{p}:{i}: not a list of integer ids ({e})") from e
    if not groups:
        raise ConfigError(f"{p} holds no ids")
    return groups


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A CSV file from string cells (atomically)."""
    write_text(path, "\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")


def retrain_cached(inp: TaskInputs, state: TaskState, recipe: Recipe, tag: str, keep_ids: np.ndarray, seed: int,
                   measure: Callable[[nn.Module], dict[str, Any]], measure_key: Any) -> dict[str, Any]:
    """Train a fresh model from scratch on the rows ``keep_ids`` (repeats allowed: an upsampled
    row is seen that many times per epoch) with ``recipe`` and ``seed``; return ``measure(model)``.
    Reuses ``out/retrains/<tag>_seed<seed>.json`` only when it was made by the same recipe, run,
    data, rows, seed and ``measure_key`` (what the measurement reads, e.g. the evaluation data's
    fingerprint)."""
    keep_ids = np.asarray(keep_ids, dtype=np.int64)
    key = canonical({"recipe": recipe.to_json(), "run": state.run_id, "train": state.data["train"],
                     "eval": measure_key, "seed": seed, "n_kept": int(keep_ids.size),
                     "kept_sha256": hashlib.sha256(keep_ids.tobytes()).hexdigest()})
    path = None if state.out is None else state.out / "retrains" / f"{tag}_seed{seed}.json"
    saved = None if path is None else load_piece(path, key)
    if saved is not None:
        return saved["result"]
    model = inp.model_factory()
    with tempfile.TemporaryDirectory() as tmp:
        recipe.train(model, *inp.train, Path(tmp) / "run", keep_ids, seed, inp.loss_fn)
    res = measure(model)
    if path is not None:
        write_json(path, {"key": key, "result": res})
    return res


def add_trust(rep: Any, trust: dict[str, Any]) -> None:
    """A report section with each scoring's trust measures (``ScoreResult.diagnostics["trust"]``,
    docs/guides/trust.md): stable or not, adjoint growth, score scale and the reasons."""
    rows = []
    for name, t in trust.items():
        if not t:
            continue
        growth, scale = t.get("adjoint_growth"), t.get("score_scale")
        rows.append([name, "yes" if t.get("stable", True) else "**no**",
                     "–" if growth is None else f"{growth:.3g}", "–" if scale is None else f"{scale:.3g}",
                     "; ".join(t.get("reasons") or []) or "–"])
    if not rows:
        return
    rep.heading("Can these scores be trusted?")
    rep.text("Measures of the linearisation's health on this run (docs/guides/trust.md): the adjoint's growth over "
             "the sweep (limit 100) and the largest |score| over the target's own size (limit 1).")
    rep.table(["scores", "stable", "adjoint growth", "score scale", "reasons"], rows)
