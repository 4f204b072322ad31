"""``diffin methods``, ``train``, ``score``, ``verify`` and ``demo``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import _constants as C
from .._errors import ConfigError
from .._io import write_text
from ..config import ScoreConfig
from . import _user
from ._args import add_config_args, config_from_args


def cmd_methods(args: argparse.Namespace) -> int:
    from ..estimators import available_methods

    for name, summary in available_methods().items():
        print(f"{name:22s} {summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..bench.builtin import get_setup, train
    from ..bench.builtin.setups import write_setup_meta
    from ..bench.builtin.trainer import TrainConfig

    setup = get_setup(args.setup)
    if args.noise is not None:
        setup = setup.with_changes(noise=args.noise)
    setup = setup.with_changes(train=config_from_args(TrainConfig, args, base=setup.train))
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    data = setup.data()
    base_seed = setup.train.seed
    for k in range(args.seeds):
        run_setup = setup
        out = Path(args.out)
        if args.seeds > 1:  # the same (noisy) data, a fresh initialisation and batch order per run
            run_setup = setup.with_changes(train=replace(setup.train, seed=base_seed + k), noise_seed=base_seed)
            out = out / f"seed-{base_seed + k}"
        model = run_setup.model(data)
        res = train(model, data.x_train, data.y_train, run_setup.train, out, overwrite=args.overwrite,
                    progress=not args.quiet, loss=run_setup.loss_fn)
        write_setup_meta(out, run_setup)
        print(f"trained {setup.name} (seed {run_setup.train.seed}): {res.steps} steps in {res.seconds:.2f}s, "
              f"run saved to {out}")
        if len(data.y_test):
            ev = run_setup.evaluate(model, data.x_test, data.y_test, loss_fn=run_setup.loss_fn)
            print(f"test accuracy {ev['accuracy']:.4f}, test loss {ev['loss']:.4f}")
    if args.seeds > 1:
        print(f"score all {args.seeds} runs together: diffin score {args.out}/seed-* --predicts retrain")
    return 0


def _score_inputs(args: argparse.Namespace, run_dir: Path) -> tuple[Any, Any, Any, Any, np.ndarray]:
    """Model, loss, training pair, validation pair (or None) and the training labels of the run:
    the user's (``--model``, ``--data``) or those of the built-in setup the run was made from."""
    if args.model or args.data:
        if args.setup:
            raise ConfigError("give either --setup NAME (a built-in setup) or your own --model and --data, not both")
        if not (args.model and args.data):
            raise ConfigError("--model and --data go together: --model module:function --data file.npz "
                              "(with x_train, y_train and optionally x_val, y_val)")
        model = _user.model_factory(args.model)()
        d = _user.load_npz(args.data)
        dtype = next(model.parameters()).dtype
        train = _user.split(d, "train", dtype, args.loss)  # present: load_npz checked x_train, y_train
        return model, _user.LOSSES[args.loss], train, _user.split(d, "val", dtype, args.loss), d["y_train"].numpy()
    setup = _run_setup(args, run_dir)
    data = setup.data()
    return (setup.model(data), setup.loss_fn, (data.x_train, data.y_train), (data.x_val, data.y_val),
            data.y_train.numpy())


def _run_setup(args: argparse.Namespace, run_dir: Path) -> Any:
    """The built-in setup a run was made from (its diffin_setup.json, else ``--setup``)."""
    from ..bench.builtin import get_setup
    from ..bench.builtin.setups import read_setup_meta

    setup = read_setup_meta(run_dir)
    if setup is None:
        if not args.setup:
            raise ConfigError(
                f"{run_dir} was not made by `diffin train`; give --setup NAME for a built-in setup, or "
                "--model module:function --data file.npz for your own model"
            )
        setup = get_setup(args.setup)
    return setup


def _check_same_data(args: argparse.Namespace, run_dirs: list[Path]) -> None:
    """Several runs of built-in setups are scored on the first run's data: refuse runs whose
    training data differ (another setup, label noise or seed of the flipped labels)."""
    if args.model or args.data or len(run_dirs) < 2:
        return

    def data_of(run_dir: Path) -> tuple[Any, ...]:
        s = _run_setup(args, run_dir)
        seed = s.noise_seed if s.noise_seed is not None else s.train.seed
        return (s.name, float(s.noise), seed if s.noise else None)

    first = data_of(run_dirs[0])
    for r in run_dirs[1:]:
        if data_of(r) != first:
            raise ConfigError(
                f"{r} was trained on other data than {run_dirs[0]} (setup, label noise, noise seed: "
                f"{data_of(r)} vs {first}); score together only runs of the same data, e.g. those "
                "of one `diffin train --seeds K`"
            )


