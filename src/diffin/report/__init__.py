"""Figures and reports of the demo and the data-centric tasks.

Figures are PNGs drawn with matplotlib's Agg backend (an optional dependency, imported only when a
figure is drawn) and written atomically. A :class:`Report` is built once from headings,
paragraphs, tables and figures and written twice: ``report.md`` (figures linked) and
``report.html`` (one self-contained file, figures embedded as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, write_text
from .._optional import require


def _pyplot() -> Any:
    mpl = require("matplotlib", "matplotlib", "drawing report figures")
    mpl.use("Agg")
    return require("matplotlib.pyplot", "matplotlib", "drawing report figures")


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()

    def w(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, w)


def score_histograms(
    path: str | os.PathLike[str], scores: Mapping[str, np.ndarray], flipped: np.ndarray,
    xlabel: str | Mapping[str, str] = "validation loss change if removed",
) -> None:
    """One histogram per method of its values (N,), clean and flipped samples overlaid.

    ``xlabel``: what the values are, one label for all panels or one per method (e.g.
    ``"self-influence"``, ``"training loss at θ_T"``)."""
    plt = _pyplot()
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    flipped = np.asarray(flipped, dtype=bool)
    for ax, (name, s) in zip(axes[0], scores.items()):
        s = np.asarray(s, dtype=np.float64)
        lo, hi = np.percentile(s, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
        ax.hist(s[~flipped], bins=bins, alpha=0.6, label=f"clean ({(~flipped).sum():,})", density=True)
        ax.hist(s[flipped], bins=bins, alpha=0.6, label=f"flipped ({flipped.sum():,})", density=True)
        if lo < 0 < hi:
            ax.axvline(0, color="k", lw=0.6)
        ax.set_title(name)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[name], fontsize=9)
        ax.locator_params(axis="x", nbins=4)
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.2g}")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def image_grid(
    path: str | os.PathLike[str], images: np.ndarray, captions: Sequence[str], side: int,
    title: str = "",
) -> None:
    """A grid of square grey images (rows of ``images`` flattened, side×side), each with its
    caption below (captions may hold several lines, e.g. id and label, then the score)."""
    plt = _pyplot()
    k = len(images)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, (1.6 + 0.22 * lines) * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < k:
            ax.imshow(np.asarray(images[i]).reshape(side, side), cmap="gray_r")
            ax.set_xlabel(captions[i], fontsize=7, linespacing=1.15)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def scatter(
    path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str = ""
) -> None:
    """Predicted vs actual with the y = x line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(x, y, s=10, alpha=0.7)
    lo = float(min(np.min(x), np.min(y)))
    hi = float(max(np.max(x), np.max(y)))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7, label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def curves(
    path: str | os.PathLike[str], xs: Mapping[str, Sequence[float]], ys: Mapping[str, Sequence[float]],
    errs: Mapping[str, Sequence[float]] | None, xlabel: str, ylabel: str, title: str = "",
) -> None:
    """One line per method (with error bars when given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for name in ys:
        e = None if errs is None else errs.get(name)
        ax.errorbar(xs[name], ys[name], yerr=e, marker="o", ms=3, capsize=2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------------- text
def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats shown with 4 significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table for the terminal."""
    cells = [list(header)] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_sizes(sizes: Mapping[str, int]) -> str:
    """``{"train": 4000, "val": 500}`` → ``"train 4,000 · val 500"``."""
    return " · ".join(f"{k} {int(v):,}" for k, v in sizes.items())


def format_list(values: Sequence[object]) -> str:
    """``[0, 1, 2]`` → ``"0, 1, 2"``."""
    return ", ".join(_fmt(v) for v in values)


def winner(values: Mapping[str, float], what: str, higher_is_better: bool = True) -> dict[str, Any]:
    """Which method won on ``values`` (method → number; NaNs ignored) and by how much: ``method``,
    ``value``, ``runner_up``, ``lead`` (the margin over the runner-up, ≥ 0, in ``what``'s units)
    and ``line``, one sentence for reports (e.g. "Best by ROC-AUC: cleanlab (0.951), 0.036 above
    tracin-self (0.915)")."""
    vals = {m: float(v) for m, v in values.items() if v is not None and np.isfinite(v)}
    if not vals:
        return {"method": None, "value": None, "runner_up": None, "lead": None, "line": f"No method has a {what}."}
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(vals, key=lambda m: -sign * vals[m])
    best = order[0]
    out: dict[str, Any] = {"method": best, "value": vals[best], "runner_up": None, "lead": None}
    line = f"Best by {what}: {best} ({_fmt(vals[best])})"
    if len(order) > 1:
        second = order[1]
        out["runner_up"], out["lead"] = second, sign * (vals[best] - vals[second])
        line += f", {_fmt(out['lead'])} {'above' if higher_is_better else 'below'} {second} ({_fmt(vals[second])})"
    out["line"] = line + "."
    return out


class Report:
    """A report built from blocks and written as Markdown and as self-contained HTML.

    Paragraph text may use Markdown's ``**bold**`` and ```code``` inline marks.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self._blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self._blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self._blocks.append(("table", (list(header), [list(r) for r in rows])))

    def figure(self, filename: str, alt: str) -> None:
        """A PNG already written beside the report (``filename`` relative to the report's folder)."""
        self._blocks.append(("img", (filename, alt)))

    def markdown(self) -> str:
        parts = [f"# {self.title}"]
        for kind, v in self._blocks:
            if kind == "h2":
                parts.append(f"## {v}")
            elif kind == "p":
                parts.append(v)
            elif kind == "table":
                parts.append(markdown_table(*v))
            else:
                parts.append(f"![{v[1]}]({v[0]})")
        return "\n\n".join(parts) + "\n"

    def html(self, folder: str | os.PathLike[str]) -> str:
        """The report as one HTML page; figures are read from ``folder`` and embedded."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, v in self._blocks:
            if kind == "h2":
                body.append(f"<h2>{html.escape(v)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(v)}</p>")
            elif kind == "table":
                header, rows = v
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
                              for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            else:
                data = base64.b64encode((Path(folder) / v[0]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(v[1])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(v[1])}</figcaption></figure>")
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n"
        )

    def write(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``report.md`` and ``report.html`` into ``folder``; returns their paths."""
        folder = Path(folder)
        md, page = folder / "report.md", folder / "report.html"
        write_text(md, self.markdown())
        write_text(page, self.html(folder))
        return md, page


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1rem 0}"
    "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "figure{margin:1rem 0}figcaption{color:#666;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}"
)


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)
