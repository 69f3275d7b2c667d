"""Shared fixtures: a real local Ray cluster, a real MLflow server (sqlite), a real S3 endpoint (moto server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raydseg.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RAYDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped locally when absent, a failure in CI (CI=true always has it)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared sample data missing at {SHARED_DATA} (CI must have it)")
        pytest.skip(f"shared sample data missing at {SHARED_DATA}")
    return SHARED_DATA


RAY_ENV = {"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}}  # workers can unpickle test-module classes


_LOCAL_RAY: dict[str, str] = {}  # the GCS address of the cluster `ray_local` started


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_env():
    """mlflow.set_tracking_uri (raydseg.tracking.setup) exports MLFLOW_TRACKING_URI, which would steer the next
    test's in-process run to this test's store: restore it after every test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def ray_local(s3_endpoint):
    """A real local Ray cluster (2 CPUs, no dashboard), started once and shared by the tests that use it.

    It depends on `s3_endpoint` so that its workers inherit the S3 endpoint's AWS environment.
    """
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _LOCAL_RAY.get("gcs"):
        ray.shutdown()  # a cluster another test started (its workers may lack the tests folder on their path)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, runtime_env=RAY_ENV)
        _LOCAL_RAY["gcs"] = ray.get_runtime_context().gcs_address
    yield ray


@pytest.fixture
def ray_two_nodes(s3_endpoint):
    """A real two-node cluster (ray.cluster_utils.Cluster, 1 CPU per node) for this test only."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env=RAY_ENV, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run only where CUDA is available (timm-style: the same tests on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback; sets the AWS env vars so raydseg.storage and boto3 reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", MLFLOW_S3_ENDPOINT_URL=url)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifacts) on loopback; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    # its own process group, so that teardown also ends the uvicorn workers it forks; no MLflow server-side job
    # runner (raydseg submits no MLflow jobs; its huey consumers outlived the server and piled up across runs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a guard against a hang, not a speed test: a loaded 2-core machine needs >120 s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
