"""``diffin bench``: the command line of :func:`diffin.bench.run_bench`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._errors import ConfigError
from ._args import add_config_args, config_from_args


def _peer_options(text: str | None) -> dict[str, dict[str, Any]] | None:
    """``--peer-options`` JSON → {peer: {option: value}}, or a named error."""
    if not text:
        return None
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--peer-options is not valid JSON ({e})") from None
    if not isinstance(opts, dict):
        raise ConfigError('--peer-options must be a JSON object {"peer": {"option": value}}')
    return opts


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import BENCH_SETUPS, BenchConfig, run_bench

    cfg = config_from_args(BenchConfig, args)
    setups = list(BENCH_SETUPS) if args.setup == "all" else [args.setup]
    peer_methods = [m.strip() for m in args.peer_methods.split(",") if m.strip()] if args.peer_methods else None
    run_bench(setups, cfg, args.json, args.workdir, peers=args.peers, quiet=args.quiet,
              peer_methods=peer_methods, peer_options=_peer_options(args.peer_options))
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: list[argparse.ArgumentParser]) -> None:
    """``bench``; ``common``: parents with the shared flags."""
    from ..bench import BENCH_SETUPS, BenchConfig
    from ..bench.builtin.setups import SETUPS

    s = sub.add_parser("bench", help="compare every estimator with replayed removal (and, with --truth, with "
                                     "retraining on fresh orders or seeds) on named setups",
                       parents=common[:1])
    s.add_argument("--setup", required=True, choices=[*BENCH_SETUPS, *sorted(set(SETUPS) - set(BENCH_SETUPS)), "all"],
                   help="named setup, or 'all' for every benchmark setup")
    s.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")
    s.add_argument("--workdir", default=None, help="where to keep the recorded runs (default: a temp dir)")
    s.add_argument("--peers", action="store_true", help="add the peer libraries' rows (diffin[peers])")
    s.add_argument("--peer-methods", default=None, metavar="NAMES",
                   help="with --peers: comma-separated peers (default: every adapter of diffin.peers)")
    s.add_argument("--peer-options", default=None, metavar="JSON",
                   help='with --peers: {"peer": {"option": value}} merged over the setup\'s defaults '
                        '(diffin.bench.PEER_OPTIONS); "skip": "reason" leaves a peer out, '
                        '"lds_per_example": true/false forces its per-example LDS on or off')
    s.add_argument("--quiet", action="store_true", help="only the tables")
    add_config_args(s, BenchConfig)
    s.set_defaults(func=cmd_bench)
