# Two commands do all set-up: `make demo` and `make test`.
# The virtual environment sees the interpreter's own site-packages, so a torch build that
# is already installed (a CUDA one, say) is kept; only when none is importable is the CPU
# build `torch==$(TORCH_VERSION)` installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdaudit-installed

.PHONY: install demo test test-fast clean smoke bench reports

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdaudit run --preset demo

smoke: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdaudit run --preset smoke

# one test process per core (pytest-xdist); a test file stays in one process, so its
# module fixtures (trained models) are built once
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# the reference report: the tiny suite (3 seeds; resumes, never redoes a finished run), then
# its tables copied to reports/tiny/ and the report rendered there
BENCH_OUT ?= runs/benchmarks
reports: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdaudit benchmark tiny --out $(BENCH_OUT) --publish reports

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.perf

clean:
	rm -rf $(VENV) runs .pytest_cache
