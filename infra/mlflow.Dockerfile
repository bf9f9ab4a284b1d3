# MLflow tracking server with the PostgreSQL driver and boto3 for MinIO/S3 artifacts.
#   docker build -f infra/mlflow.Dockerfile -t REGISTRY/kftune-mlflow:3.17.2 infra
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg[binary]==3.3.9" boto3==1.43.117
USER 1000
