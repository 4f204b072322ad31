"""The documentation cannot drift from the code.

* Every ```python block of the site's pages (getting started, the guides, tasks, methods) runs, in
  order, in one namespace per page, in a temporary working directory. A page that needs an optional
  framework says so in a comment line ``<!-- requires: transformers, peft -->``; it is skipped with
  that reason where the framework is absent (CI installs every extra, so it runs there).
* ``mkdocs build --strict`` passes (broken links, anchors and docstrings fail it).
* Every relative link of the README resolves to a file of the repository (and an anchor of it).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Reference pages whose code needs data or packages the page does not build (the peers' adapters).
NOT_RUN = {"peers.md", "peers-bench.md", "method.md", "benchmarks.md", "changelog.md", "api.md"}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_REQUIRES = re.compile(r"^<!-- requires: (.+) -->$", re.M)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.name not in NOT_RUN and _BLOCK.search(p.read_text()))


def test_the_guides_have_code() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert {"getting-started.md", "guides/own-loop.md", "guides/optimizers.md"} <= names


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text(encoding="utf-8")
    for line in _REQUIRES.findall(text):
        for name in (n.strip() for n in line.split(",")):
            if importlib.util.find_spec(name) is None:
                pytest.skip(f"{page.name} needs {name} (pip install -e '.[hf,lightning]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(_BLOCK.findall(text)):
        exec(compile(block, f"{page.relative_to(DOCS)} block {i + 1}", "exec"), namespace)  # noqa: S102


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra: pip install -e '.[docs]'")
    proc = subprocess.run(
        # no -q: a quiet build leaves warnings uncounted, and --strict then passes with a broken link
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "guides" / "own-loop" / "index.html").exists()


def _github_slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.exists():
            bad.append(target)
            continue
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {_github_slug(h) for h in headings}:
                bad.append(target)
    assert not bad, f"README links that do not resolve: {bad}"
