"""What replaying a BatchNorm/dropout run in eval mode costs (docs/method.md §4.8).

Takes a run recorded by ``diffin bench --setup NAME --workdir W`` (a built-in setup with BatchNorm or
dropout, e.g. ``mnist5k-mlp-bn``) and its bench JSON (the removed ids), copies the run without its
training modes and RNG states (as an older diffin recorded it), scores that copy with
``diffin-exact`` (replayed in eval mode, with a ``TrainModeWarning``), and correlates the scores
with replayed removal in the recorded modes (the true effect):

    python benchmarks/eval_mode_gap.py mnist5k-mlp-bn W/mnist5k-mlp-bn docs/bench-train-mode/mnist5k-mlp-bn.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import diffin
from diffin import _constants as C
from diffin.bench.builtin import get_setup
from diffin.groundtruth import replay_removal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setup")
    ap.add_argument("run", type=Path)
    ap.add_argument("bench_json", type=Path)
    args = ap.parse_args()
    setup = get_setup(args.setup)
    data = setup.data()
    rem = np.array(json.loads(args.bench_json.read_text())["ground_truth"]["removed_ids"])
    kw = dict(train=(data.x_train, data.y_train), target=(data.x_val, data.y_val), progress=False)
    truth = replay_removal(args.run, setup.model(data), setup.loss_fn, remove=list(rem), **kw)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "run"
        shutil.copytree(args.run, old)
        m = json.loads((old / C.MANIFEST).read_text())
        m.pop("train_modes", None)
        m.pop("rng_states", None)
        (old / C.MANIFEST).write_text(json.dumps(m))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ev = diffin.score(old, setup.model(data), setup.loss_fn, method="diffin-exact", **kw)
    s = ev.scores[rem]
    print(json.dumps({"setup": args.setup, "eval_mode_diffin_exact": {
        "pearson": float(np.corrcoef(s, truth)[0, 1]), "spearman": float(spearmanr(s, truth)[0]),
        "replay_drift": ev.diagnostics["replay_drift"], "warnings": sorted({type(x.message).__name__ for x in w})}}))


if __name__ == "__main__":
    main()
