# One image for every embedq process; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY embedq ./embedq
# CUDA hosts: drop the index URL to get torch's CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} 'torch>=2.2,<3' \
    && pip install --no-cache-dir '.[postgres]'
