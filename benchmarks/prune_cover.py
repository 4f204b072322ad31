"""What rule ``cover`` owes to the influence embedding (issue 23, item 4): ablations of ``diffin
prune``'s small-fraction rule on ``mnist5k`` (4,000 train / 500 test digits, MLP 784-64-10 tanh, the
task's retraining recipe, seeds 0-2), against random and CCS on AUM in the same protocol.

Variants (each keeps the same number of samples; retrains are those of ``diffin prune``):

* ``cover`` (the rule as shipped: drop the harmful, k-means on the unit-length influence embeddings,
  one cluster per kept sample, the member nearest each centroid), with ``--class-balanced`` too;
* ``cover-keep-harmful``: the same without dropping the harmful first;
* ``cover-pixels``: the same clustering on the unit-length input pixels instead of the embeddings
  (k-means prototypes of the inputs, an influence-free baseline of the same shape);
* ``drop-harmful`` (the former default below 50%), ``random``, ``aum:stratified`` (CCS on AUM).

    python benchmarks/prune_cover.py --json docs/bench-prune/cover-ablation.json
    python benchmarks/prune_cover.py --noise 0.1 --json docs/bench-prune/cover-ablation-noise.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffin.bench import write_bench_json
from diffin.report import text_table
from diffin.tasks import builtin_inputs, select
from diffin.tasks._common import cached_score, prepare_task
from diffin.tasks._heuristics import importance
from diffin.tasks._prune import PruneConfig, _retrain, cover
from diffin.tasks._self import embedding_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", default="mnist5k")
    p.add_argument("--noise", type=float, default=None)
    p.add_argument("--keep", default="0.05,0.1,0.2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="bench-out/prune-cover")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out) / (args.setup + (f"-noise{args.noise:g}" if args.noise else ""))
    inp = builtin_inputs(args.setup, args.noise, out)
    cfg = PruneConfig(keep=args.keep, methods="diffin", seeds=args.seeds)
    recipe = inp.recipe()
    state = prepare_task(inp, "prune", cfg, out, False, False, recipe)
    labels = np.asarray(inp.labels)
    scores = cached_score(inp, state, "diffin", inp.val, False).astype(np.float64)
    emb = np.asarray(embedding_of(inp, state, "diffin", False).values, dtype=np.float64)
    pixels = np.asarray(inp.train[0], dtype=np.float64).reshape(inp.n_train, -1)
    aum = importance("aum", inp, run=state.run)

    def clustered(features: np.ndarray, drop: bool = True):  # noqa: ANN202
        def pick(fr: float, s: int) -> np.ndarray:
            if drop:
                return select(scores, fr, "cover", seed=s, features=features)
            return np.sort(cover(features, int(round(fr * inp.n_train)), np.random.default_rng(s)))
        return pick

    variants = {
        "cover": clustered(emb),
        "cover (class-balanced)": lambda fr, s: select(scores, fr, "cover", labels, True, seed=s, features=emb),
        "cover-keep-harmful": clustered(emb, drop=False),
        "cover-pixels": clustered(pixels),
        "drop-harmful": lambda fr, s: select(scores, fr, "drop-harmful", seed=s),
        "random": lambda fr, s: select(importance("random", inp, seed=s), fr, "keep-helpful", seed=s),
        "aum:stratified": lambda fr, s: select(aum, fr, "stratified", signed=False, seed=s),
    }
    fractions = cfg.fractions()
    rows, res = [], {}
    for name, pick in variants.items():
        accs = []
        for fr in fractions:
            a = [_retrain(inp, state, recipe, inp.test, f"ablation-{name}_keep{fr:g}", pick(fr, s), s)["accuracy"]
                 for s in range(args.seeds)]
            accs.append(a)
        res[name] = {str(fr): {"mean": float(np.mean(a)), "std": float(np.std(a)), "accuracies": a}
                     for fr, a in zip(fractions, accs)}
        rows.append([name, *[f"{np.mean(a):.3f} ± {np.std(a):.3f}" for a in accs]])
        print(f"{name:24s}", "  ".join(rows[-1][1:]), flush=True)
    print(text_table(["variant", *[f"keep {f:.0%}" for f in fractions]], rows))
    if args.json:
        write_bench_json(args.json, {"results": res}, vars(args), seconds=time.perf_counter() - t0,
                         setup=inp.description)


if __name__ == "__main__":
    main()
