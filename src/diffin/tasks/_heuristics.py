"""Per-sample importance heuristics for coreset selection (docs/method.md §6), computed from the
same recorded run. Higher = more important to keep, as each is used in its paper:

* ``loss``: the loss at θ_T.
* ``el2n``: ‖softmax(f(x; θ_e)) − onehot(y)‖₂ at an early checkpoint θ_e (Paul et al. 2021).
* ``grand``: ‖∇l(z; θ_e)‖₂ at the same early checkpoint (Paul et al. 2021).
* ``forgetting``: how often a sample goes from correctly to wrongly classified when it is seen
  again during training, replayed from the recording; never-learned samples rank highest
  (Toneva et al. 2019).
* ``aum``: minus the area under the margin (Pleiss et al. 2020): the margin (logit of the
  sample's label minus the largest other logit) at each presentation during training, replayed from
  the recording, averaged; low AUM marks mislabelled and hard samples, so ``−AUM`` is the hardness
  (the difficulty score of CCS-on-AUM, Zheng et al. 2023).
* ``random``: a seeded random order.
* ``clip-score``: for image–text pairs, the cosine of each pair under θ_T (the DataComp filter:
  keep the pairs the trained model finds best matched).

``early`` is the first checkpoint after 10% of the steps (the papers score early in training).
EL2N, forgetting and AUM assume a classifier (logits and integer labels).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from .._data import DataSource
from .._errors import ConfigError
from .._functional import FlatModel
from ..recording.run import Run
from ..trajectory import Trajectory
from ._common import TaskInputs, losses_at, pair_scores_at, theta_final

HEURISTICS = ("random", "loss", "el2n", "grand", "forgetting", "aum", "clip-score")


def _early_step(steps: list[int], n_steps: int) -> int:
    later = [s for s in steps if s >= 0.1 * n_steps and s > 0]
    return later[0] if later else steps[-1]


def importance(name: str, inp: TaskInputs, seed: int = 0, run: Run | None = None) -> np.ndarray:
    """Importance (N,) of every training sample under heuristic ``name`` (``run``: the loaded
    run of ``inp``, to save loading it again)."""
    if name not in HEURISTICS:
        raise ConfigError(f"unknown heuristic {name!r}; choose from {HEURISTICS}")
    N = inp.n_train
    if name == "random":
        return np.random.default_rng(seed).random(N)
    if name == "clip-score":
        return pair_scores_at(inp, run)
    fm, theta_T, run = theta_final(inp, run)
    x, y = inp.train
    if name == "loss":
        return losses_at(fm, theta_T, inp.train)
    if name == "forgetting":
        return _forgetting(inp, fm, run)
    if name == "aum":
        return -_aum(inp, fm, run)
    early = _early_step(run.checkpoint_steps, run.n_steps)
    theta = fm.flatten(run.load_checkpoint(early).params)
    if name == "el2n":
        with torch.no_grad():
            out = torch.cat([_logits(fm, theta, x[s : s + 2048]) for s in range(0, N, 2048)])
        _check_classifier(out, y)
        onehot = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
        return (out.softmax(1) - onehot).norm(dim=1).double().numpy()
    return torch.cat([fm.per_sample_grads(theta, x[s : s + 256], y[s : s + 256]).norm(dim=1)
                      for s in range(0, N, 256)]).double().numpy()


def _logits(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return functional_call(fm.model, fm.unflatten(theta), (x.to(fm.dtype),))


def _check_classifier(out: torch.Tensor, y: torch.Tensor) -> None:
    if out.ndim != 2 or y.is_floating_point():
        raise ConfigError("EL2N and forgetting need a classifier (2-D logits, integer labels)")


def _presentations(inp: TaskInputs, fm: FlatModel, run: Run, what: str) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
    """Replay the recorded run; for every step, the batch's ids, its logits before the step's
    update and its labels (``what`` names the heuristic, for the error without batch ids)."""
    if not run.has_batch_ids:
        raise ConfigError(f"{what} needs the batch ids of every step")
    traj = Trajectory(run, fm, DataSource(inp.train, fm.dtype, fm.device))
    state = traj.state(0)
    with torch.no_grad():
        for t in range(run.n_steps):
            ids, x, y = traj.batch(t)
            out = _logits(fm, state.theta, x)
            _check_classifier(out, y)
            yield np.asarray(ids), out, y
            state, _ = traj.step(state, t, x, y)


def _aum(inp: TaskInputs, fm: FlatModel, run: Run) -> np.ndarray:
    """Area under the margin (N,) float64: the mean over a sample's presentations of its label's
    logit minus the largest other logit (before each step's update); 0 for a never-seen sample."""
    N = inp.n_train
    total = np.zeros(N)
    count = np.zeros(N)
    for ids, out, y in _presentations(inp, fm, run, "AUM"):
        own = out.gather(1, y[:, None]).squeeze(1)
        other = out.scatter(1, y[:, None], float("-inf")).max(1).values
        np.add.at(total, ids, (own - other).double().numpy())
        np.add.at(count, ids, 1.0)
    return total / np.maximum(count, 1.0)


def _forgetting(inp: TaskInputs, fm: FlatModel, run: Run) -> np.ndarray:
    """Forgetting events counted along the replayed trajectory, at each presentation (before the
    step's update). Never-correct samples get one more than the largest count."""
    N = inp.n_train
    last = np.zeros(N, dtype=bool)
    learned = np.zeros(N, dtype=bool)
    events = np.zeros(N, dtype=np.int64)
    for ids, out, y in _presentations(inp, fm, run, "forgetting counts"):
        correct = (out.argmax(1) == y).numpy()
        events[ids] += last[ids] & ~correct
        last[ids] = correct
        learned[ids] |= correct
    score = events.astype(np.float64)
    score[~learned] = events.max() + 1
    return score
