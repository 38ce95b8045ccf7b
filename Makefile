# Two entry points set up a fresh machine on their own:
#   make demo   -> the main job on the embedded default (no downloads)
#   make test   -> the test suite
# TORCH_SPEC is installed first so pip does not pull a multi-GB CUDA build on CPU machines;
# override it, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/data_reweighting.py --overwrite_output_dir

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/ihvp_accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info
