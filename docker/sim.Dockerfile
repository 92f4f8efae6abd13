# syntax=docker/dockerfile:1
# The simulator image: `sdproxy sim` behaving like one sd-webui pod on port 7860, so the
# whole system (proxy, discovery, scale to zero, probes, drain) runs on any cluster
# without GPUs (deploy/overlays/sim).
#
#   docker build -f docker/sim.Dockerfile -t sdproxy-sim:0.1.0 .      (context: repo root)
#
# Same two stages as docker/sdproxy.Dockerfile, plus the sd-webui probe scripts
# (docker/probes) so the sim pods use exactly the probes and preStop of the GPU pods.

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdproxy ./sdproxy
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sdproxy-sim" \
      org.opencontainers.image.description="Simulated Stable Diffusion WebUI pod (no GPU)" \
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
COPY --chmod=0755 docker/probes/sd-ready docker/probes/sd-drain /usr/local/bin/
USER 10001:10001
EXPOSE 7860
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7860/sdapi/v1/progress?skip_current_image=true', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["sdproxy", "sim"]
CMD ["--host", "0.0.0.0", "--port", "7860"]
