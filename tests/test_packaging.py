"""What installing diffin brings: scoring needs only torch, numpy, safetensors, scipy and tqdm.

matplotlib, scikit-learn, mlxtend (the ``tasks`` extra) and psutil must stay out of the core
dependencies and must not be imported by ``import diffin`` or by a scoring call. The import check
runs in a fresh interpreter, so what earlier tests imported does not count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "sklearn", "mlxtend", "psutil")  # import names
OPTIONAL_DISTS = ("matplotlib", "scikit-learn", "mlxtend", "psutil")  # distribution names

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    import torch.nn.functional as F
    from torch import nn

    import diffin

    after_import = sorted(m for m in {optional!r} if m in sys.modules)

    def loss(o, y):
        return F.cross_entropy(o, y, reduction="none")

    torch.manual_seed(0)
    X, Y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    Xv, Yv = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        rec = diffin.Recorder(tmp + "/run", model, optimizer=opt, checkpoint_every=2)
        for step in range(6):
            ids = torch.arange(12)[(step % 3) * 4:(step % 3) * 4 + 4]
            opt.zero_grad()
            loss(model(X[ids]), Y[ids]).mean().backward()
            opt.step()
            rec.step(ids)
        rec.close()
        finite = {{}}
        for method in ("diffin", "diffin-closed-form", "tracin", "if-cg"):
            res = diffin.score(tmp + "/run", make(), loss, train=(X, Y), target=(Xv, Yv), method=method,
                               progress=False)
            finite[method] = bool(torch.as_tensor(res.scores).isfinite().all())
        s = diffin.influence(tmp + "/run", make(), loss, train=(X, Y), target="self", progress=False)
        finite["self"] = bool(torch.as_tensor(s).isfinite().all())
    after_scoring = sorted(m for m in {optional!r} if m in sys.modules)
    print(json.dumps({{"after_import": after_import, "after_scoring": after_scoring, "finite": finite}}))
    """
).format(optional=OPTIONAL)


@pytest.fixture(scope="module")
def imported() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_diffin_imports_no_optional_package(imported: dict) -> None:
    assert imported["after_import"] == []


def test_scoring_imports_no_optional_package(imported: dict) -> None:
    """Recording, then scoring with the sweep, the closed form, TracIn, the influence function
    (scipy's Lanczos included) and self-influence: none of the four optional packages is imported
    on the way."""
    assert all(imported["finite"].values()), imported["finite"]
    assert imported["after_scoring"] == []


def _core_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the one list by hand
        m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
        assert m, "pyproject.toml has no [project] dependencies list"
        return re.findall(r'"([^"]+)"', m.group(1))
    return tomllib.loads(text)["project"]["dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_are_what_scoring_needs() -> None:
    names = {_name(r) for r in _core_dependencies()}
    assert not names & set(OPTIONAL_DISTS), names
    assert {"torch", "numpy", "safetensors", "tqdm"} <= names


def test_tasks_extra_carries_the_optional_packages_and_test_includes_it() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:
        pytest.skip("tomllib needs Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"matplotlib", "scikit-learn", "mlxtend"} <= {_name(r) for r in extras["tasks"]}
    assert "diffin[tasks]" in extras["test"]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_lives_in_one_place() -> None:
    """pyproject.toml reads the version from ``diffin/_version.py``; nothing else states it."""
    import diffin

    doc = _pyproject()
    assert "version" not in doc["project"] and "version" in doc["project"]["dynamic"]
    assert doc["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffin._version.__version__"}
    assert diffin.__version__ == re.search(r'__version__ = "([^"]+)"', (ROOT / "src/diffin/_version.py").read_text())[1]


def test_py_typed_ships() -> None:
    assert (ROOT / "src/diffin/py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["diffin"]


def test_every_extra_is_checked_on_its_own_and_test_carries_the_frameworks() -> None:
    """Each extra has its imports listed in tools/check_extra.py (tools/check_packaging.sh installs
    it alone in a fresh venv and imports them); the test extra brings hf, lightning and hypothesis."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_extra
    finally:
        sys.path.pop(0)
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"tasks", "peers", "hf", "lightning", "docs"} <= set(extras)
    assert set(extras) - {"test"} <= set(check_extra.IMPORTS)
    assert {"diffin[hf]", "diffin[lightning]"} <= set(extras["test"])
    assert "hypothesis" in {_name(r) for r in extras["test"]}
    assert not any(_name(r) == "torch" for name, reqs in extras.items() for r in reqs), "an extra must not pin torch"


@pytest.mark.slow
def test_the_wheel_and_sdist_build_with_what_they_should_hold(tmp_path: Path) -> None:
    """``python -m build`` (without isolation, from the installed setuptools): the wheel holds the
    package with py.typed and the built-in setups and no tests, under the version of _version.py;
    the sdist holds the tests and tools too. tools/check_packaging.sh installs them (in CI)."""
    pytest.importorskip("build")
    import tarfile
    import zipfile

    import diffin

    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next(tmp_path.glob(f"diffin-{diffin.__version__}-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"diffin/py.typed", "diffin/bench/builtin/setups.py", "diffin/recording/recorder.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    meta = zipfile.ZipFile(wheel).read(f"diffin-{diffin.__version__}.dist-info/METADATA").decode()
    assert {"tasks", "peers", "hf", "lightning", "docs"} <= {
        line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    sdist = next(tmp_path.glob(f"diffin-{diffin.__version__}.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"src/diffin/py.typed", "pyproject.toml", "README.md"} <= members
