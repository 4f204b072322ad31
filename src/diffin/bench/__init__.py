"""The benchmark harness and the built-in setups: a layer above the library (the core never
imports it; the command line and the tasks do).

| module              | what                                                                  |
|---------------------|-----------------------------------------------------------------------|
| ``run``             | ``diffin bench``: run the named setups, print tables, write the JSON  |
| ``harness``         | every estimator against replayed removal and LDS on a built-in setup  |
| ``scale``           | ``scale-1m``: time and memory at a million samples, N sweep           |
| ``pairs``           | ``scale-1m-pairs``: contrastive training at a million pairs           |
| ``demo``            | ``diffin demo``: train, score, report on a built-in setup             |
| ``builtin``         | built-in data, models, trainer and named setups                       |
"""

import importlib
from typing import Any

_HOME = {
    **dict.fromkeys(("BATCH_LOSS_METHODS", "BENCH_SETUPS", "DEFAULT_METHODS", "PEER_OPTIONS", "BenchConfig",
                     "machine_info", "metagradient_ceiling", "peer_options", "run_setup", "write_bench_json"),
                    "harness"),
    **dict.fromkeys(("TABLE_COLUMNS", "load_results", "run_bench", "table_columns", "table_rows"), "run"),
    **dict.fromkeys(("SCALE_COLUMNS", "SCALE_SETUP", "SIZES_COLUMNS", "removal_spot_check", "run_scale"), "scale"),
}
"""Where each name of ``diffin.bench`` lives. Imported on first use, so that importing
``diffin.bench.builtin`` (as the tasks do) does not load the harness and its extras."""

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
