"""``diffin demo``: train an MLP on MNIST-5k with 10% flipped labels, score every training sample
with Diff-In, its closed form and TracIn, and show how well each finds the flipped labels."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import _constants as C
from .._api import score
from .._errors import OutputExistsError
from .._io import write_json, write_text
from ..report import Report, image_grid, score_histograms, text_table
from .builtin import evaluate, get_setup, train
from .builtin.setups import write_setup_meta

DEMO_METHODS = ("diffin", "diffin-closed-form", "tracin")


def run_demo(out: str | os.PathLike[str] = "diffin-demo", quiet: bool = False,
             overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns the summary written to ``out/summary.json``.

    ``quiet`` turns off the progress bars; the tables are always printed. Writes ``report.md``
    and ``report.html`` (self-contained) with the figures.
    """
    from ..metrics import detection_auc, recall_at

    out = Path(out)
    setup = get_setup("demo")
    summary_path = out / "summary.json"
    if summary_path.exists() and not overwrite:
        old = json.loads(summary_path.read_text(encoding="utf-8"))
        if old.get("setup") != setup.description:
            raise OutputExistsError(f"{out} holds another demo; choose another folder or overwrite it")
    say = print
    data = setup.data()
    model = setup.model(data)
    say(f"diffin demo: {setup.description}")
    res = train(model, data.x_train, data.y_train, setup.train, out / "run", overwrite=True,
                progress=not quiet)
    write_setup_meta(out / "run", setup)
    test = evaluate(model, data.x_test, data.y_test)
    say(f"trained {res.steps} steps in {res.seconds:.1f}s; test accuracy {test['accuracy']:.3f}")
    flipped = data.flipped
    scores: dict[str, np.ndarray] = {}
    rows = []
    timing = {}
    for m in DEMO_METHODS:
        t0 = time.perf_counter()
        r = score(out / "run", setup.model(data), setup.loss_fn, train=(data.x_train, data.y_train),
                  target=(data.x_val, data.y_val), method=m, progress=not quiet,
                  out=out / f"scores-{m}", overwrite=True)
        timing[m] = time.perf_counter() - t0
        scores[m] = r.scores.astype(np.float64)
        rec = recall_at(scores[m], flipped, (0.1,))[0.1]
        name = m if r.variant == m else f"{m} ({r.variant})"
        rows.append([name, detection_auc(scores[m], flipped), rec, timing[m]])
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        losses = setup.loss_fn(model(data.x_train), data.y_train).double().numpy()
    loss_secs = time.perf_counter() - t0
    rows.append(["loss (baseline: training loss at θ_T)", detection_auc(-losses, flipped),
                 recall_at(-losses, flipped, (0.1,))[0.1], loss_secs])
    header = ["method", "ROC-AUC (flipped = harmful)", "recall @10% inspected", "seconds"]
    table = text_table(header, rows)
    say("\nFinding the flipped labels among the most harmful samples "
        f"({int(flipped.sum())} of {len(flipped)} flipped):\n")
    say(table)
    given = data.y_train.numpy()
    true = data.y_train_clean.numpy()
    order = np.argsort(scores["diffin"], kind="stable")
    top = order[:10]
    top_rows = [[int(i), int(given[i]), int(true[i]), "yes" if flipped[i] else "no",
                 float(scores["diffin"][i])] for i in top]
    top_header = ["id", "given label", "true label", "flipped", f"diffin {C.SCORE_COLUMN}"]
    say("\nTen most harmful training samples by diffin:\n")
    say(text_table(top_header, top_rows))

    cols = ["id", "label", "flipped"] + [f"score_{m}" for m in DEMO_METHODS]
    lines = [",".join(cols)]
    for i in range(len(given)):
        vals = [str(i), str(int(given[i])), str(int(flipped[i]))]
        vals += [f"{scores[m][i]:.9g}" for m in DEMO_METHODS]
        lines.append(",".join(vals))
    write_text(out / "scores.csv", "\n".join(lines) + "\n")
    score_histograms(out / "histograms.png", scores, flipped,
                     "validation loss change if removed (← more harmful)")
    worst = order[:25]
    caps = [f"#{i} label {given[i]}" + (f" (true {true[i]})" if flipped[i] else "")
            + f"\nΔval loss {scores['diffin'][i]:.3g}" for i in worst]
    image_grid(out / "most_harmful.png", data.x_train[worst].numpy(), caps, 28,
               "25 most harmful by diffin: validation loss change if removed")
    rep = Report("diffin demo")
    rep.text(f"{setup.description}. Trained {res.steps:,} SGD steps in {res.seconds:.1f} s; test accuracy "
             f"{test['accuracy']:.3f}. Scores: predicted change of the mean validation loss if the sample had "
             "been removed (positive = helped, negative = hurt).")
    rep.heading("Finding the flipped labels")
    rep.text(f"{int(flipped.sum()):,} of {len(flipped):,} training labels were flipped. Ranking samples from "
             "most harmful (lowest score) to most helpful:")
    rep.table(header, rows)
    rep.figure("histograms.png", "validation loss change if removed, clean and flipped samples, per method")
    rep.heading("The most harmful samples")
    rep.table(top_header, top_rows)
    rep.figure("most_harmful.png", "the 25 most harmful training samples by diffin, with their scores")
    rep.text("Per-sample scores of every method: `scores.csv` (`id,label,flipped,score_<method>`).")
    rep.write(out)
    summary = {
        "setup": setup.description,
        "n_train": len(given),
        "n_flipped": int(flipped.sum()),
        "train_seconds": res.seconds,
        "test_accuracy": test["accuracy"],
        "methods": {r[0].split(" (")[0]: {"auc": r[1], "recall_at_10pct": r[2], "seconds": r[3]} for r in rows},
        "most_harmful": [int(i) for i in top],
    }
    write_json(summary_path, summary)
    say(f"\nwrote {out}/scores.csv, {out}/report.md, {out}/report.html, {out}/histograms.png, "
        f"{out}/most_harmful.png")
    return summary
