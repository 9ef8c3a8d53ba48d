# The worker and ingest image for docker-compose.yml (Docker users; the quickstart itself needs no Docker).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md cdp.example.yaml ./
COPY agents ./agents
COPY topology ./topology
COPY bench ./bench
COPY schemas ./schemas
RUN pip install --no-cache-dir -e .
ENV CDP_CONFIG=/app/cdp.example.yaml CDP_DATA_DIR=/data
VOLUME /data
CMD ["cdp", "worker"]
