# Two commands do all the set-up on a fresh machine:
#   make demo   - install into .venv, then run the default benchmark (phantom data, CPU)
#   make test   - install into .venv, then run the test suite
# TORCH is what pip installs first: torch==2.13.0 resolves to whatever build pip's indexes
# offer (a local CPU wheel where one is configured; PyPI's Linux wheel is the CUDA build).
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's index;
# on a GPU machine use `make demo TORCH=torch` (or `pip install -e .` in your CUDA environment).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fsmis-bench run

test: install
	$(PY) -m pytest -n 2

bench: install
	$(PY) -m pytest benchmarks --benchmark-only -p no:xdist

.PHONY: install demo test bench
