"""Import what one extra of diffin brings (tools/check_packaging.sh runs it in a venv holding diffin
with that extra only): its packages, and the diffin modules that use them.

    python tools/check_extra.py hf

An extra not listed here fails: add its imports when adding an extra to pyproject.toml. diffin's
modules are imported only when they exist in the installed version (integrations land over time).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # extra: (third-party modules that must import, diffin modules that must import when present)
    "tasks": (("matplotlib", "sklearn", "mlxtend", "cleanlab"),
              ("diffin.tasks", "diffin.report", "diffin.bench", "diffin.bench.harness", "diffin.bench.demo")),
    "clean": (("cleanlab",), ()),
    "peers": (("captum", "trak", "dattri", "accelerate", "einops", "opt_einsum"), ("diffin.peers",)),
    "hf": (("transformers", "accelerate", "tokenizers", "datasets"),
           ("diffin.integrations.huggingface", "diffin.integrations.hf", "diffin.integrations.peft")),
    "lightning": (("lightning",), ("diffin.integrations.lightning",)),
    # open_clip imports torchvision, whose PyPI wheel needs diffin's import helper next to a CPU torch
    "clip": ((), ("diffin.integrations.open_clip",)),
    "docs": (("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"), ()),
}


def main(extra: str) -> int:
    if extra not in IMPORTS:
        print(f"check_extra: no imports listed for the extra {extra!r}; add them to {__file__}", file=sys.stderr)
        return 1
    import torch

    import diffin

    packages, ours = IMPORTS[extra]
    for name in packages:
        importlib.import_module(name)
    present = [m for m in ours if _exists(m)]
    for name in present:
        importlib.import_module(name)
    if extra == "clip":
        from diffin.integrations.open_clip import import_open_clip

        packages = (import_open_clip().__name__,)
    print(f"[{extra}] diffin {diffin.__version__}, torch {torch.__version__}: imported {', '.join(packages)}"
          + (f"; {', '.join(present)}" if present else ""))
    return 0


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
