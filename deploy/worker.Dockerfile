# The engine worker image: PyTorch with CUDA, the model libraries (open_clip, ultralytics,
# transformers, peft), FAISS, the Qdrant client and Celery. Both worker services use it.
# Built from the repository root (compose does this):
#   docker build -f deploy/worker.Dockerfile -t rapbot-worker:local .
#
# PyPI's Linux x86_64 torch wheels carry the CUDA 12 runtime libraries (the nvidia-* wheels),
# so no CUDA base image is needed: the host provides only the NVIDIA driver, mounted in by the
# NVIDIA Container Toolkit. The same image runs on a CPU (worker-cpu, or no GPU at all).
FROM python:3.11-slim-bookworm

# Another torch build, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu118
# for a driver too old for CUDA 12. Empty: PyPI's default (CUDA 12) build.
ARG TORCH_INDEX_URL=""
# Extras of pyproject.toml: workers (Celery, Redis), convert (SentencePiece, for
# `rapbot models convert`), quant (bitsandbytes, RAPBOT_GENERATOR_LOAD_IN_4BIT/8BIT).
# faiss-cpu stays: FAISS holds only the per-chat photo-search indexes, which are searched
# exactly and are small; the GPU extra's faiss-gpu wheels bring a CUDA runtime of their own
# that can clash with torch's, for no gain here. Concept search runs in Qdrant.
ARG EXTRAS="workers,convert,quant"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The NVIDIA Container Toolkit mounts the driver's compute libraries (and nvidia-smi).
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    # Everything a worker downloads or writes goes to the volumes (see compose.yaml).
    RAPBOT_DATA_DIR=/data \
    HF_HOME=/data/models/huggingface \
    TORCH_HOME=/data/models/torch

# OpenCV (pulled in by ultralytics) needs libGL and GLib even without a display.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# Layers from the least to the most often changed: torch, then the project's dependencies
# (read from pyproject.toml alone), then the project's code.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.2" "torchvision>=0.17"

COPY pyproject.toml /tmp/rapbot/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/rapbot/pyproject.toml', 'rb'))['project']; extras = [e for e in '${EXTRAS}'.split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/rapbot/requirements.txt \
    && pip install -r /tmp/rapbot/requirements.txt

COPY README.md /tmp/rapbot/README.md
COPY engine /tmp/rapbot/engine
COPY workers /tmp/rapbot/workers
COPY bots /tmp/rapbot/bots
COPY rapbot /tmp/rapbot/rapbot
RUN pip install --no-deps /tmp/rapbot \
    && rm -rf /tmp/rapbot \
    && python -c "import torch, torchvision, open_clip, transformers, faiss, qdrant_client, celery, engine.engine, workers.tasks, bots.cli"

# Not root. The volume mount points exist in the image and belong to the worker user, so
# fresh named volumes take that ownership.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin rapbot \
    && mkdir -p /data/models /backup /run/rapbot \
    && chown -R rapbot:rapbot /data /backup /run/rapbot
USER rapbot
WORKDIR /home/rapbot

EXPOSE 9100
CMD ["rapbot", "worker"]
