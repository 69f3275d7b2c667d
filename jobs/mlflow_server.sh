#!/usr/bin/env bash
# MLflow tracking server for raydseg runs: runs/params/metrics in a database, artifacts in S3.
#
#   MLFLOW_DEFAULT_ARTIFACT_ROOT=s3://my-bucket/mlflow \
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   MLFLOW_HOST=0.0.0.0 MLFLOW_PORT=5000 bash jobs/mlflow_server.sh
#
# Environment (all optional except the artifact root):
#   MLFLOW_DEFAULT_ARTIFACT_ROOT  s3://bucket/prefix for artifacts of new experiments (required). Clients (the
#                                 Ray jobs) read and write it directly with their own S3 credentials
#                                 (the nodes' instance profile / IRSA role); the server only records the URIs.
#   MLFLOW_BACKEND_STORE_URI      SQLAlchemy URI: postgresql://user:pw@host:5432/db (production; needs
#                                 psycopg2, in the image) or sqlite:////abs/path/mlflow.db
#                                 (default: sqlite:///$HOME/mlflow/mlflow.db, one server process only).
#   MLFLOW_HOST / MLFLOW_PORT     bind address (default 127.0.0.1) and port (default 5000). On a cluster head
#                                 use 0.0.0.0: the security group admits only cluster nodes; users reach
#                                 the UI through an SSH tunnel (docs/cluster.md).
#   MLFLOW_WORKERS                server worker processes (default 2).
#   MLFLOW_S3_ENDPOINT_URL        S3-compatible endpoint (MinIO, moto); AWS_ENDPOINT_URL is used when unset.
#   PYTHON                        interpreter with mlflow installed (default: python3).
# The server runs in the foreground (exec): stop it with SIGTERM to this script's pid.
set -euo pipefail

: "${MLFLOW_DEFAULT_ARTIFACT_ROOT:?set MLFLOW_DEFAULT_ARTIFACT_ROOT to s3://bucket/prefix}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${HOME}/mlflow/mlflow.db}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
PYTHON="${PYTHON:-python3}"

# MLflow 3 also starts a server-side job runner (huey consumers) for its GenAI jobs; raydseg submits none, and
# those processes are not ended with the server. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ -z "${MLFLOW_S3_ENDPOINT_URL:-}" && -n "${AWS_ENDPOINT_URL:-}" ]]; then
  export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
fi

case "$BACKEND" in
  sqlite:///*)
    db_path="${BACKEND#sqlite:///}"
    mkdir -p "$(dirname "$db_path")"
    ;;
  postgresql*|mysql*|mssql*) ;;
  *)
    echo "mlflow_server.sh: MLFLOW_BACKEND_STORE_URI must be a database URI (sqlite:///, postgresql://," \
         "mysql://), got '$BACKEND'" >&2
    exit 2
    ;;
esac

case "$MLFLOW_DEFAULT_ARTIFACT_ROOT" in
  s3://*) ;;
  *)
    echo "mlflow_server.sh: MLFLOW_DEFAULT_ARTIFACT_ROOT must be an s3:// URI, got '$MLFLOW_DEFAULT_ARTIFACT_ROOT'" >&2
    exit 2
    ;;
esac

# Print the backend without its password.
echo "mlflow_server.sh: backend=$(sed -E 's#://([^:/@]+):[^@]*@#://\1:***@#' <<<"$BACKEND")" \
     "artifacts=$MLFLOW_DEFAULT_ARTIFACT_ROOT s3_endpoint=${MLFLOW_S3_ENDPOINT_URL:-aws} listen=$HOST:$PORT" >&2

# --no-serve-artifacts: the tracking server does not proxy artifact traffic; clients go to S3 directly.
exec "$PYTHON" -m mlflow server \
  --backend-store-uri "$BACKEND" \
  --default-artifact-root "$MLFLOW_DEFAULT_ARTIFACT_ROOT" \
  --no-serve-artifacts \
  --host "$HOST" --port "$PORT" --workers "$WORKERS"
