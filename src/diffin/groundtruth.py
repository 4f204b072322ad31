"""Ground truth by replayed removal (docs/method.md §3), and LDS subsets.

Retrain from the recorded θ_0 (and optimizer state) with the recorded batch sequence, learning
rates and optimizer (every parameter group's settings; each run's own gradient clipped when the
run clipped), through :class:`diffin.trajectory.Trajectory`, with a sample
(or a group S) removed from every batch under the ``keep`` or ``renormalize`` convention, and
report ``f(θ_T^{−S}) − f(θ_T)``, where θ_T is the replay with nothing removed (computed side by
side with the same arithmetic, so replay rounding cancels). In float64 this is the exact
trajectory-specific leave-S-out effect, with no retraining noise.

Removal runs are trained side by side: K parameter vectors advance together, one vmapped
weighted-gradient evaluation per step (``torch.func.vmap`` over parameter copies with the batch
shared), in groups sized to a memory budget.

Ground truth by retraining (:func:`retrain_truth`, docs/method.md §3.1): the same recorded
recipe (steps, per-step batch sizes, learning rates, optimizer, clipping) retrained with a fresh
batch order (``reshuffle``) or a fresh θ_0 and order (``reseed``), K seeds per subset, each
seed's full-data run and subset runs sharing its order and θ_0 (common random numbers).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._data import DataSource, check_id_groups
from ._errors import ConfigError, DataMismatchError, ReinitError
from ._functional import FlatModel, LossFn, check_convention
from ._progress import progress_bar
from ._side_by_side import expand_state, removal_weights, replay_states
from ._train_mode import eval_mode as _eval_mode
from ._tree import nbytes, tree_map
from .config import CONVENTIONS
from .recording.run import Run, load_run
from .targets import make_target
from .trajectory import Trajectory, check_rule


def _as_groups(remove: Any, n_train: int) -> list[np.ndarray]:
    """One id → one removal; a list of ids → one removal each; a list of groups → each group."""
    if isinstance(remove, (int, np.integer)):
        groups: list[Any] = [[int(remove)]]
    else:
        items = list(remove)
        groups = [[int(i)] for i in items] if all(isinstance(i, (int, np.integer)) for i in items) else items
    return check_id_groups(groups, n_train, what="removal group", allow_empty=True)


def replay_removal(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    remove: int | Sequence[int] | Sequence[Sequence[int]] = (),
    convention: str = "keep",
    pairwise: bool = False,
    progress: bool = True,
    memory_mb: float = 1024.0,
    return_thetas: bool = False,
) -> np.ndarray | tuple[np.ndarray, Tensor, Tensor]:
    """Replayed-removal effects ``f(θ_T^{−S}) − f(θ_T)`` for each removal set S.

    Args:
        remove: one id, a list of ids (one removal each), or a list of id groups.
        convention: ``"keep"`` (removed samples get weight 0; the divisor |B| stays) or
            ``"renormalize"`` (divide by the number of samples left; a batch left empty is
            skipped).
        pairwise: one column per target example.
        memory_mb: budget for the parameter copies trained side by side.
        return_thetas: also return the replayed full-run θ_T (P,) and the removal θ's (K, P).

    Returns: (K,) or (K, Q) array in the model's dtype (loss units); with ``target="self"``,
    the change of the summed own losses of each group.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    if not run_obj.has_batch_ids:
        raise DataMismatchError("replayed removal needs the batch ids of every step; record them")
    check_rule(run_obj)  # a named error for optimizers without a rule
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    check_convention(convention, fm.coupled)
    src = DataSource(train, fm.dtype, fm.device)
    run_obj.check_ids(len(src))
    groups = _as_groups(remove, len(src))
    tgt = make_target(target, src, fm, pairwise=pairwise, self_chunk=run_obj.batch_size_hint())
    traj = Trajectory(run_obj, fm, src)
    with _eval_mode(model), torch.no_grad():
        full, finals = replay_states(traj, groups, convention, memory_mb, progress=progress)
        theta_full, thetas = full.theta, finals.theta
        base = _values(tgt, fm, theta_full, full.stats)
        at = [_values(tgt, fm, th, None if finals.stats is None else finals.stats[k]) for k, th in enumerate(thetas)]
        if tgt.kind == "self":
            vals = torch.stack([v[g].sum() - base[g].sum() for v, g in zip(at, groups)])
        else:
            vals = torch.stack([v - base for v in at]) if at else base[None, :0]
            if tgt.kind == "mean":
                vals = vals[:, 0]
    out = vals.cpu().numpy()
    if return_thetas:
        return out, theta_full, thetas
    return out


