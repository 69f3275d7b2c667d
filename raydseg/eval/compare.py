"""Compare the pipeline runs of an MLflow experiment: config values that differ between runs vs eval metrics."""
from __future__ import annotations

import csv
import io
import math
from typing import Any


def runs_table(experiment: str, tracking_uri: str | None = None,
               metric_suffixes: tuple[str, ...] = ("/miou", "/pixel_acc")) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) over the experiment's top-level (parent) runs, newest first.

    Columns: run name, run id, then every param whose value differs between runs (e.g. `cluster.k`), then every
    `eval/<model>/<set>/<metric>` metric ending in one of `metric_suffixes` (fractions in [0, 1]).
    Raises ValueError when the experiment does not exist.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment '{experiment}' not found")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                          max_results=5000)
            if "mlflow.parentRunId" not in r.data.tags]
    param_keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in param_keys if len({r.data.params.get(k) for r in runs}) > 1]
    metric_keys = sorted({k for r in runs for k in r.data.metrics
                          if k.startswith("eval/") and k.endswith(metric_suffixes)})
    header = ["run", "run_id", *differing, *metric_keys]
    rows = [[r.data.tags.get("mlflow.runName", ""), r.info.run_id, *[r.data.params.get(k, "") for k in differing],
             *[r.data.metrics.get(k, float("nan")) for k in metric_keys]] for r in runs]
    return header, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{100 * v:.1f}"
    return str(v)


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    """Markdown table; metric values as percentages with one decimal."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    """CSV with raw values (metrics as fractions)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
