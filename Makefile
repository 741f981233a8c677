# Entry points for a fresh machine that has only Python and pip:
#   make demo   installs masm into .venv and runs the offline end-to-end demo
#   make test   installs masm with its test extras into .venv, then lint, the docs build and the test suite
#   make docs   builds the documentation site into site/ (warnings are errors)
#   make gpu-check  (on a GPU machine) checks the CUDA path and writes benchmarks/results/gpu_check.json
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject, which declares a range): this exact CPU build is served from
# local disk on our machines, while a bare `torch` requirement would pull a several-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test docs lint format clean gpu-check

$(BIN)/masm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[all]"
	touch $(BIN)/masm

install: $(BIN)/masm

demo: install
	$(BIN)/masm demo --out demo_out

test: install
	$(BIN)/ruff check src tests benchmarks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest

# The site under site/: the CLI and config references are generated from the code at build time.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# On a GPU machine (with a CUDA torch in .venv): bf16 vs fp32 steps on ViT-L/14 shapes, cuda_graph training
# against eager, torchrun with NCCL through masm train, and masm bench speed --device cuda (ViT-B/16 and
# ViT-L/14 shapes, eager, captured and compiled); <= 9 min 20 s, report in benchmarks/results/.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check.json

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
