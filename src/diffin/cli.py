"""The ``diffin`` command line. Options come from the same dataclasses as the Python API
(:class:`diffin.ScoreConfig`, :class:`diffin.builtin.TrainConfig`), with their help text."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _constants as C
from ._errors import ConfigError, DataMismatchError, DiffinError
from ._io import write_json, write_text
from .config import ScoreConfig


# ---------------------------------------------------------------------- dataclass → argparse
def add_config_args(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()) -> None:
    """One ``--option`` per dataclass field (default None = "use the dataclass default")."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = str(f.type).replace(" | None", "").strip()
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if typ == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_)
            continue
        conv = {"int": int, "float": float, "str": str}.get(typ, str)
        group.add_argument(flag, dest=f.name, type=conv, default=None,
                           choices=f.metadata.get("choices"), help=help_)


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None, **fixed: Any) -> Any:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    given.update(fixed)
    return dataclasses.replace(base, **given) if base is not None else cls(**given)


# ---------------------------------------------------------------------- commands
def cmd_methods(args: argparse.Namespace) -> int:
    from .estimators import available_methods

    for name, summary in available_methods().items():
        print(f"{name:22s} {summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .builtin import evaluate, get_setup, train
    from .builtin.trainer import TrainConfig

    setup = get_setup(args.setup)
    tc = config_from_args(TrainConfig, args, base=setup.train)
    if args.noise is not None:
        setup = setup.with_changes(noise=args.noise)
    setup = setup.with_changes(train=tc)
    data = setup.data()
    model = setup.model(data)
    res = train(model, data.x_train, data.y_train, tc, args.out, overwrite=args.overwrite,
                progress=not args.quiet)
    write_json(Path(args.out) / C.SETUP_JSON, {"setup": setup.name, "noise": setup.noise,
                                                 "train": tc.to_json()})
    ev = evaluate(model, data.x_test, data.y_test) if len(data.y_test) else None
    print(f"trained {setup.name}: {res.steps} steps in {res.seconds:.2f}s, run saved to {args.out}")
    if ev:
        print(f"test accuracy {ev['accuracy']:.4f}, test loss {ev['loss']:.4f}")
    return 0


def _builtin_from_run(run_dir: Path, setup_name: str | None) -> tuple[Any, Any]:
    from .builtin import get_setup
    from .builtin.trainer import TrainConfig

    meta_path = run_dir / C.SETUP_JSON
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        setup = get_setup(meta["setup"]).with_changes(noise=meta["noise"],
                                                      train=TrainConfig(**meta["train"]))
    elif setup_name:
        setup = get_setup(setup_name)
    else:
        raise ConfigError(
            f"{run_dir} was not made by `diffin train`; pass --setup NAME for a built-in setup, or "
            "--model module:function --data file.npz for your own model"
        )
    return setup, setup.data()


def _user_model(spec: str) -> torch.nn.Module:
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ConfigError("--model must look like package.module:function (a function returning the model)")
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {spec}: {e}") from e
    return factory()


def _user_data(path: str) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: torch.from_numpy(f[k]) for k in f.files}
    except (OSError, ValueError) as e:
        raise DataMismatchError(f"{path}: cannot read as .npz ({e})") from e
    missing = [k for k in ("x_train", "y_train") if k not in data]
    if missing:
        raise DataMismatchError(f"{path} lacks arrays {missing}; expected x_train, y_train, x_val, y_val")
    return data


LOSSES = {
    "cross_entropy": lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"),
    "mse": lambda o, y: ((o - y) ** 2).reshape(o.shape[0], -1).mean(dim=1),
}


def cmd_score(args: argparse.Namespace) -> int:
    from ._api import score

    run_dir = Path(args.run)
    cfg = config_from_args(ScoreConfig, args)
    if args.model:
        if not args.data:
            raise ConfigError("--model needs --data file.npz with x_train, y_train (and x_val, y_val)")
        model = _user_model(args.model)
        d = _user_data(args.data)
        dtype = next(model.parameters()).dtype
        train = (d["x_train"].to(dtype) if d["x_train"].is_floating_point() else d["x_train"], d["y_train"])
        val = (d["x_val"], d["y_val"]) if "x_val" in d and "y_val" in d else None
        loss_fn = LOSSES[args.loss]
        labels = d["y_train"].numpy()
    else:
        setup, data = _builtin_from_run(run_dir, args.setup)
        model = setup.model(data)
        train = (data.x_train, data.y_train)
        val = (data.x_val, data.y_val)
        loss_fn = setup.loss_fn
        labels = data.y_train.numpy()
    if args.target == "self":
        target: Any = "self"
    elif val is None:
        raise ConfigError("no validation arrays (x_val, y_val) given; use --target self")
    else:
        target = val
    out = Path(args.out) if args.out else run_dir / f"scores-{cfg.method}"
    t0 = time.perf_counter()
    res = score(run_dir, model, loss_fn, train=train, target=target, config=cfg,
                progress=not args.quiet, out=out, overwrite=args.overwrite)
    if res.scores.ndim == 1:
        lines = [f"id,label,{C.SCORE_COLUMN}"]
        lines += [f"{i},{int(lab) if np.ndim(lab) == 0 else ''},{s:.9g}"
                  for i, (lab, s) in enumerate(zip(labels, res.scores))]
        write_text(out / "scores.csv", "\n".join(lines) + "\n")
    order = np.argsort(res.scores if res.scores.ndim == 1 else res.scores.mean(1))
    print(f"{res.method} (ran as {res.variant}) scored {len(order)} samples in "
          f"{time.perf_counter() - t0:.2f}s -> {out}")
    print(f"most harmful ids: {order[:10].tolist()}")
    print(f"most helpful ids: {order[::-1][:10].tolist()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quiet=args.quiet, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .builtin.setups import SETUPS
    from .builtin.trainer import TrainConfig

    p = argparse.ArgumentParser(
        prog="diffin",
        description="Which training samples helped or hurt a PyTorch model, and by how much (Diff-In).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the estimators do")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="list the estimators")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("train", help="train a built-in setup and record the run")
    s.add_argument("--setup", required=True, choices=sorted(SETUPS), help="built-in setup to train")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("--noise", type=float, default=None, help="fraction of training labels to flip")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(s, TrainConfig)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("score", help="score every training sample of a recorded run")
    s.add_argument("run", help="run folder (from `diffin train` or diffin.Recorder)")
    s.add_argument("--setup", choices=sorted(SETUPS), default=None,
                   help="built-in setup of the run (read from the run when made by `diffin train`)")
    s.add_argument("--model", default=None, help="your model: package.module:function returning the module")
    s.add_argument("--data", default=None,
                   help="your data: .npz with x_train, y_train, x_val, y_val (ids = row numbers)")
    s.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES),
                   help="per-sample loss of your model (with --model)")
    s.add_argument("--target", default="val", choices=("val", "self"),
                   help="'val': mean loss on the validation set; 'self': each sample's own loss")
    s.add_argument("--out", default=None, help="output folder (default: RUN/scores-METHOD)")
    s.add_argument("--overwrite", action="store_true", help="replace scores made with another config")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(s, ScoreConfig)
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("demo", help="train on MNIST-5k with 10%% flipped labels, score, report")
    s.add_argument("--out", default="diffin-demo", help="output folder (default: ./diffin-demo)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)

    from .bench import add_bench_parser
    from .tasks import add_task_parsers

    add_bench_parser(sub)
    add_task_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DiffinError as e:
        print(f"diffin: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