def cmd_score(args: argparse.Namespace) -> int:
    run_dirs = [Path(r) for r in args.run]
    run_dir = run_dirs[0]
    cfg = config_from_args(ScoreConfig, args)
    _check_same_data(args, run_dirs)
    model, loss_fn, train, val, labels = _score_inputs(args, run_dir)
    if args.target == "self":
        target: Any = "self"
    elif val is None:
        raise ConfigError("--data has no validation arrays (x_val, y_val); add them or use --target self")
    else:
        target = val
    if args.out:
        out = Path(args.out)
    elif len(run_dirs) > 1:
        raise ConfigError("scoring several runs needs --out DIR (where the averaged scores go)")
    else:
        out = run_dir / f"scores-{cfg.method}"
    from .._distributed import init_from_env, shutdown

    init_from_env(cfg.device or "cpu")  # under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA
    try:
        _score_and_report(args, cfg, run_dirs, run_dir, model, loss_fn, train, target, out, labels)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()  # every rank waits for rank 0's files, then the group ends
    return 0


def _score_and_report(args: argparse.Namespace, cfg: ScoreConfig, run_dirs: list[Path], run_dir: Path, model: Any,
                      loss_fn: Any, train: Any, target: Any, out: Path, labels: Any) -> None:
    """``diffin score``'s scoring; rank 0 writes ``scores.csv`` and reports."""
    from .._api import score
    from .._distributed import world

    rank, _ = world()
    t0 = time.perf_counter()
    res = score(run_dirs if len(run_dirs) > 1 else run_dir, model, loss_fn, train=train, target=target, config=cfg,
                progress=not args.quiet and rank == 0, out=out, overwrite=args.overwrite, resume=args.resume)
    if rank != 0:  # rank 0 writes and reports
        return
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
    trust = res.diagnostics.get("trust")
    if trust:
        growth, scale = trust.get("adjoint_growth"), trust.get("score_scale")
        measures = ", ".join(f"{k} {v:.3g}" for k, v in (("adjoint growth", growth), ("score scale", scale))
                             if v is not None)
        verdict = "stable" if trust["stable"] else "NOT TRUSTWORTHY: " + "; ".join(trust["reasons"])
        print(f"trust: {verdict} ({measures}; docs/guides/trust.md)")


EMBED_EXCLUDE = ("pairwise", "predicts", "damping", "cg_iters", "cg_tol", "lissa_depth", "lissa_scale",
                 "lissa_batch_size", "closed_form_checkpoints", "credit_every", "first_order")


