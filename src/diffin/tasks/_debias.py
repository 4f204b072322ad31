"""Debiasing by removal (D3M, Jain et al. 2024, "Data Debiasing with Datamodels"), with diffin's
scores: find the training samples that drive a model's failure on its worst group, remove them,
retrain.

Inputs: a recorded run (the ERM model), a validation set with a group label per sample and,
for the report, a test set with group labels.

**The target.** With ℓ_g(θ) the mean validation loss of group g and ℓ̄ the mean of the group
losses of the recorded (ERM) model at θ_T, every training sample is scored against

    f(θ) = Σ_g w_g · ℓ_g(θ),      w_g = ℓ_g(θ_T) − ℓ̄(θ_T)

(D3M's group alignment, in loss units): the groups the ERM model fails on weigh positively,
those it fits well negatively, so a sample whose removal lowers f is one that raises the worst
groups' loss relative to the others. Since scores are linear in the target, score(z) =
Σ_g w_g · score_g(z), with score_g the sample's score against group g's mean validation loss
(one scoring per group). The ``k`` samples with the lowest (most negative) scores are removed.

**Choosing k** (the documented rule): for each candidate fraction in ``fractions`` (default 1%,
2.5%, 5%, 7.5% and 10% of the training set), the model is retrained without the top k with every
seed; the k whose retrained models have the highest mean validation worst-group accuracy is
chosen (ties: the smaller k). Test numbers are those of the chosen k. The validation set is thus
used for the scores and for k, never the test set.

**Baselines**, retrained with the same recipe and seeds:

* ``erm``: the full training set;
* ``random``: a random removal of the chosen k (a fresh draw per seed);
* ``jtt`` (Liu et al. 2021): the training samples the ERM model misclassifies (its error set, read at
  the recorded checkpoint nearest each epoch of ``jtt_epochs``, the identification model's T),
  upsampled ``λ_up`` times (``jtt_upweights``; each error row repeated, so it is seen λ_up times
  per epoch, as the authors upsample); T and λ_up chosen on the validation worst-group accuracy as
  k is; nothing removed;
* peers (``peers=True``): TRAK's scores in the same protocol (same target, same rule for k).

Outputs in ``out``: ``debias.json`` (``methods``: per method its ``worst_group_accuracy`` and
``average_accuracy``, test, mean over seeds, and ``removed``; with the per-seed and per-group
numbers and the validation curve that chose k), ``debias.csv`` (each sample's combined and
per-group scores), ``report.md`` / ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _tree
from .._data import fingerprint
from .._errors import ConfigError, DataMismatchError
from .._io import write_json
from ..config import config_field
from ..estimators.base import Estimator
from ..report import Report, format_list, format_sizes, text_table
from ._common import (
    Recipe,
    TaskInputs,
    TaskState,
    add_trust,
    cached_score,
    prepare_task,
    retrain_cached,
    theta_final,
    write_csv,
)
from ._prune import scoring

SCORES = ("replay", "retrain")
BASELINES = ("random", "jtt")


@dataclass
class DebiasConfig:
    """Options of ``diffin debias``."""

    method: str = config_field("diffin", "influence method whose scores choose what is removed")
    scores: str = config_field("replay", "scores that predict the replayed run ('replay', the better choice in "
                               "BENCHMARKS.md, 'Debiasing by removal') or a fresh retraining ('retrain', "
                               "predicts='retrain')", choices=SCORES)
    fractions: str = config_field("0.01,0.025,0.05,0.075,0.1", "candidate removal fractions of the training set; "
                                  "the one with the best validation worst-group accuracy is chosen")
    jtt_upweights: str = config_field("5,20,50,100", "JTT: candidate upsampling factors λ_up of the error set "
                                      "(its authors' chosen values range from 6 to 100)")
    jtt_epochs: str = config_field("1,final", "JTT: epochs T of the identification model (the recorded run at the "
                                   "checkpoint nearest each; 'final' = θ_T), chosen on validation with λ_up")
    baselines: str = config_field("random,jtt", "comma-separated baselines besides erm: random, jtt")
    peers: bool = config_field(False, "also run TRAK (traker) in the same protocol (skipped with the reason when "
                               "it is not installed)")
    seeds: int = config_field(3, "retrains per candidate, each with its own seed")
    seed: int = config_field(0, "first seed")

    def __post_init__(self) -> None:
        if self.scores not in SCORES:
            raise ConfigError(f"scores must be one of {SCORES}, got {self.scores!r}")
        if self.seeds < 1:
            raise ConfigError("seeds must be >= 1")
        if self.method not in Estimator.registry and self.method != "diffin":
            raise ConfigError(f"unknown method {self.method!r}; choose an estimator (diffin methods)")
        bad = [b for b in self.baseline_list() if b not in BASELINES]
        if bad:
            raise ConfigError(f"unknown baselines {bad}; choose from {BASELINES}")
        self.fraction_list()
        self.upweight_list()
        self.epoch_list()

    def fraction_list(self) -> list[float]:
        fr = _numbers(self.fractions, "fractions", float)
        if any(not 0 < f < 1 for f in fr):
            raise ConfigError(f"fractions must lie in (0, 1), got {self.fractions!r}")
        return sorted(fr)

    def upweight_list(self) -> list[int]:
        ups = _numbers(self.jtt_upweights, "jtt_upweights", int)
        if any(u < 1 for u in ups):
            raise ConfigError(f"jtt_upweights must be integers >= 1, got {self.jtt_upweights!r}")
        return ups

    def epoch_list(self) -> list[float]:
        """The identification epochs; ``inf`` stands for 'final'."""
        out = []
        for e in (t.strip() for t in self.jtt_epochs.split(",") if t.strip()):
            out.append(float("inf") if e == "final" else _numbers(e, "jtt_epochs", float)[0])
        if not out or any(e <= 0 for e in out):
            raise ConfigError(f"jtt_epochs must be positive numbers or 'final', got {self.jtt_epochs!r}")
        return out

    def baseline_list(self) -> list[str]:
        return [b.strip() for b in self.baselines.split(",") if b.strip()]


def _numbers(text: str, what: str, typ: type) -> list[Any]:
    try:
        out = [typ(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from e
    if not out:
        raise ConfigError(f"{what} is empty")
    return out


def _as_groups(groups: Any, n: int, what: str, names: np.ndarray | None = None) -> np.ndarray:
    """Group labels (n,) as int64 ids: integers as they are; names (strings) as their index in
    ``names`` (the sorted names of the validation and test labels together)."""
    g = np.asarray(groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else groups)
    if g.shape != (n,):
        raise DataMismatchError(f"{what} must hold one group label per sample ({n}), got shape {g.shape}")
    if np.issubdtype(g.dtype, np.integer):
        if g.min() < 0:
            raise DataMismatchError(f"{what}: integer group labels must be >= 0")
        return g.astype(np.int64)
    assert names is not None
    return np.searchsorted(names, g.astype(str)).astype(np.int64)


def builtin_groups(inp: TaskInputs) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The validation and test group labels of a built-in setup that has them (``None`` else)."""
    if inp.setup is None:
        return None
    data = inp.setup.data()
    gv, gt = getattr(data, "groups_val", None), getattr(data, "groups_test", None)
    if gv is None or gt is None:
        return None
    names = np.asarray(getattr(data, "group_names", [str(g) for g in range(int(max(gv.max(), gt.max())) + 1)]))
    return names[gv], names[gt]


