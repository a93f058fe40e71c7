# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv, install, run the offline quickstart (CPU)
#   make test   # create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is enough for everything here; override for a CUDA build.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) benchmarks/activation_memory.py --quick

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
