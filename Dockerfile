# One image for every service in compose.yaml (the command picks the role).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    RETRAIN_STATE_DIR=/var/lib/retrain \
    RETRAIN_POLICY_DIR=/etc/retrain/policies \
    RETRAIN_LOG_FORMAT=json

WORKDIR /app
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY config ./config
COPY events ./events
COPY workers ./workers
RUN pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 retrain \
    && mkdir -p /var/lib/retrain /etc/retrain/policies \
    && cp config/policies/*.toml /etc/retrain/policies/ \
    && chown -R retrain /var/lib/retrain

USER retrain
ENTRYPOINT ["retrain"]
CMD ["--help"]
