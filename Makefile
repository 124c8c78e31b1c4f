# Two commands do all set-up: `make demo` and `make test`.
# The virtual environment sees the interpreter's own site-packages, so a torch build that
# is already installed (a CUDA one, say) is kept; only when none is importable is the CPU
# build `torch==$(TORCH_VERSION)` installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdaudit-installed

.PHONY: install demo test test-fast clean smoke bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdaudit run --preset tiny

smoke: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdaudit run --preset smoke

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.perf

clean:
	rm -rf $(VENV) runs .pytest_cache
