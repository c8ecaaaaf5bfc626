# reformer-chat service image: `docker compose up` builds it (see README, "Operations").
#
#   docker build -t reformer-chat .                              # CPU build of torch (the default)
#   docker build -t reformer-chat --build-arg TORCH_VARIANT=cu130 .   # a CUDA build, for GPU hosts
#
# Layers go from least to most often changed, so editing the code rebuilds only the last few: torch,
# then the other dependencies (read from pyproject.toml alone), then the checkpoint, then the source.

FROM python:3.11-slim

# Which PyTorch wheel index torch comes from: `cpu` (small, no CUDA libraries) or a CUDA build that
# PyTorch publishes torch 2.13.0 for (cu130, ...; see https://pytorch.org/get-started/locally/).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000

# An unprivileged user owns nothing but the data directory: the code and checkpoint stay read-only to it.
RUN useradd --system --uid 10001 --create-home --home-dir /home/chat chat \
    && mkdir -p /data && chown chat /data
ENV DATA_DIR=/data

WORKDIR /opt/reformer-chat

# torch first, from PyTorch's own index: PyPI's default torch wheel for Linux is a multi-GB CUDA build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# The rest of the dependencies, from pyproject.toml only (its torch range is already met by the above).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The shipped checkpoint, where the app looks for it when MODEL_DIR is unset (checkpoints/ beside app/).
COPY checkpoints/reformer-chat-small checkpoints/reformer-chat-small

# The source last. Installed editable, so the packages stay here beside checkpoints/ and the installed
# metadata (the version /admin/info reports) is present; --no-deps: everything is installed above.
COPY README.md ./
COPY model model
COPY app app
RUN pip install --no-deps --editable .

USER chat
EXPOSE 8000
STOPSIGNAL SIGTERM

# Readiness, not just liveness: the engine runs and Redis answers (the slim image has no curl).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${PORT}/admin/ready', timeout=4)"

CMD ["python", "-m", "app"]
