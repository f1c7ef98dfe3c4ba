# eplb_pynccl: the two commands users run are `make bench` and `make test`.
#
# Python: the ambient interpreter when it already has everything (a GPU machine with torch,
# NCCL and cupy preinstalled, possibly without network); otherwise a virtual environment in
# .venv with the package, its `test` and `cu12` extras, and the CPU torch on machines without
# an NVIDIA driver.

PYTHON ?= python3
VENV ?= .venv
# torch for machines without a GPU (a CPU build where the local index has one).
TORCH_CPU_SPEC ?= torch==2.13.0
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
AMBIENT_OK := $(shell $(PYTHON) -c "import numpy, torch, pytest, hypothesis, importlib.util as u; assert u.find_spec('nvidia.nccl') or u.find_spec('torch')" >/dev/null 2>&1 && echo yes)

ifeq ($(AMBIENT_OK)$(FORCE_VENV),yes)
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif

# NVLink multicast stays off everywhere this project starts NCCL.
export NCCL_NVLS_ENABLE ?= 0
export TORCH_SYMM_MEM_DISABLE_MULTICAST ?= 1
export NVSHMEM_DISABLE_NVLS ?= 1
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test test-gpu test-vllm test-sglang bench example lint test-abi setup clean

# make test-vllm: a second environment (never the ambient Python) with CPU torch, vLLM without
# its dependencies and the pinned pure-Python ones its EPLB modules import.
VLLM_VENV ?= .venv-vllm
VLLM_VERSION ?= 0.33.0
VLLM_REQS := tests_vllm/requirements-cpu-$(VLLM_VERSION).txt

# make test-sglang: the same for SGLang (CPU torch, SGLang without its dependencies, the pinned
# ones its EPLB modules import: real triton among them).
SGLANG_VENV ?= .venv-sglang
SGLANG_VERSION ?= 0.5.23
SGLANG_REQS := tests_sglang/requirements-cpu-sglang-$(SGLANG_VERSION).txt

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
ifeq ($(GPU),yes)
	$(VENV)/bin/python -m pip install -q -e '.[test,cu12,torch,bench]'
else
	$(VENV)/bin/python -m pip install -q '$(TORCH_CPU_SPEC)'
	$(VENV)/bin/python -m pip install -q -e '.[test,cu12,bench]'
endif
	touch $@

setup: $(SETUP)

# The package and its test tools first (they resolve their own dependencies), then vLLM and its
# pins with --no-deps (vLLM's CUDA dependencies are never installed; pip would otherwise pull
# a CUDA torch of several GB).
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_REQS)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q '$(TORCH_CPU_SPEC)'
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[test]'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps vllm==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_REQS)
	touch $@

$(SGLANG_VENV)/.installed: pyproject.toml $(SGLANG_REQS)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q '$(TORCH_CPU_SPEC)'
	$(SGLANG_VENV)/bin/python -m pip install -q -e '.[test]'
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==$(SGLANG_VERSION)
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps -r $(SGLANG_REQS)
	touch $@

## make test: the whole suite (GPU tests skip, with their reason, where there is no GPU).
test: $(SETUP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

## make test-vllm: eplb_pynccl inside vLLM's own EPLB code, on gloo CPU processes (tests_vllm/).
test-vllm: $(VLLM_VENV)/.installed
	VLLM_TARGET_DEVICE=cpu $(VLLM_VENV)/bin/python -m pytest tests_vllm $(PYTEST_ARGS)

## make test-sglang: eplb_pynccl inside SGLang's own EPLB code, on gloo CPU processes (tests_sglang/).
test-sglang: $(SGLANG_VENV)/.installed
	$(SGLANG_VENV)/bin/python -m pytest tests_sglang $(PYTEST_ARGS)

## make test-gpu: only the GPU suite, with the Python already there (no install). It fails when
## no test passed and EPLB_PYNCCL_REQUIRE_GPU=1, the default where nvidia-smi lists a GPU
## (tests/require_gpu.py), so a GPU runner that cannot run the suite does not pass green.
test-gpu:
	EPLB_PYNCCL_REQUIRE_GPU=$${EPLB_PYNCCL_REQUIRE_GPU:-$(if $(GPU),1,0)} \
	  $(PYTHON) -m pytest tests -m gpu -p tests.require_gpu $(PYTEST_ARGS)

## make bench: every part the machine can run (see bench/README.md or `python -m bench.run -h`).
bench: $(SETUP)
	$(PY) -m bench.run $(BENCH_ARGS)

## make example: the README's runnable example (2 CPU processes over gloo), with the same Python.
example: $(SETUP)
	$(PY) examples/shuffle_gloo.py

## make lint: ruff (check and format --check) over the package, tests, bench, tools and examples,
## then mypy over the package (its configuration is in pyproject.toml), at the versions of
## pyproject.toml's `lint` extra (installed first where another version or none is there).
LINT_PINS := $(shell sed -n 's/^lint = \[\(.*\)\]$$/\1/p' pyproject.toml | tr -d '",')
LINT_PATHS := eplb_pynccl tests tests_vllm tests_sglang bench tools examples
lint: $(SETUP)
	@$(PY) -c 'import sys, importlib.metadata as m; sys.exit(any(m.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))' $(LINT_PINS) 2>/dev/null || $(PY) -m pip install -q $(LINT_PINS)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

## make test-abi: load one nvidia-nccl-cu12 wheel per NCCL minor (2.19 .. newest); downloads GBs.
test-abi: $(SETUP)
	$(PY) tools/abi_matrix.py

## make clean: the environments make built, bench output, the tools' caches and build output.
clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) bench_out .pytest_cache .hypothesis .mypy_cache .ruff_cache build *.egg-info dist