def _values(tgt: Any, fm: FlatModel, theta: Tensor, stats: Tensor | None) -> Tensor:
    """f at θ, with the running statistics ``stats`` (R,) installed for the eval-mode target when
    the model has train-mode BatchNorm (docs/method.md §4.8)."""
    if stats is not None:
        fm.set_constants(fm.unflat_stats(stats))
    return tgt.values(fm, theta)


def replay_many(
    traj: Trajectory, groups: list[np.ndarray], convention: str, memory_mb: float = 1024.0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Train the full run and one run per removal group from θ_0; returns θ_T (P,), (K, P)
    (:func:`replay_states` has their running statistics too)."""
    full, finals = replay_states(traj, groups, convention, memory_mb, progress)
    return full.theta, finals.theta


def _per_run_rows(v: Any, n_orders: int, where: Tensor) -> Any:
    """(U·B, ...) rows of U orders' batches (every leaf of the inputs) → (R, B, ...), run r's from
    order ``where[r]``."""
    return tree_map(lambda a: a.reshape(n_orders, -1, *a.shape[1:])[where], v)


def lds_subsets(n_train: int, n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random training subsets for the linear datamodeling score: (S, N) bool, True = kept.

    Each subset keeps exactly ``round(fraction · N)`` samples.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"LDS subset fraction must be in (0, 1), got {fraction}")
    if n_subsets < 2:
        raise ConfigError("LDS needs at least 2 subsets")
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def lds_ground_truth(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    masks: np.ndarray,
    pairwise: bool = False,
    progress: bool = True,
    memory_mb: float = 1024.0,
) -> np.ndarray:
    """``f(θ_T trained on the kept subset) − f(θ_T)`` for each LDS subset (rows of ``masks``),
    by replay with the complement removed under the ``keep`` convention: (S,) or (S, Q)."""
    removed = [np.flatnonzero(~m) for m in np.asarray(masks, dtype=bool)]
    return replay_removal(run, model, loss_fn, train=train, target=target, remove=removed,
                          convention="keep", pairwise=pairwise, progress=progress, memory_mb=memory_mb)


# ---------------------------------------------------------------------- ground truth by retraining
TRUTH_MODES = ("replay", "reshuffle", "reseed")


@dataclass
class RetrainTruth:
    """Targets of models retrained on LDS subsets, K seeds each (docs/method.md §3.1).

    Attributes:
        mode: one of :data:`TRUTH_MODES`.
        masks: (S, N) bool, True = kept.
        values: (S, K) or (S, K, Q) float64, loss units: ``f(θ_T^{s,k}) − f(θ_T^{full,k})``, the
            target of the model trained on subset s with seed k minus that of the full-data run
            with the same seed (same batch order and θ_0: common random numbers).
        full: (K,) or (K, Q) float64: ``f(θ_T^{full,k})``.
        seeds: (K,) int64: the seed of each retraining (``-1`` for ``replay``, which draws nothing).
    """

    mode: str
    masks: np.ndarray
    values: np.ndarray
    full: np.ndarray
    seeds: np.ndarray

    def mean(self) -> np.ndarray:
        """The mean change over the K seeds, (S,) or (S, Q): the LDS target."""
        return self.values.mean(axis=1)

    def noise_ceiling(self, n_splits: int = 50, seed: int = 0) -> float:
        """Split-half reliability of the K-seed mean across subsets.

        For each of ``n_splits`` random splits of the seeds into two halves, the Spearman
        correlation r (across the S subsets) of the two halves' means, corrected to K seeds by
        Spearman–Brown, 2r/(1 + r); averaged over splits (and over target columns for (S, K, Q)
        values). ``nan`` when K < 2 or every correlation is undefined.
        """
        from .metrics import spearman

        vals = self.values if self.values.ndim == 3 else self.values[:, :, None]
        S, K, Q = vals.shape
        if K < 2 or S < 2:
            return float("nan")
        rng = np.random.default_rng(seed)
        out: list[float] = []
        for _ in range(n_splits):
            perm = rng.permutation(K)
            a, b = perm[: K // 2], perm[K // 2 :]
            ma, mb = vals[:, a].mean(axis=1), vals[:, b].mean(axis=1)
            for q in range(Q):
                r = spearman(ma[:, q], mb[:, q])
                if np.isfinite(r) and r > -1:
                    out.append(2 * r / (1 + r))
        return float(np.mean(out)) if out else float("nan")


def truth_seeds(seed: int, n_seeds: int) -> np.ndarray:
    """The seeds of the K retrainings, (K,) int64: seed k is drawn from ``(seed, k)`` (so the
    first K of K + 1 seeds are the K seeds)."""
    return np.array([int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) for k in range(n_seeds)],
                    dtype=np.int64)


def step_plan(run: Run, n_train: int, batch_size: int | None = None) -> tuple[np.ndarray, list[int]]:
    """The population of a fresh batch order and the size of each step's batch.

    With batch ids: the ids that appear in the recording and the recorded step sizes (the union
    of the micro-batches under accumulation). Without: ``range(n_train)`` and ``batch_size`` (or
    the recorded hint) at every step; :class:`DataMismatchError` when neither is known.
    """
    if run.has_batch_ids:
        batches = [run.batch(t) for t in range(run.n_steps)]
        sizes = [len(b) for b in batches]
        population = np.unique(np.concatenate(batches)) if batches else np.zeros(0, dtype=np.int64)
    else:
        bs = batch_size or run.batch_size_hint()
        if bs is None:
            raise DataMismatchError(
                f"the run at {run.path} recorded no batch ids, so the size of its batches is unknown; pass "
                "batch_size= (the training loop's batch size) to retrain it with fresh batch orders"
            )
        sizes = [int(bs)] * run.n_steps
        population = np.arange(n_train)
    too_big = [b for b in sizes if b > len(population)]
    if too_big:
        raise DataMismatchError(
            f"a step of {too_big[0]} samples is larger than the {len(population)} samples a fresh order draws "
            "from; pass the training loop's batch size as batch_size="
        )
    return population.astype(np.int64), sizes


def fresh_order(population: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """A fresh batch order: one id array per step, of the given sizes.

    A permutation of ``population`` (drawn by ``np.random.default_rng(seed)``) is cut into
    consecutive batches; when what is left of it is smaller than the next step's size, a new
    permutation is drawn (the rest is dropped). For an ordinary loop this gives epochs: every id
    once per epoch, with or without ``drop_last``.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(population)
    pos = 0
    out = []
    for b in sizes:
        if len(perm) - pos < b:
            perm = rng.permutation(population)
            pos = 0
        out.append(perm[pos : pos + b])
        pos += b
    return out


def fresh_theta0(model: nn.Module, trainable: Sequence[str], seed: int,
                 init: Callable[[int], nn.Module] | None = None) -> Tensor:
    """A freshly initialised θ_0 (P,) in ``model``'s dtype and device, the trainable parameters
    flattened in order (as :class:`diffin._functional.FlatModel` does).

    ``init=None``: a deep copy of ``model`` whose modules with ``reset_parameters`` are reset
    under ``torch.manual_seed(seed)`` (the global RNG is left as it was); raises
    :class:`ReinitError` when a trainable parameter belongs to no such module. ``init``: a
    callable ``seed -> nn.Module`` returning a freshly initialised model of the same
    architecture (names and shapes are checked).
    """
    named0 = dict(model.named_parameters())
    first = named0[trainable[0]] if trainable else next(iter(named0.values()))
    dtype, device = first.dtype, first.device
    devices = []  # CUDA generators forked besides the CPU one
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        if init is None:
            fresh = copy.deepcopy(model)
            covered: set[str] = set()
            resettable = []
            for prefix, mod in fresh.named_modules():
                if callable(getattr(mod, "reset_parameters", None)):
                    resettable.append(mod)
                    covered |= {f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters(recurse=False)}
            missing = [n for n in trainable if n not in covered]
            if missing:
                raise ReinitError(
                    f"trainable parameters {missing[:5]} belong to no module with reset_parameters(), so a "
                    "fresh initialisation cannot be drawn; pass init=lambda seed: <a freshly initialised "
                    "model of the same architecture> (or use mode='reshuffle', which keeps the recorded θ_0)"
                )
            for mod in resettable:
                mod.reset_parameters()
        else:
            fresh = init(int(seed))
            if not isinstance(fresh, nn.Module):
                raise ReinitError(f"init(seed) must return an nn.Module, got {type(fresh).__name__}")
    named = dict(fresh.named_parameters())
    wrong = [n for n in trainable if n not in named or tuple(named[n].shape) != tuple(named0[n].shape)]
    if wrong:
        got = {n: tuple(named[n].shape) for n in wrong if n in named}
        raise ReinitError(
            f"init(seed) returned a model whose parameters {wrong[:5]} are missing or shaped differently "
            f"({got}) from the recorded model's; return a freshly initialised model of the same architecture"
        )
    return torch.cat([named[n].detach().reshape(-1) for n in trainable]).to(dtype=dtype, device=device)


def retrain_truth(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    masks: np.ndarray,
    mode: str = "reseed",
    n_seeds: int = 10,
    seed: int = 0,
    init: Callable[[int], nn.Module] | None = None,
    convention: str = "keep",
    pairwise: bool = False,
    progress: bool = True,
    memory_mb: float = 1024.0,
    batch_size: int | None = None,
) -> RetrainTruth:
    """Retrain the recorded recipe on each LDS subset (rows of ``masks``) with K seeds.

    Args:
        masks: (S, N) bool, True = kept; the removed ids get ``convention`` in every batch.
        mode: ``"replay"`` (recorded θ_0 and batches; K = 1, equal to :func:`lds_ground_truth`
            for ``keep``), ``"reshuffle"`` (recorded θ_0 and optimizer state, a fresh batch order
            per seed) or ``"reseed"`` (a fresh θ_0 and a fresh order per seed).
        n_seeds: K for the retraining modes.
        seed: seed k of the K retrainings is :func:`truth_seeds` ``(seed, K)[k]``: it draws the
            order (:func:`fresh_order`) and θ_0 (:func:`fresh_theta0`).
        init: ``seed -> nn.Module``, a fresh model of the same architecture (``reseed`` only;
            default: ``reset_parameters()`` of a copy of ``model``).
        memory_mb: budget of the runs trained side by side (parameters, optimizer state,
            gradients and each run's gathered batch).
        batch_size: step size of a run recorded without batch ids.

    Every retraining runs the recorded number of steps with the recorded per-step batch sizes,
    learning rates, optimizer rule and clipping (:class:`diffin.trajectory.Trajectory`); seed k's
    full-data run and subset runs share its order and θ_0. Returns a :class:`RetrainTruth`
    whose ``values`` are (S, K) (mean target) or (S, K, Q) (``pairwise``), float64.
    """
    if mode not in TRUTH_MODES:
        raise ConfigError(f"mode must be one of {TRUTH_MODES}, got {mode!r}")
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, (int, np.integer)) or n_seeds < 1:
        raise ConfigError(f"n_seeds must be a positive int, got {n_seeds!r}")
    if init is not None and mode != "reseed":
        raise ConfigError(f"init= draws a fresh θ_0, which only mode='reseed' uses (mode is {mode!r})")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    check_rule(run_obj)
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    check_convention(convention, fm.coupled)
    src = DataSource(train, fm.dtype, fm.device)
    N = len(src)
    if run_obj.has_batch_ids:
        run_obj.check_ids(N)
    m = np.asarray(masks)
    if m.ndim != 2 or m.shape[1] != N or m.shape[0] < 1:
        raise ConfigError(f"masks must be (S, {N}) (one row per subset, True = kept), got shape {m.shape}")
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise ConfigError("masks must be boolean (True = sample kept in that subset)")
        m = m.astype(bool)
    tgt = make_target(target, src, fm, pairwise=pairwise, self_chunk=run_obj.batch_size_hint())
    if tgt.kind == "self":
        raise ConfigError("retrain_truth needs a fixed target (a validation set or test examples), not 'self'")
    traj = Trajectory(run_obj, fm, src)
    with _eval_mode(model), torch.no_grad():
        if mode == "replay":
            if not run_obj.has_batch_ids:
                raise DataMismatchError("replayed removal needs the batch ids of every step; record them, "
                                        "or use mode='reshuffle' / 'reseed'")
            groups = [np.flatnonzero(~row) for row in m]
            st_full, st_sub = replay_states(traj, groups, convention, memory_mb, progress=progress)
            full = _target_values(tgt, fm, st_full.theta[None], None if st_full.stats is None else st_full.stats[None])
            sub = _target_values(tgt, fm, st_sub.theta, st_sub.stats)  # (S, Q)
            vals = (sub - full)[:, None, :]  # (S, 1, Q)
            seeds = np.array([-1], dtype=np.int64)
        else:
            seeds = truth_seeds(seed, int(n_seeds))
            vals, full = _retrain_many(traj, tgt, m, mode, seeds, init, model, convention, memory_mb,
                                       progress, batch_size)
    if tgt.kind == "mean":
        vals, full = vals[..., 0], full[..., 0]
    return RetrainTruth(mode=mode, masks=m, values=vals, full=full, seeds=seeds)


