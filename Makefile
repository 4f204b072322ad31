# Entry points: `make demo` and `make test` (each creates and uses ./.venv), `make packaging`.
# `make demo` installs diffin with the `tasks` extra (demo, tasks, bench, reports, built-in data);
# `make test` installs the `test` extra (the tasks extra, pytest, ruff, cleanlab).
# PyTorch: the CPU build 2.13.0 (a local file on the project machines). Elsewhere, pick yours:
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: demo test test-clip lint bench packaging clean-venv

$(VENV)/.diffin-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.diffin-tasks
	$(VENV)/bin/diffin demo --out diffin-demo

test: $(VENV)/.diffin-test
	$(VENV)/bin/ruff check src tests benchmarks examples tools
	$(PY) -m pytest -q --durations=10

# open_clip imports torchvision, whose PyPI wheel (a CUDA build) imports next to the CPU torch only
# through diffin.integrations.open_clip.import_open_clip, and breaks `import transformers` models
# elsewhere: the open_clip tests run in a venv of their own (docs/guides/open_clip.md).
CLIP_VENV ?= .venv-clip
test-clip:
	test -x $(CLIP_VENV)/bin/python || $(PYTHON) -m venv $(CLIP_VENV)
	$(CLIP_VENV)/bin/python -c "import torch" 2>/dev/null || $(CLIP_VENV)/bin/python -m pip install -q $(TORCH)
	$(CLIP_VENV)/bin/python -m pip install -q -e '.[clip]' pytest
	$(CLIP_VENV)/bin/python -m pytest -q tests/test_open_clip.py

lint: $(VENV)/.diffin-test
	$(VENV)/bin/ruff check src tests benchmarks examples tools

bench: $(VENV)/.diffin-tasks
	$(PY) benchmarks/speed.py --json bench-out/speed.json

# The wheel and sdist as users install them, each extra on its own (fresh venvs; see the script).
packaging:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" sh tools/check_packaging.sh

clean-venv:
	rm -rf $(VENV) $(CLIP_VENV)
