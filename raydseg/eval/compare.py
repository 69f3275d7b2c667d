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


def mean_spread(values: Any) -> str:
    """`mean` or `mean ± std` (sample std, when there are several) of values already in display units, 1 decimal."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")


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


def chromium_executable() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def compare_page_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The MLflow UI's side-by-side comparison page of `run_ids`."""
    import json
    import urllib.parse

    q = lambda v: urllib.parse.quote(json.dumps(v, separators=(",", ":")))  # noqa: E731
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={q(run_ids)}&experiments={q(sorted(set(experiment_ids)))}"


def screenshot_compare(tracking_uri: str, run_ids: list[str], out_png: str, size: tuple[int, int] = (1600, 2400),
                       timeout_s: float = 180.0) -> str:
    """PNG screenshot (headless Chromium) of the MLflow UI comparing `run_ids`; returns the page URL.

    An http(s) tracking URI is the UI itself; for a database URI (sqlite:///...) a throw-away `mlflow server` is
    started on loopback for the screenshot. Raises RuntimeError when Chromium is missing or the page stays blank.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    from raydseg.ports import free_port

    exe = chromium_executable()
    if exe is None:
        raise RuntimeError("the comparison screenshot needs Chromium (Debian: apt-get install chromium)")
    exp_ids = [MlflowClient(tracking_uri).get_run(r).info.experiment_id for r in run_ids]
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if tracking_uri.startswith(("http://", "https://")):
            base = tracking_uri
        else:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + timeout_s
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or (server is not None and server.poll() is not None):
                        raise RuntimeError(f"MLflow UI at {base} did not come up")
                    time.sleep(0.5)
            url = compare_page_url(base, run_ids, exp_ids)
            subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp}/profile",
                            f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=30000",
                            f"--screenshot={os.path.abspath(out_png)}", url],
                           capture_output=True, timeout=timeout_s, check=False)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    if not os.path.exists(out_png) or os.path.getsize(out_png) < 10_000:
        raise RuntimeError(f"Chromium wrote no usable screenshot of {url}")
    return url
