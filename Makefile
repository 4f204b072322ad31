# Two entry points: `make demo` and `make test`. Each creates and uses ./.venv.
# PyTorch: the CPU build 2.13.0 (a local file on the project machines). Elsewhere, pick yours:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.diffin-installed

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffin demo --out diffin-demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/speed.py --json bench-out/speed.json

clean-venv:
	rm -rf $(VENV)
