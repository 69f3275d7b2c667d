"""MLflow helpers: the tracking URI, one parent run per pipeline run, one child run per stage."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from raydseg.config import Config

MAX_PARAM_LEN = 6000


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else the config's `tracking.uri`, else sqlite in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


def setup(cfg: Config) -> str:
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
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


@contextlib.contextmanager
def child_run(name: str, parent_run_id: str) -> Iterator[str]:
    """A nested run under the pipeline's parent run; yields its run id."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tag("raydseg.stage", name)
        yield run.info.run_id
