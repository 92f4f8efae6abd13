# syntax=docker/dockerfile:1
# The sdproxy image: the proxy as entry point (`sdproxy serve`).
#
#   docker build -f docker/sdproxy.Dockerfile -t sdproxy:0.1.0 .      (context: repo root)
#
# Stage 1 builds wheels for the package and its runtime dependencies (never the [dev]
# extra); stage 2 installs them offline into a venv on a slim base and runs as a numeric
# non-root user (Kubernetes' runAsNonRoot can only verify a numeric USER).
# docker/sdproxy.Dockerfile.dockerignore keeps the context to what the build needs.

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A package index of your choice (a mirror or a proxy) instead of a hard-coded one.
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdproxy ./sdproxy
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sdproxy" \
      org.opencontainers.image.description="Concurrency-limiting, autoscaling reverse proxy for sd-webui pods" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/sdproxy/bin:$PATH
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/sdproxy \
    && /opt/sdproxy/bin/pip install --no-index --find-links /wheels sdproxy \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sdproxy
USER 10001:10001
# 8000: the proxy (clients, /-/healthz, /-/readyz, /-/status); 9100: Prometheus /metrics
EXPOSE 8000 9100
# slim has no curl: a urllib one-liner. /-/healthz says the process serves, not that pods exist.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/-/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["sdproxy"]
# Listen on all interfaces inside the container; every other flag via args or SDPROXY_* env.
CMD ["serve", "--listen", "0.0.0.0:8000", "--metrics-listen", "0.0.0.0:9100"]
