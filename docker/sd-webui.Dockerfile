# syntax=docker/dockerfile:1
# The GPU pod: AUTOMATIC1111 Stable Diffusion WebUI at a pinned release, API only.
#
#   docker build -f docker/sd-webui.Dockerfile -t sd-webui:1.10.1 .   (context: repo root)
#   docker build ... --build-arg PIP_INDEX_URL=https://mirror.example/simple
#   docker build ... --build-arg EXTENSIONS="https://github.com/Mikubill/sd-webui-controlnet.git@<commit>"
#
# What this fixes in the original image (shared/seed): unpinned sd-webui (master), a
# hard-coded PyPI mirror and apt mirror, third-party extensions cloned from proxies,
# pip/git at start-up, root user, UI flags for a pod that only serves an API.
#
# - Pinned: CUDA runtime base, torch/torchvision/xformers, the sd-webui tag. The helper
#   repositories (k-diffusion, BLIP, generative-models, ...) are pinned by that tag's
#   launch_utils.py; `launch.py --exit` clones and installs them at BUILD time, and the
#   container runs with --skip-prepare-environment, so a pod start never touches git/pip.
# - The package index is a build argument; nothing mirror-specific is hard-coded.
# - No third-party extensions unless EXTENSIONS lists them ("URL@REF", space-separated;
#   a ref is required so builds stay reproducible). Their install.py runs at build time.
# - Models live on a volume (/models, --models-dir): a PersistentVolumeClaim in
#   Kubernetes, never baked into the image and never hostPath.
# - Runs as uid 1000 (numeric, for runAsNonRoot); everything it writes is owned by it.
# - docker/probes/sd-ready (startupProbe: a 1-step 64x64 generation) and sd-drain
#   (preStop: wait until idle) are installed in /usr/local/bin; see deploy/base.

ARG CUDA_IMAGE=nvidia/cuda:12.1.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu121
ARG SD_WEBUI_REPO=https://github.com/AUTOMATIC1111/stable-diffusion-webui.git
ARG SD_WEBUI_VERSION=v1.10.1
ARG TORCH_VERSION=2.1.2
ARG TORCHVISION_VERSION=0.16.2
ARG XFORMERS_VERSION=0.0.23.post1
ARG EXTENSIONS=""

LABEL org.opencontainers.image.title="sd-webui" \
      org.opencontainers.image.description="Stable Diffusion WebUI ${SD_WEBUI_VERSION}, API only, for sdproxy" \
      org.opencontainers.image.version="${SD_WEBUI_VERSION}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/opt/hf-cache

# Ubuntu's own package versions are pinned by the base image tag; pinning each apt
# package to an exact version breaks the build whenever the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates git python3.10 python3.10-venv \
        libgl1 libglib2.0-0 libgoogle-perftools4 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 sd \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash sd \
    && install -d -o 1000 -g 1000 /opt/venv /opt/sd-webui /opt/hf-cache /models

# tcmalloc, as webui.sh does: less fragmentation when checkpoints are swapped.
ENV LD_PRELOAD=libtcmalloc_minimal.so.4

# Everything below is built by the runtime user, so no chown layer duplicates gigabytes.
USER 1000:1000
RUN python3.10 -m venv /opt/venv \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "xformers==${XFORMERS_VERSION}"

RUN git clone --depth 1 --branch "${SD_WEBUI_VERSION}" "${SD_WEBUI_REPO}" /opt/sd-webui
WORKDIR /opt/sd-webui

# Optional extensions, each "URL@REF". Empty by default: no UI extensions in the image.
RUN for spec in ${EXTENSIONS}; do \
        case "${spec}" in *@*) ;; *) echo "EXTENSIONS: '${spec}' needs @REF" >&2; exit 1 ;; esac; \
        url="${spec%@*}"; ref="${spec##*@}"; name="$(basename "${url}" .git)"; \
        git clone --filter=blob:none "${url}" "extensions/${name}" \
        && git -C "extensions/${name}" checkout --detach "${ref}" || exit 1; \
    done

# Clone the helper repositories at the commits this release pins, install its
# requirements and the extensions' install.py, then exit. No GPU at build time.
RUN python launch.py --skip-torch-cuda-test --xformers --exit \
    && python -c "from transformers import CLIPTextConfig, CLIPTokenizer; \
n = 'openai/clip-vit-large-patch14'; CLIPTokenizer.from_pretrained(n); CLIPTextConfig.from_pretrained(n)"

COPY --chmod=0755 docker/probes/sd-ready docker/probes/sd-drain /usr/local/bin/

VOLUME ["/models"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7860/sdapi/v1/progress?skip_current_image=true', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["python", "launch.py", "--skip-prepare-environment"]
# API only (--nowebui: no Gradio UI, less RAM, faster start; the UI would need sticky
# sessions including its websocket). Drop --nowebui to get the UI on the same port.
CMD ["--api", "--nowebui", "--listen", "--port", "7860", "--xformers", \
     "--models-dir", "/models", "--no-download-sd-model"]
