# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick lab clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	$(PY) -m ipykernel install --sys-prefix --name rating-edge --display-name "Rating Edge (project)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/workbench demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# BENCH_ARGS: extra run_all.py options, e.g. BENCH_ARGS="--lock /var/lock/bench" on a shared machine
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --MappingKernelManager.default_kernel_name=rating-edge notebooks

clean:
	rm -rf $(VENV) build *.egg-info results