@torch.no_grad()
def predictions(model: nn.Module, x: Any, params: dict[str, Any] | None = None) -> torch.Tensor:
    """(n,) predicted classes of ``model`` in eval mode (at ``params`` when given), in chunks."""
    p0 = next(model.parameters())
    was = model.training
    model.eval()
    try:
        n = _tree.batch_len(x)
        return torch.cat([_tree.call_model(model, params, _tree.place(_tree.index(x, slice(s, s + 2048)), p0.dtype,
                                                                      p0.device)).argmax(1).cpu()
                          for s in range(0, n, 2048)])
    finally:
        model.train(was)


def group_accuracy(model: nn.Module, data: tuple[Any, Any], groups: np.ndarray, n_groups: int) -> dict[str, Any]:
    """Accuracy of ``model`` (eval mode) per group and over all samples of ``data``:
    ``{"groups": [acc of group 0 … G−1] (nan for an empty group), "worst", "average"}``."""
    correct = (predictions(model, data[0]) == torch.as_tensor(data[1]).cpu()).numpy()
    accs = [float(correct[groups == g].mean()) if np.any(groups == g) else float("nan") for g in range(n_groups)]
    return {"groups": accs, "worst": float(np.nanmin(accs)), "average": float(correct.mean())}


class _Evaluator:
    """Retrains (cached) and measures validation and test group accuracies."""

    def __init__(self, inp: TaskInputs, state: TaskState, recipe: Recipe, gv: np.ndarray, gt: np.ndarray,
                 n_groups: int, seeds: list[int]) -> None:
        self.inp, self.state, self.recipe, self.seeds = inp, state, recipe, seeds
        self.gv, self.gt, self.G = gv, gt, n_groups
        self.key = {"val": fingerprint(inp.val), "test": fingerprint(inp.test), "gv": gv.tolist(), "gt": gt.tolist()}

    def measure(self, model: nn.Module) -> dict[str, Any]:
        return {"val": group_accuracy(model, self.inp.val, self.gv, self.G),
                "test": group_accuracy(model, self.inp.test, self.gt, self.G)}

    def runs(self, tag: str, rows: Any) -> dict[str, Any]:
        """Retrain on ``rows`` (a fixed array, or ``seed -> array``) with every seed; the mean
        validation and test worst-group and average accuracies, and the per-seed results."""
        per = [retrain_cached(self.inp, self.state, self.recipe, tag, rows(s) if callable(rows) else rows, s,
                              self.measure, self.key) for s in self.seeds]
        out: dict[str, Any] = {"seeds": per}
        for part in ("val", "test"):
            out[f"{part}_worst"] = float(np.mean([r[part]["worst"] for r in per]))
            out[f"{part}_average"] = float(np.mean([r[part]["average"] for r in per]))
            out[f"{part}_groups"] = np.nanmean([r[part]["groups"] for r in per], axis=0).tolist()
        out["test_worst_std"] = float(np.std([r["test"]["worst"] for r in per]))
        return out


