"""The ``diffin`` command line.

This package owns every argparse line of diffin; the library never imports it. Options come from
the same config dataclasses as the Python API (:class:`diffin.ScoreConfig`,
:class:`diffin.bench.builtin.TrainConfig`, the task configs, :class:`diffin.bench.BenchConfig`) with
their help text (:mod:`diffin.cli._args`). Commands live by group: ``methods``/``train``/``score``/
``demo`` (:mod:`._core`), ``clean``/``delete``/``prune`` (:mod:`._tasks`), ``bench`` (:mod:`._bench`).

Errors: a :class:`diffin.DiffinError` prints ``diffin: error: ...`` with the library's keyword
hints said as flags (:mod:`._messages`) and exits 2; any other exception (e.g. from the user's
model or data) prints one short line and exits 1; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from .._errors import DiffinError
from .._version import __version__
from . import _bench, _core, _tasks
from ._messages import error_text, flag_table

__all__ = ["build_parser", "main"]


def _common_parents() -> list[argparse.ArgumentParser]:
    """Parents of every subcommand: ``[-v], [-v, --quiet]`` (``-v`` may come before or after the
    command; after it, it leaves the top-level value alone unless given)."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log what diffin does; on errors, print the traceback")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    return [verbose, quiet]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``diffin``: one subcommand per command, each with ``func`` (the command) and
    ``flags`` (its keyword → flag table, for error messages) as defaults."""
    p = argparse.ArgumentParser(
        prog="diffin",
        description="Which training samples helped or hurt a PyTorch model, and by how much (Diff-In).",
    )
    p.add_argument("--version", action="version", version=f"diffin {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what diffin does; on errors, print the traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_parents()
    for group in (_core, _tasks, _bench):
        group.add_parsers(sub, common)
    for s in sub.choices.values():
        s.set_defaults(flags=flag_table(s))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``diffin`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status:
    0 done, 1 unexpected error, 2 diffin error or bad arguments."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "quiet", False):  # off a terminal, long work reports stage lines (diffin._progress)
        logging.getLogger("diffin.progress").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except DiffinError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"diffin: error: {error_text(e, args.flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffin: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the user's model, loss or data failed: one line, traceback with -v
        if args.verbose:
            traceback.print_exc()
        where = "" if args.verbose else f" (run `diffin -v {args.command} ...` for the traceback)"
        print(f"diffin: error: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 1
