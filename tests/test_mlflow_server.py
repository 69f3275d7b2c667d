"""jobs/mlflow_server.sh: a real MLflow server (sqlite backend) whose artifacts land in S3 (moto's server)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port

SCRIPT = REPO / "jobs" / "mlflow_server.sh"


def _script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, MLFLOW_WORKERS="1", HOME=os.environ.get("HOME", "/tmp"))
    env.update(extra)
    return env


def _wait_healthy(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow_server.sh exited {proc.returncode}: {log.read_text()[-3000:]}")
            time.sleep(0.5)
    raise RuntimeError(f"mlflow_server.sh did not become healthy: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the script execs mlflow, which forks its workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_mlflow_server_stores_runs_in_sqlite_and_artifacts_in_s3(tmp_path, s3_endpoint, s3_bucket):
    import boto3
    from mlflow.tracking import MlflowClient

    db = tmp_path / "db" / "mlflow.db"  # parent dir does not exist: the script creates it
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = _script_env(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{db}",
                      MLFLOW_DEFAULT_ARTIFACT_ROOT=f"s3://{s3_bucket}/mlflow",
                      MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port))
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)  # the script must derive it from AWS_ENDPOINT_URL
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(uri, proc, log)
        assert f"s3_endpoint={s3_endpoint}" in log.read_text()

        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("deploy-test")
        run = client.create_run(exp_id, run_name="smoke")
        run_id = run.info.run_id
        assert run.info.artifact_uri == f"s3://{s3_bucket}/mlflow/{exp_id}/{run_id}/artifacts"
        client.log_metric(run_id, "teacher/loss", 0.25, step=3)
        artifact = tmp_path / "report.txt"
        artifact.write_text("miou=0.42\n")
        client.log_artifact(run_id, str(artifact), artifact_path="eval")
        client.set_terminated(run_id)

        # The artifact is in the moto bucket under the run's artifact root ...
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        key = f"mlflow/{exp_id}/{run_id}/artifacts/eval/report.txt"
        assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"miou=0.42\n"
        # ... and reads back through MLflow's own artifact API
        listed = [f.path for f in client.list_artifacts(run_id, "eval")]
        assert listed == ["eval/report.txt"]
        # The run and its metric are rows in the sqlite database the script was given
        got = client.get_run(run_id)
        assert got.data.metrics["teacher/loss"] == pytest.approx(0.25)
        assert got.info.status == "FINISHED"
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT key, value, step FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
        assert rows == [("teacher/loss", 0.25, 3)]
    finally:
        _stop(proc)
    assert proc.returncode is not None


@pytest.mark.parametrize("overrides, message", [
    ({"MLFLOW_DEFAULT_ARTIFACT_ROOT": "/tmp/artifacts"}, "must be an s3:// URI"),
    ({"MLFLOW_DEFAULT_ARTIFACT_ROOT": "s3://b/p", "MLFLOW_BACKEND_STORE_URI": "./mlruns"},
     "must be a database URI"),
])
def test_mlflow_server_refuses_non_s3_artifacts_and_file_backends(overrides, message):
    env = _script_env(**overrides)
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert message in res.stderr


def test_mlflow_server_requires_an_artifact_root():
    env = _script_env()
    env.pop("MLFLOW_DEFAULT_ARTIFACT_ROOT", None)
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "MLFLOW_DEFAULT_ARTIFACT_ROOT" in res.stderr
