# evomerge image for controller and worker nodes (CPU build; the vLLM/GPU image arrives with the vLLM issue).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORKDIR /opt/evomerge
COPY pyproject.toml README.md ./
COPY evomerge ./evomerge
COPY workers ./workers
COPY configs ./configs
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.15" \
 && pip install .
ENTRYPOINT ["evomerge"]
CMD ["--help"]
