# One image for both services: `python -m ingest` (the default) and `python -m workers`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY ingest ./ingest
COPY workers ./workers
COPY cli ./cli
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin fbhook

USER fbhook
EXPOSE 8080
CMD ["python", "-m", "ingest"]
