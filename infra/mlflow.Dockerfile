# MLflow tracking server with the PostgreSQL driver and boto3 for MinIO/S3 artifacts, from infra/mlflow.lock.
# Built by `make image` next to the component image (same context: the committed tree + wheels/).
#   run: docker run --network host -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e MLFLOW_S3_ENDPOINT_URL IMAGE \
#          mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlflow \
#          --serve-artifacts --host 127.0.0.1 --port 5000
ARG BASE=python:3.11-slim

FROM ${BASE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels
COPY infra/mlflow.lock /src/mlflow.lock
COPY wheels /wheels
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --require-hashes --no-deps -r /src/mlflow.lock

FROM ${BASE}
RUN useradd --create-home --uid 1000 --user-group mlflow
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
USER 1000:1000
WORKDIR /home/mlflow
CMD ["mlflow", "server", "--host", "127.0.0.1", "--port", "5000"]