def _target_values(tgt: Any, fm: FlatModel, thetas: Tensor, stats: Tensor | None = None) -> np.ndarray:
    """f at each row of ``thetas`` (R, P) (with the running statistics of row r, ``stats`` (R, ·))
    → (R, Q) float64."""
    return np.stack([_values(tgt, fm, th, None if stats is None else stats[r]).double().cpu().numpy()
                     for r, th in enumerate(thetas)]) if len(thetas) else np.zeros((0, tgt.size), dtype=np.float64)


def _retrain_many(
    traj: Trajectory, tgt: Any, masks: np.ndarray, mode: str, seeds: np.ndarray,
    init: Callable[[int], nn.Module] | None, model: nn.Module, convention: str, memory_mb: float,
    progress: bool, batch_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train the K·(S + 1) runs (seed k: its full-data run, then one per subset) side by side in
    groups sized to ``memory_mb``; returns values (S, K, Q) and full (K, Q), float64."""
    run, fm, src = traj.run, traj.fm, traj.train
    assert src is not None
    S, N = masks.shape
    K = len(seeds)
    population, sizes = step_plan(run, N, batch_size)
    orders = [fresh_order(population, sizes, int(s)) for s in seeds]
    start = traj.state(0)  # installs checkpoint 0's buffers and frozen parameters
    if mode == "reseed":
        theta0 = torch.stack([fresh_theta0(model, fm.spec.names, int(s), init) for s in seeds])  # (K, P)
    else:
        theta0 = start.theta.expand(K, -1)
    removed = np.concatenate([np.zeros((1, N), dtype=bool), ~masks])  # row 0: the full-data run
    # width: parameters, new parameters, gradient and optimizer state per run, plus its gathered batch
    x1, y1 = src.get(population[:1])
    row_bytes = nbytes(x1) + nbytes(y1)
    P = fm.num_params
    per_run = P * start.theta.element_size() * (3 + len(traj.rule.state_keys)) + 2 * max(sizes, default=0) * row_bytes
    width = max(1, int(memory_mb * 2**20 // max(per_run, 1)))
    runs = [(k, r) for k in range(K) for r in range(S + 1)]  # (seed, row of ``removed``)
    n_chunks = -(-len(runs) // width)
    bar = progress_bar(run.n_steps * n_chunks, f"retrain ({mode})", progress, unit="step")
    F = np.zeros((K, S + 1, tgt.size), dtype=np.float64)
    for c in range(n_chunks):
        chunk = runs[c * width : (c + 1) * width]
        ks = np.array([k for k, _ in chunk])
        rows = np.array([r for _, r in chunk])
        uniq, where = np.unique(ks, return_inverse=True)
        where_t = torch.as_tensor(where, dtype=torch.long, device=fm.device)
        state = expand_state(start, len(chunk), theta0[torch.as_tensor(ks, device=theta0.device)].clone())
        rem = removed[rows]  # (R, N)
        for t in range(run.n_steps):
            ids = np.stack([orders[k][t] for k in uniq])  # (U, B)
            xs, ys = src.get(ids.reshape(-1))
            xs, ys = (_per_run_rows(v, len(uniq), where_t) for v in (xs, ys))
            keep = torch.as_tensor(~np.take_along_axis(rem, ids[where], axis=1), dtype=state.theta.dtype,
                                   device=fm.device)  # (R, B)
            state, _ = traj.step(state, t, xs, ys, weights=removal_weights(keep, convention), per_run=True)
            bar.update()
        F[ks, rows] = _target_values(tgt, fm, state.theta, state.stats)
    bar.close()
    full = F[:, 0]  # (K, Q)
    vals = np.transpose(F[:, 1:] - full[:, None], (1, 0, 2))  # (S, K, Q)
    return np.ascontiguousarray(vals), full