def _choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the highest mean validation worst-group accuracy (the first on ties)."""
    best = max(range(len(candidates)), key=lambda i: (candidates[i]["val_worst"], -i))
    return candidates[best]


def _summary(res: dict[str, Any], removed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"worst_group_accuracy": res["test_worst"], "average_accuracy": res["test_average"], "removed": removed,
            "worst_group_accuracy_std": res["test_worst_std"], "test_group_accuracy": res["test_groups"],
            "val_worst_group_accuracy": res["val_worst"], "val_average_accuracy": res["val_average"],
            "per_seed_worst_group_accuracy": [r["test"]["worst"] for r in res["seeds"]], **(extra or {})}


def group_scores(inp: TaskInputs, state: TaskState, method: str, options: dict[str, Any], gv: np.ndarray,
                 n_groups: int, progress: bool) -> np.ndarray:
    """(N, G) scores of every training sample against each group's mean validation loss."""
    cols = []
    for g in range(n_groups):
        ids = torch.as_tensor(np.flatnonzero(gv == g))
        target = (_tree.index(inp.val[0], ids), inp.val[1][ids])
        cols.append(cached_score(inp, state, method, target, progress, tag=f"group{g}", **options))
    return np.stack(cols, axis=1).astype(np.float64)


def group_losses(inp: TaskInputs, state: TaskState, gv: np.ndarray, n_groups: int) -> np.ndarray:
    """(G,) mean validation loss of each group under the recorded model's θ_T."""
    from ._common import losses_at

    fm, theta, _ = theta_final(inp, state.run)
    loss = losses_at(fm, theta, inp.val)
    return np.array([loss[gv == g].mean() for g in range(n_groups)])


