"""MkDocs hooks for the diffin site: pages that show a file from the repository's root.

A page whose Markdown holds the line ``<!-- include: BENCHMARKS.md -->`` gets that file's text in its
place (BENCHMARKS.md and CHANGELOG.md stay where people and tools expect them, at the root, and the
site shows them without a copy). Links inside the included file are written for the root: a link
into ``docs/`` is rewritten relative to the docs folder, and a link to another file of the
repository (a script, an example) becomes its path in code, since the site does not serve it.
"""

from __future__ import annotations

import re
from pathlib import Path

_INCLUDE = re.compile(r"^<!-- include: (?P<path>[\w./-]+) -->$", re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")
_IMAGE = re.compile(r"!\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def _rewrite(text: str, docs_prefix: str) -> str:
    """Links of a root-level file, made valid from a page in the docs folder's top level."""

    def target(t: str) -> str | None:
        if t.startswith(("http://", "https://", "#", "mailto:")):
            return t
        path, _, anchor = t.partition("#")
        if path.startswith(docs_prefix):
            rel = path[len(docs_prefix):]
            if rel.endswith("/"):
                if not rel.startswith("bench-scale-pairs"):
                    return None  # a folder of data files: the site does not list folders
                rel += "README.md"
            return rel + (f"#{anchor}" if anchor else "")
        if path in ("BENCHMARKS.md",):
            return "benchmarks.md" + (f"#{anchor}" if anchor else "")
        if path in ("CHANGELOG.md",):
            return "changelog.md" + (f"#{anchor}" if anchor else "")
        if path in ("README.md", ""):
            return "index.md" + (f"#{anchor}" if anchor else "")
        return None

    def link(m: re.Match[str]) -> str:
        t = target(m["target"])
        return f"[{m['text']}]({t})" if t else f"{m['text']} (`{m['target']}`)"

    def image(m: re.Match[str]) -> str:
        t = target(m["target"])
        return f"![{m['text']}]({t})" if t else f"*({m['text']}: `{m['target']}`)*"

    return _LINK.sub(link, _IMAGE.sub(image, text))


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs hook signature)
    root = Path(config["config_file_path"]).parent
    docs = Path(config["docs_dir"]).resolve()
    prefix = docs.relative_to(root.resolve()).as_posix() + "/"
    if "/" not in page.file.src_uri:
        # a top-level page written for GitHub links to root files as ../X: the same rewrite
        markdown = _rewrite(re.sub(r"\]\(\.\./", "](", markdown), prefix)

    def include(m: re.Match[str]) -> str:
        path = (root / m["path"]).resolve()
        if root.resolve() not in path.parents:
            raise ValueError(f"include outside the repository: {m['path']}")
        return _rewrite(path.read_text(encoding="utf-8"), prefix)

    return _INCLUDE.sub(include, markdown)
