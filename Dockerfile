# reformer-chat service image: `docker compose up` builds it (see README, "Operations").
#
#   docker build -t reformer-chat .                              # CPU build of torch (the default)
#   docker build -t reformer-chat --build-arg TORCH_VARIANT=cu130 .   # a CUDA build, for GPU hosts
#   docker build -t reformer-chat --build-arg TORCH_INDEX_URL= .      # torch from pip's own configuration
#
# Two stages. The first installs everything into a virtual environment, with whatever pip configuration
# the build host mounts in (an index mirror, find-links, a CA bundle: scripts/container_check.sh mounts
# the machine's with `podman build -v`), and deletes what torch ships but never runs (C++ headers, test
# binaries). The second copies that environment onto a fresh base: no build-time mount, cache or deleted
# file survives in its layers. Layers go from least to most often changed, so editing the code rebuilds
# only the last few: torch, then the other dependencies (read from pyproject.toml alone), then the
# checkpoint, then the source.

FROM python:3.11-slim AS build

# Which PyTorch wheel index torch comes from: `cpu` (small, no CUDA libraries) or a CUDA build that
# PyTorch publishes torch 2.13.0 for (cu130, ...; see https://pytorch.org/get-started/locally/).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Empty: no --index-url, so pip's own configuration decides (a mirror or find-links holding the wheel),
# for build hosts that cannot reach download.pytorch.org.
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/${TORCH_VARIANT}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first, from PyTorch's own index: PyPI's default torch wheel for Linux is a multi-GB CUDA build.
# Then out go its C++ headers, CMake files, C++ test binaries and protoc, which only extension builds
# and PyTorch's own tests use (about a quarter of the CPU wheel).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    && torch=$(python -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])") \
    && rm -r "$torch/include" "$torch/share" "$torch/test" \
    && find "$torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -r {} +

# The rest of the dependencies, from pyproject.toml only (its torch range is already met by the above).
WORKDIR /opt/reformer-chat
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project, installed editable: its metadata (the version /admin/info reports) and an import hook that
# finds `app` and `model` here, in /opt/reformer-chat, where the final stage puts the source beside
# checkpoints/. The hook needs only the packages' markers, so editing the code keeps this layer.
# --no-deps: everything is installed above. pip and setuptools leave: the runtime needs neither (the
# hook is plain Python). Then the user the server runs as, and its data directory.
COPY README.md ./
COPY app/__init__.py app/
COPY model/__init__.py model/
RUN pip install --no-deps --editable . \
    && python -m pip uninstall --yes --quiet pip setuptools \
    && useradd --system --uid 10001 --create-home --home-dir /home/chat chat \
    && mkdir -p /data && chown chat /data


# No RUN in this stage: a build host's mounts (`podman build -v`) reach every RUN and leave their empty
# mount points in its layer, so the runtime image only gets COPYs of what the stage above made.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data

# An unprivileged user (created above, on the same base) owns nothing but the data directory: the code
# and checkpoint stay read-only to it.
COPY --from=build /etc/passwd /etc/group /etc/shadow /etc/gshadow /etc/
COPY --from=build --chown=chat /home/chat /home/chat
COPY --from=build --chown=chat /data /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/reformer-chat

# The shipped checkpoint, where the app looks for it when MODEL_DIR is unset (checkpoints/ beside app/).
COPY checkpoints/reformer-chat-small checkpoints/reformer-chat-small

# The source last, where the editable install above expects it.
COPY model model
COPY app app

USER chat
EXPOSE 8000
STOPSIGNAL SIGTERM

# Readiness, not just liveness: the engine runs and Redis answers (the slim image has no curl).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${PORT}/admin/ready', timeout=4)"

CMD ["python", "-m", "app"]
