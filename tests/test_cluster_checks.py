"""Start-up checks against the connected Ray cluster: a request no node can ever serve, and a local MLflow store on a
multi-node cluster, stop the run before any stage with one `error:` line naming the key (exit status 2)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from raydseg.cli import full_run
from raydseg.tracking import is_local_store, locality_problem


def _node_shapes() -> str:
    import ray

    return "; ".join(f"node {n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in ray.nodes() if n["Alive"])


@pytest.mark.ray
def test_full_run_fails_at_once_when_no_node_has_the_gpu_a_stage_asks_for(ray_local, tmp_path, capsys,
                                                                          monkeypatch):
    """`features.num_gpus=1` on a machine without GPUs: the feature actor would wait forever; the run stops first."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the request is feasible")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = full_run(["--set", f"run.output_root={out}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   "--set", "features.num_gpus=1"])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and seconds < 30
    assert err == [f"error: features: one feature actor asks for 1 CPU + 1 GPU (features.num_gpus=1.0), but no node "
                   f"type of the connected Ray cluster has that much ({_node_shapes()})"]
    assert not (out / "default" / "ingest").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
def test_full_run_fails_when_more_shard_actors_must_run_at_once_than_the_cluster_holds(ray_local, tmp_path, capsys,
                                                                                       monkeypatch):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cpus = int(sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]))
    rc = full_run(["--set", f"run.output_root={tmp_path}/out", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                   "--set", f"cluster.n_actors={cpus + 1}", "--set", "run.stages=cluster"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err == [f"error: cluster: {cpus + 1} k-means shard actors must run at once (cluster.n_actors={cpus + 1}), "
                   f"each 1 CPU, but the connected Ray cluster holds at most {cpus} at its largest"]


@pytest.mark.ray
def test_unknown_autoscaler_node_types_turn_the_check_into_a_warning(ray_local, monkeypatch):
    """On a KubeRay pod the driver cannot read the worker groups: a request that fits no alive node is logged, not
    refused (the autoscaler may still launch a GPU pod); `raydseg preflight --cluster` checks the files instead."""
    from raydseg.config import load_config
    from raydseg.preflight import check_connected

    monkeypatch.setenv("KUBERAY_GEN_RAY_START_CMD", "ray start --num-cpus=0")
    logs: list[str] = []
    check_connected(load_config(overrides=["features.num_gpus=1"]), ["features"], log=logs.append)
    assert len(logs) == 1 and logs[0].startswith("warning: features: one feature actor asks for 1 CPU + 1 GPU")


def test_local_mlflow_stores_are_recognised():
    assert is_local_store("sqlite:////tmp/x/mlflow.db") and is_local_store("file:///tmp/mlruns")
    assert is_local_store("./mlruns") and is_local_store("/abs/mlruns")
    assert not is_local_store("http://mlflow.raydseg.svc.cluster.local:5000")
    assert not is_local_store("https://mlflow.example.com") and not is_local_store("databricks")
    assert locality_problem("sqlite:///mlflow.db", 1) is None  # one node: the driver's disk is every worker's
    assert locality_problem("http://10.0.0.1:5000", 5) is None


def test_a_sqlite_store_keeps_its_artifacts_beside_its_database(tmp_path, monkeypatch):
    # MLflow's default put them in ./mlruns of the working directory: the test suite's and every quality-ladder
    # store's runs ended up in the checkout, in one folder
    import mlflow

    from raydseg import tracking
    from raydseg.config import load_config

    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    try:
        cfg = load_config(None, overrides=[f"tracking.uri=sqlite:///{store / 'm.db'}"])
        tracking.setup(cfg)
        tracking.setup(cfg)  # the experiment exists now
        with mlflow.start_run() as run:
            mlflow.log_text("x", "a.txt")
    finally:
        mlflow.set_tracking_uri(before)
    assert (store / "mlartifacts" / run.info.run_id / "artifacts" / "a.txt").read_text() == "x"
    assert not list(cwd.iterdir())
    assert tracking.artifact_root("sqlite:///m.db") == (cwd / "mlartifacts").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


@pytest.mark.ray
@pytest.mark.slow
def test_local_mlflow_store_on_two_nodes_stops_before_any_stage(ray_two_nodes, tmp_path, capsys, monkeypatch):
    """A real two-node cluster: sqlite in the working directory is refused (naming tracking.uri and
    MLFLOW_TRACKING_URI), an MLflow server URI passes the same check."""
    from raydseg.config import load_config
    from raydseg.pipeline import check_cluster

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    rc = full_run(["--set", f"run.output_root={out}", "--set", f"tracking.uri={uri}", "--set", "run.stages=ingest"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err == [f"error: tracking.uri: {uri} is an MLflow store on the driver's disk, but the Ray cluster has (or "
                   "can grow to) 2 nodes, and train workers on the other nodes cannot write to it: set tracking.uri "
                   "or MLFLOW_TRACKING_URI to an MLflow server (http://HOST:5000, jobs/mlflow_server.sh)"]
    assert not Path(tmp_path, "mlflow.db").exists() and not (out / "default" / "ingest").exists()
    # the environment variable wins over the config and is checked the same way
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(Exception, match=rf"^tracking.uri: file://{tmp_path}/mlruns is an MLflow store"):
        check_cluster(load_config(overrides=["run.stages=ingest"]), ["ingest"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_cluster(load_config(overrides=["run.stages=ingest"]), ["ingest"])  # a server: every node reaches it
