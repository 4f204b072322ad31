"""The floor plan of the package, read from the source (no imports run):

* arrows run down the house: the core never imports the benchmark harness (``diffin.bench``), the
  tasks (``diffin.tasks``) or the command line (``diffin.cli``); the bench and the tasks never
  import the command line, and the bench never imports the tasks;
* no import circle among diffin's modules (every import statement counts, those inside functions
  and under ``TYPE_CHECKING`` too: a circle deferred to call time is still a circle);
* no source file above :data:`MAX_LINES` lines without a ``# Long file: <reason>`` comment near
  its top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600
REASON = "# Long file:"
REASON_WITHIN = 40  # lines from the top

UPPER = ("diffin.bench", "diffin.tasks", "diffin.cli", "diffin.__main__")
"""The floors above the core; every other module of diffin is core."""
MAY_NOT_IMPORT = {
    "core": UPPER,
    "diffin.bench": ("diffin.tasks", "diffin.cli", "diffin.__main__"),
    "diffin.tasks": ("diffin.cli", "diffin.__main__"),
    "diffin.cli": (),
    "diffin.__main__": (),
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def floor(module: str) -> str:
    """The floor of a module: one of :data:`UPPER`, else ``"core"``."""
    return next((u for u in UPPER if _within(module, u)), "core")


def modules(src: Path, package: str = "diffin") -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package ``__init__``) of every module under ``src/<package>``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(src: Path, package: str = "diffin") -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports (``from pkg import sub`` names the submodule
    ``pkg.sub`` when it is one; otherwise the nearest enclosing module)."""
    mods = modules(src, package)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(t for a in node.names if (t := known(a.name)) is not None)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if not _within(origin, package):
                    continue
                for a in node.names:
                    full = f"{origin}.{a.name}"
                    t = full if full in mods else known(origin)
                    if t is not None:
                        targets.add(t)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a floor that :data:`MAY_NOT_IMPORT` forbids."""
    bad = []
    for m, targets in sorted(graph.items()):
        banned = MAY_NOT_IMPORT[floor(m)]
        bad += [f"{m} -> {t}" for t in sorted(targets) if any(_within(t, b) for b in banned)]
    return bad


def long_files_without_reason(src: Path, package: str = "diffin") -> list[str]:
    out = []
    for path, _ in modules(src, package).values():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) <= MAX_LINES:
            continue
        head = lines[:REASON_WITHIN]
        if not any(ln.startswith(REASON) and len(ln[len(REASON):].split()) >= 5 for ln in head):
            out.append(f"{path.relative_to(src)}: {len(lines)} lines")
    return out


def test_the_core_never_imports_the_floors_above_it() -> None:
    assert upward_imports(import_graph(SRC)) == []


def test_no_import_circles() -> None:
    assert cycles(import_graph(SRC)) == []


def test_long_files_say_why() -> None:
    assert long_files_without_reason(SRC) == [], (
        f"split the file by concern, or write '{REASON} <why it is one thing>' within its first "
        f"{REASON_WITHIN} lines"
    )


def test_the_floors_are_where_the_checks_look() -> None:
    """The floors named in the checks exist (a rename would otherwise pass them vacuously)."""
    mods = modules(SRC)
    for upper in UPPER:
        assert upper in mods, upper
    assert floor("diffin.bench.builtin.setups") == "diffin.bench" and floor("diffin._api") == "core"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "diffin" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("second", ["from .a import x\n", "def f():\n    from . import a\n",
                                    "import diffin.a\n"])
def test_the_checks_see_a_planted_circle(tmp_path: Path, second: str) -> None:
    src = _package(tmp_path, {"__init__.py": "", "a.py": "from .b import y\n", "b.py": second})
    assert cycles(import_graph(src)) == [["diffin.a", "diffin.b"]]


def test_the_checks_see_a_planted_upward_import(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "__init__.py": "", "core.py": "from .bench.builtin import setups\n",
        "bench/__init__.py": "", "bench/builtin/__init__.py": "", "bench/builtin/setups.py": "from ...cli import x\n",
        "cli/__init__.py": "x = 1\n", "tasks/__init__.py": "from ..bench.builtin import setups\n",
    })
    assert upward_imports(import_graph(src)) == [
        "diffin.bench.builtin.setups -> diffin.cli", "diffin.core -> diffin.bench.builtin.setups",
    ]


def test_the_checks_see_a_long_file_without_a_reason(tmp_path: Path) -> None:
    body = "x = 1\n" * (MAX_LINES + 1)
    src = _package(tmp_path, {"__init__.py": "", "long.py": body,
                              "why.py": f'"""Doc."""\n{REASON} one table of constants, read as one\n' + body})
    assert long_files_without_reason(src) == [f"diffin/long.py: {MAX_LINES + 1} lines"]
