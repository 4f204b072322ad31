"""Figures and Markdown reports (PNG via matplotlib's Agg backend; written atomically)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._io import atomic_write, write_text  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()

    def w(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, w)


def score_histograms(
    path: str | os.PathLike[str], scores: Mapping[str, np.ndarray], flipped: np.ndarray
) -> None:
    """One histogram per method of the scores, clean and flipped samples overlaid."""
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        lo, hi = np.percentile(s, [0.5, 99.5])
        bins = np.linspace(lo, hi, 50)
        ax.hist(s[~flipped], bins=bins, alpha=0.6, label=f"clean ({(~flipped).sum()})", density=True)
        ax.hist(s[flipped], bins=bins, alpha=0.6, label=f"flipped ({flipped.sum()})", density=True)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(name)
        ax.set_xlabel("loss change if removed")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def image_grid(
    path: str | os.PathLike[str], images: np.ndarray, captions: Sequence[str], side: int,
    title: str = "",
) -> None:
    """A grid of square grey images (rows of ``images`` flattened, side×side) with captions."""
    k = len(images)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            ax.imshow(images[i].reshape(side, side), cmap="gray_r")
            ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def scatter(
    path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str = ""
) -> None:
    """Predicted vs actual with the y = x line."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(x, y, s=10, alpha=0.7)
    lo = float(min(np.min(x), np.min(y)))
    hi = float(max(np.max(x), np.max(y)))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _save(fig, path)


def curves(
    path: str | os.PathLike[str], xs: Mapping[str, Sequence[float]], ys: Mapping[str, Sequence[float]],
    errs: Mapping[str, Sequence[float]] | None, xlabel: str, ylabel: str, title: str = "",
) -> None:
    """One line per method (with error bars when given)."""
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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats shown with 4 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table for the terminal."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [list(header)] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_report(path: str | os.PathLike[str], text: str) -> Path:
    write_text(path, text)
    return Path(path)