def alignment(per_group: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The D3M target's scores (N,) and weights (G,): Σ_g (ℓ_g − ℓ̄) · score_g (module docstring)."""
    w = losses - losses.mean()
    return per_group @ w, w


def _peer_scores(inp: TaskInputs, state: TaskState, gv: np.ndarray, n_groups: int) -> np.ndarray | str:
    """TRAK's (N, G) group scores, or the reason it was skipped."""
    from ..peers import available_peers, run_peer

    status = available_peers().get("trak", "no adapter")
    if status != "ok":
        return f"skipped: TRAK's package does not import here ({status}); pip install 'diffin[peers]'"
    cols = []
    for g in range(n_groups):
        ids = torch.as_tensor(np.flatnonzero(gv == g))
        cols.append(run_peer("trak", run=state.run, model_factory=inp.model_factory, loss_fn=inp.loss_fn,
                             train=inp.train, target=(_tree.index(inp.val[0], ids), inp.val[1][ids])).scores)
    return np.stack(cols, axis=1)


def debias(inp: TaskInputs, config: DebiasConfig | None = None, out: str | Path | None = None,
           groups: Any = None, test_groups: Any = None, overwrite: bool = False, progress: bool = True,
           log: Any = None, **options: Any) -> dict[str, Any]:
    """Score, remove, retrain, compare (module docstring); returns the content of ``debias.json``.

    ``groups``: the group label of every validation sample (a list or array, (n_val,); names or
    integers); ``test_groups`` the same for the test set. A built-in setup with groups
    (``mnist5k-spurious``) supplies both when they are not given."""
    cfg = config if config is not None else DebiasConfig(**options)
    say = log or (lambda *a: None)
    if inp.val is None or inp.test is None:
        raise ConfigError("debias needs validation data (to score and choose k) and test data (to report)")
    if groups is None:
        given = builtin_groups(inp)
        if given is None:
            raise ConfigError("debias needs the group label of every validation sample: pass groups= (a list) "
                              "or, on the command line, --groups NAME with arrays NAME_val and NAME_test in --data")
        groups, test_groups = given if test_groups is None else (given[0], test_groups)
    if test_groups is None:
        raise ConfigError("debias reports test accuracy per group: pass test_groups= (--groups NAME needs NAME_test)")
    n_val, n_test = _tree.batch_len(inp.val[0]), _tree.batch_len(inp.test[0])
    names = np.unique(np.concatenate([np.asarray(groups).astype(str), np.asarray(test_groups).astype(str)]))
    gv, gt = _as_groups(groups, n_val, "groups", names), _as_groups(test_groups, n_test, "test_groups", names)
    G = int(max(gv.max(), gt.max())) + 1
    integer_ids = np.issubdtype(np.asarray(groups).dtype, np.integer)
    if len(np.unique(gv)) < 2:
        raise ConfigError("the validation set holds one group only; debiasing compares groups")
    recipe = inp.recipe()
    state = prepare_task(inp, "debias", cfg, out, overwrite, progress, recipe)
    say(f"  retraining recipe: {recipe.describe()}")
    N = inp.n_train
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    ev = _Evaluator(inp, state, recipe, gv, gt, G, seeds)
    t0 = time.perf_counter()
    losses = group_losses(inp, state, gv, G)
    method, opts = scoring(cfg.method, cfg.scores)
    per_group = group_scores(inp, state, method, opts, gv, G, progress)
    tau, w = alignment(per_group, losses)
    t_scores = time.perf_counter() - t0
    ks = [max(1, int(round(f * N))) for f in cfg.fraction_list()]

    erm = ev.runs("erm", np.arange(N))
    methods: dict[str, Any] = {"erm": _summary(erm, 0)}
    say(f"  erm: test worst-group {erm['test_worst']:.4f}, average {erm['test_average']:.4f}")

    def by_removal(name: str, order: np.ndarray) -> dict[str, Any]:
        cands = []
        for k in ks:
            r = ev.runs(f"{name}_remove{k}", np.sort(order[k:]))
            cands.append({"k": k, **r})
            say(f"  {name} remove {k}: val worst-group {r['val_worst']:.4f}, test worst-group {r['test_worst']:.4f}")
        best = _choose(cands)
        curve = [{"removed": c["k"], "val_worst_group_accuracy": c["val_worst"],
                  "test_worst_group_accuracy": c["test_worst"], "test_average_accuracy": c["test_average"]}
                 for c in cands]
        return _summary(best, best["k"], {"curve": curve, "removed_ids": np.sort(order[: best["k"]]).tolist()})

    methods["diffin"] = by_removal("diffin", np.argsort(tau, kind="stable"))
    k_star = methods["diffin"]["removed"]
    if "random" in cfg.baseline_list():
        def random_rows(s: int) -> np.ndarray:
            return np.sort(np.random.default_rng([s, 7]).permutation(N)[k_star:])
        methods["random"] = _summary(ev.runs(f"random_remove{k_star}", random_rows), k_star)
    if "jtt" in cfg.baseline_list():
        methods["jtt"] = _jtt(inp, state, ev, cfg, say)
    peer_scores: dict[str, np.ndarray] = {}
    if cfg.peers:
        pg = _peer_scores(inp, state, gv, G)
        if isinstance(pg, str):
            methods["trak"] = {"skipped": pg}
            say(f"  trak {pg}")
        else:
            peer_scores["trak"], _ = alignment(pg, losses)
            methods["trak"] = by_removal("trak", np.argsort(peer_scores["trak"], kind="stable"))
    for m, r in methods.items():
        if "worst_group_accuracy" in r:
            say(f"  {m:8s} test worst-group {r['worst_group_accuracy']:.4f}, average {r['average_accuracy']:.4f}, "
                f"removed {r['removed']}")
    result: dict[str, Any] = {
        "setup": inp.description,
        "sizes": inp.sizes or {"train": N},
        "groups": {"names": [str(g) for g in range(G)] if integer_ids else names.tolist(),
                   "val_counts": np.bincount(gv, minlength=G).tolist(),
                   "test_counts": np.bincount(gt, minlength=G).tolist(),
                   "erm_val_loss": losses.tolist(), "weights": w.tolist(), "worst_val_group": int(np.argmax(losses))},
        "target": "Σ_g (ℓ_g(θ_T) − mean_g ℓ_g(θ_T)) · ℓ_g(θ): D3M's group alignment of the validation group losses",
        "method": cfg.method, "scores": cfg.scores, "seeds": seeds,
        "recipe": {"description": recipe.describe(), **recipe.to_json()},
        "methods": methods,
        "trust": dict(state.trust),
        "seconds": {"scores": t_scores, "total": time.perf_counter() - t0},
        "config": asdict(cfg),
    }
    if state.out is not None:
        _write(state.out, result, tau, per_group, peer_scores)
    return result


def _jtt(inp: TaskInputs, state: TaskState, ev: _Evaluator, cfg: DebiasConfig, say: Any) -> dict[str, Any]:
    """JTT: the error set of the recorded run at each identification epoch, upsampled by each λ_up;
    the pair with the best mean validation worst-group accuracy."""
    from ..trajectory import Trajectory

    run = state.run
    fm, _, _ = theta_final(inp, run)
    traj = Trajectory(run, fm)
    steps_per_epoch = max(1, round(run.n_steps / ev.recipe.config.epochs))
    N = inp.n_train
    labels = torch.as_tensor(inp.train[1]).cpu()
    cands = []
    for e in cfg.epoch_list():
        step = run.n_steps if e == float("inf") else min(run.checkpoint_steps,
                                                         key=lambda c: abs(c - e * steps_per_epoch))
        errors = np.flatnonzero((predictions(fm.model, inp.train[0], fm.unflatten(traj.theta(step))) != labels).numpy())
        for lam in cfg.upweight_list():
            rows = np.sort(np.concatenate([np.arange(N)] + [errors] * (lam - 1)))
            r = ev.runs(f"jtt_step{step}_up{lam}", rows)
            cands.append({"epoch": "final" if e == float("inf") else e, "step": step, "upweight": lam,
                          "n_errors": int(errors.size), **r})
            say(f"  jtt T={cands[-1]['epoch']} (step {step}, {errors.size} errors) λ_up {lam}: val worst-group "
                f"{r['val_worst']:.4f}, test worst-group {r['test_worst']:.4f}")
    best = _choose(cands)
    curve = [{k: c[k] for k in ("epoch", "step", "upweight", "n_errors")} |
             {"val_worst_group_accuracy": c["val_worst"], "test_worst_group_accuracy": c["test_worst"]} for c in cands]
    return _summary(best, 0, {"identification_epoch": best["epoch"], "upweight": best["upweight"],
                              "n_errors": best["n_errors"], "curve": curve})


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the comparison: one row per method."""
    header = ["method", "worst-group acc (test)", "average acc (test)", "removed", "val worst-group acc"]
    rows = [[m, r["worst_group_accuracy"], r["average_accuracy"], r["removed"], r["val_worst_group_accuracy"]]
            for m, r in result["methods"].items() if "worst_group_accuracy" in r]
    return header, rows


def summary_text(result: dict[str, Any]) -> str:
    """The table and one line saying what won, for the terminal."""
    lines = [text_table(*summary_rows(result))]
    m = result["methods"]
    erm = m["erm"]
    rest = {k: v for k, v in m.items() if k != "erm" and "worst_group_accuracy" in v}
    if rest:
        best = max(rest, key=lambda k: rest[k]["worst_group_accuracy"])
        b = rest[best]
        lines.append(f"best worst-group accuracy: {best} {b['worst_group_accuracy']:.4f} "
                     f"({b['worst_group_accuracy'] - erm['worst_group_accuracy']:+.4f} over erm), average accuracy "
                     f"{b['average_accuracy'] - erm['average_accuracy']:+.4f}, {b['removed']} removed")
    lines += [f"{k}: {v['skipped']}" for k, v in m.items() if "skipped" in v]
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any], tau: np.ndarray, per_group: np.ndarray,
           peers: dict[str, np.ndarray]) -> None:
    write_json(out / "debias.json", result)
    G = per_group.shape[1]
    header = ["id", "score", *[f"score_group{g}" for g in range(G)], *[f"score_{p}" for p in peers]]
    write_csv(out / "debias.csv", header,
              [[str(i), f"{tau[i]:.9g}", *[f"{per_group[i, g]:.9g}" for g in range(G)],
                *[f"{v[i]:.9g}" for v in peers.values()]] for i in range(len(tau))])
    rep = Report("diffin debias")
    gr = result["groups"]
    rep.text(f"{result['setup']}. Sizes: {format_sizes(result['sizes'])}. Groups: "
             f"{', '.join(f'{n} (val {c})' for n, c in zip(gr['names'], gr['val_counts'], strict=False))}; "
             f"seeds {format_list(result['seeds'])}.")
    rep.text(f"Retraining recipe: {result['recipe']['description']}.")
    rep.text(f"Target: {result['target']}; group weights {format_list([round(x, 4) for x in gr['weights']])}. "
             f"Scores by `{result['method']}` (predicting {result['scores']}). The removal count of each method is "
             "the candidate with the best mean validation worst-group accuracy.")
    rep.table(*summary_rows(result))
    rep.text(summary_text(result).splitlines()[-1])
    for m in ("diffin", "trak"):
        if "curve" in result["methods"].get(m, {}):
            rep.text(f"`{m}`: candidates (mean over seeds)")
            c = result["methods"][m]["curve"]
            rep.table(["removed", "val worst-group", "test worst-group", "test average"],
                      [[p["removed"], p["val_worst_group_accuracy"], p["test_worst_group_accuracy"],
                        p["test_average_accuracy"]] for p in c])
    add_trust(rep, result.get("trust") or {})
    rep.write(out)
