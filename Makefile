# Two commands do all the set-up on a fresh machine:
#   make demo   - install into .venv, then run the default benchmark (phantom data, CPU)
#   make test   - install into .venv, then run the test suite
# CPU machines take the CPU build of torch; on a GPU machine use `make demo TORCH=torch`
# (or `pip install -e .` in your own CUDA environment).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
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
