"""compare_runs: config differences vs eval metrics from real MLflow runs (sqlite store)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _two_ablation_runs(tmp_path) -> tuple[str, list[str]]:
    """Two parent runs (k=10, k=30) with nested evaluate runs in a sqlite store: (tracking uri, parent ids)."""
    import mlflow

    from raydseg.tracking import artifact_root

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("ablation-k", artifact_location=artifact_root(uri))  # as the pipeline makes it
    mlflow.set_experiment("ablation-k")
    parents = []
    for k, miou in [(10, 0.21), (30, 0.35)]:
        with mlflow.start_run(run_name=f"k{k}") as parent:
            parents.append(parent.info.run_id)
            mlflow.log_params({"cluster.k": k, "run.seed": 0})
            mlflow.log_metrics({"eval/student/synthetic_day/miou": miou, "eval/student/synthetic_day/iou_road": 0.9})
            with mlflow.start_run(run_name="evaluate", nested=True, parent_run_id=parent.info.run_id):
                mlflow.log_metric("eval/student/synthetic_day/miou", miou)
    mlflow.set_tracking_uri("")  # the job resolves its own URI
    return uri, parents


def test_compare_runs_table_shows_differing_config_and_metrics(tmp_path):
    uri, _ = _two_ablation_runs(tmp_path)
    out = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "compare_runs.py"), "--experiment", "ablation-k",
                           "--tracking-uri", uri, "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert lines[0] == "run,run_id,cluster.k,eval/student/synthetic_day/miou"  # run.seed is equal: not shown
    rows = sorted(line.split(",") for line in lines[1:])
    assert [(r[0], r[2], float(r[3])) for r in rows] == [("k10", "10", 0.21), ("k30", "30", 0.35)]
    md = (tmp_path / "table.md").read_text()
    assert "| k30 |" in md and "35.0" in md and "35.0" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / "compare_runs.py"), "--experiment", "nope",
                          "--tracking-uri", uri], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_compare_page_screenshot_lands_in_both_runs_artifacts(tmp_path):
    """The MLflow UI's comparison page, rendered by headless Chromium, saved under each run's artifacts."""
    import os
    import shutil

    import mlflow
    import numpy as np
    from PIL import Image

    if shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("chromium not installed")
    uri, parents = _two_ablation_runs(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "compare_runs.py"), "--experiment", "ablation-k",
                           "--tracking-uri", uri, "--screenshot", ",".join(parents)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                      "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    name = "compare/compare_" + "_".join(r[:8] for r in parents) + ".png"
    for run_id in parents:
        assert name in [a.path for a in client.list_artifacts(run_id, "compare")]
    png = Image.open(client.download_artifacts(parents[0], name, str(tmp_path))).convert("L")
    pixels = np.asarray(png, np.float32)
    assert png.size == (1600, 2400) and pixels.std() > 10, "blank page: the UI did not render"


@pytest.mark.parametrize("value,text", [(0.1234, "12.3"), (float("nan"), "")])
def test_markdown_formats_fractions_as_percent(value, text):
    from raydseg.eval.compare import to_markdown

    assert to_markdown(["a", "m"], [["x", value]]).splitlines()[2] == f"| x | {text} |"
