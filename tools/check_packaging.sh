#!/bin/sh
# Packaging as users install it (run by .ci/run; `make packaging`):
#   1. `python -m build` makes a wheel and an sdist;
#   2. the wheel installs in a fresh venv and runs examples/quickstart.py from outside the
#      source tree; the sdist installs in another and imports with the same version;
#   3. every extra the wheel declares (tasks, peers, hf, lightning, docs, ...) installs on its own
#      into a fresh venv and its packages import, with the diffin modules that use them.
# PyTorch is installed first ($TORCH, default the pinned CPU build torch==2.13.0) and a constraints
# file pins that exact build for every later install, so no extra can replace it (pip fails
# instead). To keep CI short torch is installed once, in a base venv, which the other venvs see
# through a .pth file placed last on their path: each venv still gets every other package on its
# own. Needs Python >= 3.10 and PyPI. The venvs take about 4.5 GB: without WORK they go to a
# temporary folder removed when the script ends (also on failure); WORK=dir keeps them, with the
# dist/ folder, in dir.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/diffin-packaging.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
log() { printf '[check_packaging] %s\n' "$*"; }

log "work folder: $WORK"
rm -rf "$WORK/dist" "$WORK/base" "$WORK/venvs"
mkdir -p "$WORK/venvs"

# 1. build --------------------------------------------------------------------------------------
$PYTHON -m venv "$WORK/base"
BASE="$WORK/base/bin/python"
"$BASE" -m pip install -q build
"$BASE" -m build -q --outdir "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/diffin-*.whl)
SDIST=$(ls "$WORK"/dist/diffin-*.tar.gz)
log "built $(basename "$WHEEL") and $(basename "$SDIST")"

# torch once, pinned for every later install --------------------------------------------------
# shellcheck disable=SC2086  # TORCH may hold pip options (--index-url ...)
"$BASE" -m pip install -q $TORCH
"$BASE" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$WORK/constraints.txt"
log "pinned $(cat "$WORK/constraints.txt")"
BASE_SITE=$("$BASE" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

fresh() {  # fresh NAME: a venv seeing the base's torch; prints its python
    v="$WORK/venvs/$1"
    $PYTHON -m venv "$v"
    site=$("$v/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$BASE_SITE" > "$site/zz_diffin_check_torch.pth"
    echo "$v/bin/python"
}

# 2. the wheel runs the quickstart; the sdist installs ------------------------------------------
PY=$(fresh wheel)
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$WHEEL" scikit-learn
(cd "$WORK" && "$PY" "$ROOT/examples/quickstart.py")
"$PY" - "$WHEEL" <<'PYEOF'
import importlib.resources, sys, zipfile
import diffin
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "diffin/py.typed" in names, "py.typed is not in the wheel"
assert not any(n.startswith("tests/") for n in names), "the wheel carries the tests"
assert importlib.resources.files("diffin").joinpath("py.typed").is_file()
assert f"diffin-{diffin.__version__}" in sys.argv[1], (diffin.__version__, sys.argv[1])
print("wheel: diffin", diffin.__version__, "from", diffin.__file__)
PYEOF
WHEEL_VERSION=$("$PY" -c "import diffin; print(diffin.__version__)")

PY=$(fresh sdist)
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$SDIST"
(cd "$WORK" && "$PY" -c "import diffin, sys; assert diffin.__version__ == sys.argv[1], diffin.__version__; \
print('sdist: diffin', diffin.__version__)" "$WHEEL_VERSION")

# 3. each extra on its own ----------------------------------------------------------------------
EXTRAS=$("$BASE" - "$WHEEL" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
extras = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Provides-Extra:")]
print(" ".join(e for e in extras if e != "test"))
PYEOF
)
log "extras: $EXTRAS"
for extra in $EXTRAS; do
    PY=$(fresh "extra-$extra")
    log "[$extra] installing"
    "$PY" -m pip install -q -c "$WORK/constraints.txt" "$WHEEL[$extra]"
    (cd "$WORK" && "$PY" "$ROOT/tools/check_extra.py" "$extra")
    got=$("$PY" -c "import torch; print('torch==' + torch.__version__)")
    [ "$got" = "$(cat "$WORK/constraints.txt")" ] || { log "[$extra] torch changed to $got"; exit 1; }
done
log "all good: wheel, sdist and extras ($EXTRAS) install and import; torch stayed $(cat "$WORK/constraints.txt")"
