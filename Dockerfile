# CPU image of the ragline gateway with the embedded engine and SmolLM2 baked in.
#   docker build -t ragline . && docker run -p 8000:8000 -e RAGLINE_ADMIN_KEY=... ragline
# It listens on 0.0.0.0, so it refuses to start without keys (RAGLINE_ADMIN_KEY or a config).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RAGLINE_HOST=0.0.0.0 \
    RAGLINE_PORT=8000 \
    RAGLINE_MODELS_DIR=/models

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY gateway ./gateway
COPY rag ./rag
COPY safety ./safety
COPY prompts ./prompts
COPY finetune ./finetune
COPY benchmarks ./benchmarks

# Every dependency pinned with its hashes (torch's CPU build from PyTorch's index), then the
# project itself.
RUN pip install --require-hashes --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.lock \
 && pip install --no-deps .

# Not root: the model, stores and caches belong to an unprivileged user.
RUN useradd --create-home --uid 10001 ragline \
 && mkdir -p /models \
 && chown ragline:ragline /models
USER ragline
RUN ragline models pull

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
CMD ["ragline", "serve"]
