"""``diffin clean``, ``delete``, ``prune`` and ``debias`` (the tasks of :mod:`diffin.tasks`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError
from . import _user
from ._args import add_config_args, config_from_args, given_fields

TASK_HELP = {
    "clean": "flag the most harmful training samples; detection and retraining",
    "delete": "predict and replay the effect of removing groups of samples",
    "prune": "keep a fraction chosen by score, retrain, compare accuracy",
    "debias": "remove what drives the worst group's failure (D3M), retrain, compare with ERM and JTT",
}
RETRAINS = ("prune", "debias")
"""Tasks whose retraining recipe can be changed on the command line."""


def task_inputs(args: argparse.Namespace, out: Path) -> Any:
    """The :class:`diffin.tasks.TaskInputs` of the command line: a built-in setup (``--setup``) or
    the user's run, model, loss and data. Training options given on the command line (prune's
    retraining recipe) go in ``train_overrides``; the rest of the recipe is the run's own."""
    from ..bench.builtin.trainer import TrainConfig
    from ..tasks import TaskInputs, builtin_inputs

    overrides = given_fields(TrainConfig, args)
    if args.setup:
        if args.run or args.model or args.data:
            raise ConfigError("give either --setup NAME or your own --run DIR --model module:function "
                              "--data file.npz, not both")
        return builtin_inputs(args.setup, args.noise, out, train_overrides=overrides)
    if not (args.run and args.model and args.data):
        raise ConfigError("give --setup NAME, or your own --run DIR --model module:function --data file.npz")
    if args.noise is not None:
        raise ConfigError("--noise flips the labels of a built-in setup; with your own --data, mark known "
                          "wrong labels in a boolean array 'flipped' of the .npz instead")
    factory = _user.model_factory(args.model)
    d = _user.load_npz(args.data)
    dtype = next(factory().parameters()).dtype
    flipped = d["flipped"].numpy().astype(bool) if "flipped" in d else None
    return TaskInputs(run=Path(args.run), model_factory=factory, loss_fn=_user.LOSSES[args.loss],
                      train=_user.split(d, "train", dtype, args.loss), val=_user.split(d, "val", dtype, args.loss),
                      test=_user.split(d, "test", dtype, args.loss), flipped=flipped,
                      train_overrides=overrides, description=f"{args.model} on {args.data}")


def _command(task: str, cls: type) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .. import tasks
        from ..report import text_table
        from ..tasks._clean import summary_text
        from ..tasks._debias import summary_text as debias_text
        from ..tasks._prune import summary_rows

        out = Path(args.out)
        cfg = config_from_args(cls, args)
        inp = task_inputs(args, out)
        progress = not args.quiet
        if task == "clean":
            # the time estimates of costly methods are printed even with --quiet (no progress bars only), and flushed:
            # a redirected run says what it is about to spend before it spends it
            res: dict[str, Any] = tasks.clean(inp, cfg, out, args.overwrite, progress,
                                              log=lambda msg: print(msg, flush=True))
            print(summary_text(res))
        elif task == "debias":
            groups = test_groups = None
            if args.groups:
                if args.setup:
                    raise ConfigError("--groups names arrays of your --data; a built-in setup brings its own groups")
                d = _user.load_npz(args.data)
                missing = [f"{args.groups}_{p}" for p in ("val", "test") if f"{args.groups}_{p}" not in d]
                if missing:
                    raise ConfigError(f"--data {args.data} lacks the group arrays {missing} named by --groups")
                groups, test_groups = (np.asarray(d[f"{args.groups}_{p}"]) for p in ("val", "test"))
            res = tasks.debias(inp, cfg, out, groups=groups, test_groups=test_groups, overwrite=args.overwrite,
                               progress=progress, log=None if args.quiet else print)
            print(debias_text(res))
        elif task == "delete":
            res = tasks.delete(inp, cfg, out, args.overwrite, progress)
            for k, v in res["by_prediction"].items():
                print(f"{k:12s} Pearson {v['pearson']:.4f}  Spearman {v['spearman']:.4f}  MAE {v['mae']:.3g}")
        else:
            res = tasks.prune(inp, cfg, out, args.overwrite, progress, log=None if args.quiet else print)
            header, rows = summary_rows(res)
            print(text_table(header, rows))
        print(f"wrote {out}/{task}.json, {out}/{task}.csv, {out}/report.md, {out}/report.html")
        return 0

    return run


def add_parsers(sub: argparse._SubParsersAction, common: list[argparse.ArgumentParser]) -> None:
    """``clean``, ``delete`` and ``prune``; ``common``: parents with the shared flags."""
    from ..bench.builtin.setups import SETUPS
    from ..bench.builtin.trainer import TrainConfig
    from ..tasks import CleanConfig, DebiasConfig, DeleteConfig, PruneConfig

    for name, cls in (("clean", CleanConfig), ("delete", DeleteConfig), ("prune", PruneConfig),
                      ("debias", DebiasConfig)):
        s = sub.add_parser(name, help=TASK_HELP[name], parents=common)
        s.add_argument("--setup", choices=sorted(SETUPS), default=None, help="built-in setup (e.g. mnist5k)")
        s.add_argument("--noise", type=float, default=None, metavar="FRACTION",
                       help="with --setup: fraction of training labels to flip, or of image-text pairs to "
                            "mismatch for mnist-captions (default: the setup's)")
        s.add_argument("--run", default=None, help="your recorded run (with --model and --data)")
        s.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=_user.MODEL_HELP)
        s.add_argument("--data", default=None, metavar="FILE.npz|DIR",
                       help="your data: .npz with x_train, y_train, x_val, y_val, optional x_test, y_test "
                            "and a boolean 'flipped', or a folder of those as .npy files, read memory-mapped")
        s.add_argument("--loss", default="cross_entropy", choices=sorted(_user.LOSSES),
                       help="loss of your model (default: cross_entropy)")
        s.add_argument("--out", required=True, help="output folder")
        s.add_argument("--overwrite", action="store_true", help="replace results made with another config")
        if name == "debias":
            s.add_argument("--groups", default=None, metavar="NAME",
                           help="with --data: the group label of every validation and test sample, arrays NAME_val "
                                "and NAME_test of the .npz (a built-in setup such as mnist5k-spurious has its own)")
        add_config_args(s, cls)
        if name in RETRAINS:
            add_config_args(s, TrainConfig, exclude=("seed",),
                            title="retraining recipe (default: the recorded run's; give only what to change)",
                            show_defaults=False)
        s.set_defaults(func=_command(name, cls))