def cmd_embed(args: argparse.Namespace) -> int:
    from ..embedding import EmbedConfig, embed
    from ._args import given_fields

    run_dir = Path(args.run)
    model, loss_fn, train, _, labels = _score_inputs(args, run_dir)
    out = Path(args.out) if args.out else run_dir / "embedding"
    from .._distributed import init_from_env, shutdown, world

    options = given_fields(ScoreConfig, args)
    init_from_env(options.get("device") or "cpu")  # under torchrun: the ranks split the directions
    t0 = time.perf_counter()
    try:
        emb = embed(run_dir, model, loss_fn, train=train, out=out, embed_config=config_from_args(EmbedConfig, args),
                    progress=not args.quiet and world()[0] == 0, resume=args.resume, overwrite=args.overwrite,
                    **options)
    except BaseException:
        shutdown(wait=False)
        raise
    rank = world()[0]
    shutdown()
    if rank != 0:  # rank 0 reports
        return 0
    print(f"embedding {emb.n} x {emb.dim} ({emb.projection.kind} projection, {emb.manifest['variant']}) in "
          f"{time.perf_counter() - t0:.2f}s -> {out}")
    if args.self_influence:
        own = emb.self_influence()
        lines = [f"id,label,{C.SCORE_COLUMN}"]
        lines += [f"{i},{int(lab) if np.ndim(lab) == 0 else ''},{s:.9g}" for i, (lab, s) in enumerate(zip(labels, own))]
        write_text(out / "self_influence.csv", "\n".join(lines) + "\n")
        order = np.argsort(-own)
        print(f"largest self-influence (memorised / suspicious) ids: {order[:10].tolist()} -> "
              f"{out / 'self_influence.csv'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Replay ``--n`` removals of the run and print Pearson/Spearman of the scores against them."""
    from .._io import write_json
    from .._verify import verify

    run_dir = Path(args.run)
    model, loss_fn, train, val, _ = _score_inputs(args, run_dir)
    if val is None:
        raise ConfigError("--data has no validation arrays (x_val, y_val): verify checks the validation-loss target")
    cfg = config_from_args(ScoreConfig, args)
    res = verify(run_dir, model, loss_fn, train=train, target=val, n=args.n, method=cfg.method, seed=args.seed_ids,
                 convention=cfg.convention, progress=not args.quiet, config=cfg)
    print(res.summary())
    if args.json:
        write_json(Path(args.json), res.to_json())
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..bench.demo import run_demo

    run_demo(args.out, quiet=args.quiet, overwrite=args.overwrite)
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: list[argparse.ArgumentParser]) -> None:
    """``methods``, ``train``, ``score`` and ``demo``; ``common``: parents with the shared flags."""
    from ..bench.builtin.setups import SETUPS
    from ..bench.builtin.trainer import TrainConfig

    s = sub.add_parser("methods", help="list the estimators", parents=common[:1])
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("train", help="train a built-in setup and record the run", parents=common)
    s.add_argument("--setup", required=True, choices=sorted(SETUPS), help="built-in setup to train")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("--noise", type=float, default=None, metavar="FRACTION",
                   help="fraction of training labels to flip (default: the setup's)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    s.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="record K independent runs (seeds SEED..SEED+K-1: fresh initialisation and batch "
                        "order, the same data) into OUT/seed-<seed>; score them together with "
                        "`diffin score OUT/seed-* --predicts retrain`")
    add_config_args(s, TrainConfig, title="training recipe (default: the setup's)", show_defaults=False)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("score", help="score every training sample of a recorded run", parents=common)
    s.add_argument("run", nargs="+",
                   help="run folder (from `diffin train` or diffin.Recorder); several independently recorded "
                        "runs of the same data: their scores are averaged")
    s.add_argument("--setup", choices=sorted(SETUPS), default=None,
                   help="built-in setup of the run (read from the run when made by `diffin train`)")
    s.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=_user.MODEL_HELP)
    s.add_argument("--data", default=None, metavar="FILE.npz|DIR",
                   help="your data: .npz with x_train, y_train, x_val, y_val (ids = row numbers), or a folder of "
                        "x_train.npy, y_train.npy[, x_val.npy, y_val.npy] (numpy.save), read memory-mapped")
    s.add_argument("--loss", default="cross_entropy", choices=sorted(_user.LOSSES),
                   help="per-sample loss of your model, with --model (default: cross_entropy; integer "
                        "labels of any width are read as class indices)")
    s.add_argument("--target", default="val", choices=("val", "self"),
                   help="'val' (default): mean loss on the validation set; 'self': each sample's own loss")
    s.add_argument("--out", default=None, help="output folder (default: RUN/scores-METHOD)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace scores made with another config (and discard an interrupted scoring's state)")
    s.add_argument("--resume", action="store_true",
                   help="continue a killed or failed scoring from the state its sweep saved in OUT/.resume "
                        "(same run, data, method and config; see --resume-every-steps); without a state, start")
    add_config_args(s, ScoreConfig)
    s.set_defaults(func=cmd_score)

    from ..embedding import EmbedConfig

    s = sub.add_parser("embed", help="trajectory influence embedding of every training sample (N x K), for "
                                     "many targets and self-influence", parents=common)
    s.add_argument("run", help="run folder (from `diffin train` or diffin.Recorder)")
    s.add_argument("--setup", choices=sorted(SETUPS), default=None,
                   help="built-in setup of the run (read from the run when made by `diffin train`)")
    s.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=_user.MODEL_HELP)
    s.add_argument("--data", default=None, metavar="FILE.npz|DIR", help="your data (as for `diffin score`)")
    s.add_argument("--loss", default="cross_entropy", choices=sorted(_user.LOSSES),
                   help="per-sample loss, with --model")
    s.add_argument("--out", default=None, help="output folder (default: RUN/embedding)")
    s.add_argument("--self-influence", action="store_true",
                   help="also write every sample's self-influence from the embedding (OUT/self_influence.csv)")
    s.add_argument("--overwrite", action="store_true", help="replace an embedding made with another config")
    s.add_argument("--resume", action="store_true", help="continue an interrupted build in OUT")
    add_config_args(s, EmbedConfig)
    add_config_args(s, ScoreConfig, exclude=EMBED_EXCLUDE, title="sweep options (hvp defaults to exact here)")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("verify", parents=common,
                       help="replay N removals of a recorded run and correlate the scores with them")
    s.add_argument("run", help="run folder (from `diffin train` or diffin.Recorder)")
    s.add_argument("--n", type=int, default=24, help="removals to replay (default 24), drawn among the trained ids")
    s.add_argument("--seed-ids", type=int, default=0, help="seed of the removed ids (default 0)")
    s.add_argument("--setup", choices=sorted(SETUPS), default=None,
                   help="built-in setup of the run (read from the run when made by `diffin train`)")
    s.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=_user.MODEL_HELP)
    s.add_argument("--data", default=None, metavar="FILE.npz|DIR",
                   help="your data, as for `diffin score` (x_val, y_val needed: the target is the validation loss)")
    s.add_argument("--loss", default="cross_entropy", choices=sorted(_user.LOSSES),
                   help="per-sample loss of your model, with --model (default: cross_entropy)")
    s.add_argument("--json", default=None, metavar="FILE", help="write ids, scores, replayed effects and correlations")
    add_config_args(s, ScoreConfig)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("demo", help="train on MNIST-5k with 10%% flipped labels, score, report", parents=common)
    s.add_argument("--out", default="diffin-demo", help="output folder (default: ./diffin-demo)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    s.set_defaults(func=cmd_demo)
