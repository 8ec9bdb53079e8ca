# toonserve container image: CPU by default, CUDA with one build argument.
#
#   CPU  (python:3.11-slim-bookworm, torch from the PyTorch CPU index):
#     docker build -t toonserve:cpu .
#   CUDA (nvidia/cuda base image, torch cu128 build from the PyTorch index; host needs the NVIDIA
#         driver >= 570 and the NVIDIA Container Toolkit):
#     docker build --build-arg VARIANT=cuda -t toonserve:cuda .
#   CUDA for an older driver (>= 560), e.g. the cu126 build:
#     docker build --build-arg VARIANT=cuda \
#       --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t toonserve:cuda .
#   (Drivers 525-569: the cu12x wheels still run through CUDA minor-version compatibility, but the
#   image's NVIDIA_REQUIRE_CUDA check refuses them; start with -e NVIDIA_DISABLE_REQUIRE=1.)
#
#   docker run -d -p 8000:8000 -v toonserve-data:/data toonserve:cpu
#   docker run -d -p 8000:8000 -v toonserve-data:/data --gpus all toonserve:cuda
#
# Needs BuildKit (the default builder since Docker Engine 23): it builds only the stages the chosen
# VARIANT needs, so a CPU build never pulls the CUDA image.
#
# Weights: /data is TOONSERVE_CACHE_DIR, a volume owned by the app user (UID/GID 10001). With
# TOONSERVE_ALLOW_DOWNLOAD=true (the default) missing styles are fetched from ModelScope and converted
# into it at the first start; later starts reuse them. To fill it ahead of time:
#   docker run --rm -v toonserve-data:/data toonserve:cpu toonserve download anime 3d
# Offline: run `toonserve download anime --cache-dir DIR` on a connected machine, copy DIR over, load
# it into the volume and start with TOONSERVE_ALLOW_DOWNLOAD=false:
#   docker run --rm -v toonserve-data:/data -v "$PWD/DIR:/import:ro" toonserve:cpu cp -R /import/. /data/
# (A bind mount instead of the volume must be readable and writable by UID 10001.)
#
# Shutdown: tini is PID 1 and forwards SIGTERM to `toonserve serve`, so uvicorn stops accepting
# connections and finishes in-flight requests; it also reaps zombies. `docker run --init` is therefore
# unnecessary (and would only add a second init). Give the container time to drain, e.g.
# `docker stop --time 75` (the drain waits up to TOONSERVE_REQUEST_TIMEOUT_S + 5 s) or compose's
# `stop_grace_period`.

ARG VARIANT=cpu
# Pinned base images. The CPU image runs the Python the project is tested on (3.11).
ARG CPU_IMAGE=python:3.11-slim-bookworm
# The CUDA image is the small `base` flavour on purpose: the torch wheels bring their own CUDA
# runtime, cuBLAS and cuDNN as pip packages, so the `runtime` flavour would only duplicate gigabytes
# of libraries. The image still sets NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES and
# NVIDIA_REQUIRE_CUDA, so the container toolkit mounts the driver and refuses a too-old one with a
# clear message. Its CUDA version should match the torch build below (12.8 <-> cu128).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
# Empty: cpu -> https://download.pytorch.org/whl/cpu, cuda -> https://download.pytorch.org/whl/cu128.
# (Plain PyPI torch 2.13 on Linux x86_64 is a CUDA 13.0 build, which needs driver >= 580, so the
# index is named explicitly for both variants.)
ARG TORCH_INDEX_URL=""

# ---- operating-system layer of each variant: an interpreter at a fixed path, and tini ----------------

FROM ${CPU_IMAGE} AS os-cpu
# The base image tag pins the distribution; apt package pins would break rebuilds whenever Debian
# ships a security update and drops the superseded version, so versions are left to the tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS os-cuda
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11), so the distribution's interpreter is
# used rather than a third-party PPA such as deadsnakes (no extra key or repository to trust). Same
# reason as above for unpinned versions: Ubuntu drops superseded python3.12 builds from its
# -updates/-security pockets.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtual environment with torch, the dependencies and the project wheel -------------

# os-${VARIANT} names one of the two stages above, not a registry image; hadolint cannot resolve the
# variable and would ask for a tag (DL3006).
# hadolint ignore=DL3006
FROM os-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_INDEX_URL
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so code changes reuse this (large) layer. torch comes
# from the variant's index; the rest from PyPI, where the installed torch already satisfies the range.
# With the int8 extra, so that TOONSERVE_DTYPE=auto can weigh int8 on CPUs with VNNI (docs/int8.md).
COPY pyproject.toml ./
RUN case "${VARIANT}" in \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *p["optional-dependencies"]["int8"], sep="\n")' > /tmp/requirements.txt \
    && grep -E '^torch([<>=!~ ]|$)' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install --no-cache-dir --index-url "${index}" -r /tmp/torch.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'cuda', cuda); sys.exit(('${VARIANT}' == 'cuda') != (cuda is not None))"

COPY README.md ./
COPY service ./service
COPY api ./api
COPY jobs ./jobs
COPY serving ./serving
COPY inference ./inference
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist . \
    && pip install --no-cache-dir --no-deps /tmp/dist/toonserve-*.whl \
    && pip check

# ---- runtime: the interpreter, tini and the venv; no compilers, no pip caches, no sources ----------

# A stage again, as for the builder (DL3006 does not apply).
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="toonserve" \
      org.opencontainers.image.description="DCT-Net portrait cartoonization over HTTP (FastAPI, PyTorch), ${VARIANT} build" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TOONSERVE_HOST=0.0.0.0 \
    TOONSERVE_PORT=8000 \
    TOONSERVE_CACHE_DIR=/data \
    MODELSCOPE_CACHE=/data/modelscope

# A fixed, numeric, unprivileged UID/GID: volume ownership is predictable across rebuilds and
# Kubernetes' runAsNonRoot can verify it. /data is created and chowned before VOLUME so a fresh named
# volume is initialised with that ownership. /jobs likewise, for the shared jobs volume of replicas
# (TOONSERVE_DATA_DIR=/jobs in docker-compose.yml's `replicas` profile and deploy/kubernetes): a named
# volume mounted where the image has no directory would be owned by root. It is no VOLUME, so a
# single container keeps its jobs under /data/data. --no-log-init keeps a high UID from bloating
# lastlog.
RUN groupadd --gid 10001 toonserve \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/toonserve \
        --shell /usr/sbin/nologin toonserve \
    && install --directory --owner=10001 --group=10001 --mode=0755 /data /jobs

# Owned by root and read-only for the app user.
COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# Ready = the default style loaded and warmed up (GET /readyz is 503 until then; the other styles
# serve as soon as each is in). The first
# start may download and convert weights, hence the long start period. urllib raises on a non-2xx
# answer or no answer, which exits 1 (unhealthy); no curl needed in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('TOONSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["toonserve", "serve"]
