# The reskd serving image: `reskd serve` on the bundled models, onnxruntime + numpy, no torch (the `serve` extra).
# Needs BuildKit (RUN --mount): the default since Docker 23, DOCKER_BUILDKIT=1 before; `make docker` sets it.
#
#   docker build -t reskd .                                  CPU image (the default target)
#   docker build --target gpu -t reskd:gpu .                 GPU image: onnxruntime-gpu + CUDA/cuDNN wheels
#   docker run --rm -p 8000:8000 reskd                       http://127.0.0.1:8000, settings as RESKD_* variables
#   docker run --rm --gpus all -p 8000:8000 reskd:gpu        needs the NVIDIA Container Toolkit on the host
#
# Base: Debian bookworm's slim image, pinned by its dated tag, and Debian's own python3 (3.11). Not python:3.11-slim:
# a Debian base is what a minimal bookworm root filesystem is, so where no registry can be reached the tests stand in
# for it closely (debootstrap of bookworm from the current mirror + docker import, tests/standin_base.sh; not
# stripped of docs as the official slim image is) and every step below runs for real on it.
#
# Where the machine's TLS goes through an extra CA (a proxy), pip needs that bundle: pass it as a BuildKit secret,
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
# A secret is mounted only while its RUN step runs and is never stored in a layer or the image's history (a build
# argument would be). Without the secret pip uses the image's own CA bundle.
ARG BASE=debian:bookworm-20250520-slim

FROM ${BASE} AS python
# The interpreter only; ca-certificates is for the pip step of the build stages (and HTTPS clients at run time).
# DL3008: versions are not pinned so that a rebuild takes bookworm's security updates; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM python AS build
# DL3008: unpinned as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/docker/constraints.txt deploy/docker/requirements-gpu.txt /src/deploy/docker/
COPY pyproject.toml README.md /src/
COPY reskd /src/reskd
COPY service /src/service
COPY export /src/export
COPY scoring /src/scoring
COPY training /src/training
# A regular (not editable) install of the `serve` extra under the pinned versions; the build fails if torch came in.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install -c deploy/docker/constraints.txt ".[serve]" \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM build AS build-gpu
# onnxruntime-gpu replaces onnxruntime (both install the `onnxruntime` module; never keep both).
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip uninstall -y onnxruntime \
 && pip install -c deploy/docker/constraints.txt -r deploy/docker/requirements-gpu.txt

# What both images share: the models, the user, the settings, the health check and the entry point.
FROM python AS serve
COPY models /opt/reskd/models
# A fixed numeric uid, so orchestrators can check runAsNonRoot without resolving names.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin reskd
ENV PATH=/opt/venv/bin:$PATH \
    RESKD_REPO=/opt/reskd/models \
    RESKD_HOST=0.0.0.0 \
    RESKD_PORT=8000 \
    RESKD_GRPC_PORT=8001
USER 10001
# 8000: HTTP (KServe v2 REST, v1, /metrics); 8001: gRPC (inference.GRPCInferenceService, grpc.health.v1), Triton's
# numbering. RESKD_GRPC_PORT=0 turns gRPC off.
EXPOSE 8000 8001
# Ready = every model loaded and warmed (GET /v2/health/ready); a few seconds after start on a CPU.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "reskd.service.healthcheck"]
ENTRYPOINT ["reskd", "serve"]

FROM serve AS gpu
COPY --from=build-gpu /opt/venv /opt/venv

# The default target (last): the CPU image.
FROM serve AS cpu
COPY --from=build /opt/venv /opt/venv
