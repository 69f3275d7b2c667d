"""MLflow helpers: the tracking URI, one parent run per pipeline run, one child run per stage."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from raydseg.config import Config

MAX_PARAM_LEN = 6000
# distributions whose versions change the numbers (random init, kernels, clustering): tagged on every parent run,
# because the same config and seed give the same weights only under the same versions
VERSIONED = ("torch", "torchvision", "timm", "numpy", "faiss-cpu", "faiss-gpu", "open3d", "ray", "numba")


def package_versions() -> dict[str, str]:
    """{'raydseg.version.<dist>': version} of the installed VERSIONED distributions."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in VERSIONED:
        try:
            out[f"raydseg.version.{dist}"] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else the config's `tracking.uri`, else sqlite in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


LOCAL_SCHEMES = ("sqlite", "file", "")  # stores that live on the driver's disk (a bare path has no scheme)


def is_local_store(uri: str) -> bool:
    """True for a tracking URI whose store is a file on this machine: sqlite:///..., file:///..., a plain path."""
    from urllib.parse import urlparse

    if uri.split(":")[0] in ("databricks", "databricks-uc"):  # MLflow's hosted stores, bare or with a profile
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in LOCAL_SCHEMES or len(scheme) == 1  # `C:/...` parses as scheme "c"


def locality_problem(uri: str, n_nodes: int) -> str | None:
    """None when every node can log to `uri`; else why not, naming the keys to change (one line)."""
    if n_nodes <= 1 or not is_local_store(uri):
        return None
    return (f"tracking.uri: {uri} is an MLflow store on the driver's disk, but the Ray cluster has (or can grow to) "
            f"{n_nodes} nodes, and train workers on the other nodes cannot write to it: set tracking.uri or "
            "MLFLOW_TRACKING_URI to an MLflow server (http://HOST:5000, jobs/mlflow_server.sh)")


def check_locality(uri: str) -> None:
    """Raise ConfigError when `uri` is a local store and the connected Ray cluster spans (or can grow to) more than
    one node: its alive nodes, or the most nodes the autoscaler may run, whichever is larger."""
    import ray

    from raydseg.errors import ConfigError
    from raydseg.preflight import KUBERAY_ENV, UNBOUNDED, autoscaler_node_groups

    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    groups = autoscaler_node_groups()
    most = 2 if any(g.max_workers == UNBOUNDED for g in groups) else sum(g.max_workers for g in groups)
    if any(os.environ.get(k) for k in KUBERAY_ENV):  # a KubeRay pod: worker groups the driver cannot see
        most = max(most, 2)
    problem = locality_problem(uri, max(alive, most))
    if problem:
        raise ConfigError(problem)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: `mlartifacts/` beside the database file (MLflow's
    own default is ./mlruns of whatever directory the client runs in, so two stores' runs shared one folder and a
    store's artifacts were not where its database was). None for other stores (a server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(os.path.dirname(uri[len("sqlite:///"):]) or ".").absolute().joinpath("mlartifacts").as_uri()


def setup(cfg: Config) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name, root = cfg.tracking.experiment, artifact_root(uri)
    if root and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=root)
        except MlflowException:  # another process of the same store created it first
            pass
    mlflow.set_experiment(name)
    return uri


def log_params(params: dict[str, Any]) -> None:
    """Log params in chunks (MLflow caps a batch at 100), lists as comma-joined strings."""
    import mlflow

    items = [(k, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in params.items()]
    items = [(k, str(v)[:MAX_PARAM_LEN]) for k, v in items]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


def log_metrics(metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
    import mlflow

    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_with_parent(metrics: dict[str, float], files: list[tuple[str, str]], parent_run_id: str) -> None:
    """Metrics and (local file, artifact dir) files to the active (stage) MLflow run; metrics also to the parent run,
    which carries the config params (compare_runs reads metrics there). Nothing without an active run."""
    import time

    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics(metrics)
    for local, rel in files:
        mlflow.log_artifact(local, rel)
    if parent_run_id:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            MlflowClient().log_batch(parent_run_id, metrics=items[i:i + 500])


@contextlib.contextmanager
def child_run(name: str, parent_run_id: str) -> Iterator[str]:
    """A nested run under the pipeline's parent run; yields its run id."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tag("raydseg.stage", name)
        yield run.info.run_id


def save_and_log(files: dict[str, bytes], out_dir: str, artifact_path: str, run_id: str) -> None:
    """Write each {name: bytes} file to `out_dir` (local or s3://) and log it under its own name to `artifact_path`
    of MLflow run `run_id` (the tracking URI `setup` set)."""
    import tempfile

    import mlflow

    from raydseg import storage

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            storage.write_bytes(storage.join(out_dir, name), data)
            storage.write_bytes(os.path.join(tmp, name), data)
        mlflow.MlflowClient().log_artifacts(run_id, tmp, artifact_path)
