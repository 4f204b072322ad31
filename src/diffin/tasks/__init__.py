"""The three data-centric tasks of METHOD.md section 6, as functions and CLI commands:

* :func:`clean` — flag the most harmful samples, measure detection, retrain without them;
* :func:`delete` — predict the effect of removing groups of records and check it by replay;
* :func:`prune` — keep a fraction chosen by score, retrain from scratch, compare test accuracy.

Each takes :class:`TaskInputs` (a recorded run with its model, loss and data; or
:func:`builtin_inputs` for a built-in setup) and writes JSON, CSV and a report into ``out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .._errors import ConfigError
from ._clean import CleanConfig, clean
from ._common import TaskInputs, builtin_inputs
from ._delete import DeleteConfig, delete
from ._prune import PruneConfig, prune, select

__all__ = ["CleanConfig", "DeleteConfig", "PruneConfig", "TaskInputs", "builtin_inputs", "clean",
           "delete", "prune", "select", "add_task_parsers"]


def _inputs(args: argparse.Namespace, out: Path) -> TaskInputs:
    from ..builtin.trainer import TrainConfig
    from ..cli import LOSSES, _user_data, _user_model, config_from_args

    if args.setup:
        return builtin_inputs(args.setup, args.noise, out, progress=not args.quiet)
    if not (args.run and args.model and args.data):
        raise ConfigError("give --setup NAME, or your own --run DIR --model module:function --data file.npz")
    d = _user_data(args.data)
    model = _user_model(args.model)
    dtype = next(model.parameters()).dtype

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if f"x_{prefix}" not in d or f"y_{prefix}" not in d:
            return None
        x = d[f"x_{prefix}"]
        return (x.to(dtype) if x.is_floating_point() else x, d[f"y_{prefix}"])

    flipped = d["flipped"].numpy().astype(bool) if "flipped" in d else None
    return TaskInputs(run=Path(args.run), model_factory=lambda: _user_model(args.model),
                      loss_fn=LOSSES[args.loss], train=pair("train"), val=pair("val"), test=pair("test"),
                      flipped=flipped, train_config=config_from_args(TrainConfig, args),
                      description=f"{args.model} on {args.data}")


def _common_args(s: argparse.ArgumentParser) -> None:
    from ..builtin.setups import SETUPS
    from ..cli import LOSSES

    s.add_argument("--setup", choices=sorted(SETUPS), default=None, help="built-in setup (e.g. mnist5k)")
    s.add_argument("--noise", type=float, default=None, help="built-in setup: fraction of labels to flip")
    s.add_argument("--run", default=None, help="your recorded run (with --model and --data)")
    s.add_argument("--model", default=None, help="your model: package.module:function")
    s.add_argument("--data", default=None, help="your data: .npz with x_train, y_train, x_val, y_val, "
                   "optional x_test, y_test and a boolean 'flipped'")
    s.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES), help="loss of your model")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--overwrite", action="store_true", help="replace results made with another config")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd(task: str):  # noqa: ANN202
    def run(args: argparse.Namespace) -> int:
        from ..cli import config_from_args
        from ..report import text_table
        from ._clean import summary_text
        from ._prune import summary_rows

        out = Path(args.out)
        inp = _inputs(args, out)
        progress = not args.quiet
        if task == "clean":
            res: dict[str, Any] = clean(inp, config_from_args(CleanConfig, args), out, args.overwrite, progress)
            print(summary_text(res))
        elif task == "delete":
            res = delete(inp, config_from_args(DeleteConfig, args), out, args.overwrite, progress)
            for k, v in res["by_prediction"].items():
                print(f"{k:12s} Pearson {v['pearson']:.4f}  Spearman {v['spearman']:.4f}  MAE {v['mae']:.3g}")
        else:
            res = prune(inp, config_from_args(PruneConfig, args), out, args.overwrite, progress,
                        log=None if args.quiet else print)
            header, rows = summary_rows(res)
            print(text_table(header, rows))
        print(f"wrote {out}/{task}.json, {out}/{task}.csv, {out}/report.md")
        return 0

    return run


def add_task_parsers(sub: argparse._SubParsersAction) -> None:
    from ..builtin.trainer import TrainConfig
    from ..cli import add_config_args

    for name, cls, help_ in (
        ("clean", CleanConfig, "flag the most harmful training samples; detection and retraining"),
        ("delete", DeleteConfig, "predict and replay the effect of removing groups of samples"),
        ("prune", PruneConfig, "keep a fraction chosen by score, retrain, compare accuracy"),
    ):
        s = sub.add_parser(name, help=help_)
        _common_args(s)
        add_config_args(s, cls)
        if name == "prune":
            add_config_args(s, TrainConfig, exclude=("seed",))
        s.set_defaults(func=_cmd(name))


