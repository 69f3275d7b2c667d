"""jobs/benchmarks/gpu_check.py, the one-shot script for a lent GPU machine (torch + timm only), runs every path
here on CPU at toy sizes, writes every figure with its baseline, and imports nothing the device machine lacks."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_path_at_toy_sizes_without_ray(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "jobs/benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["imported_not_on_device"] == "" and r["tiny"] is True and r["device"] == "cpu"
    for key, baseline in [("teacher_step_images_per_s", "teacher_step_baseline_images_per_s"),
                          ("features_crops_per_s", "features_fp32_crops_per_s"),
                          ("eval_images_per_s", "eval_whole_images_per_s"),
                          ("ddp_step_images_per_s", "ddp_plain_images_per_s")]:
        assert r[key] > 0 and r[baseline] > 0, key
    assert r["ddp_step_backend"] == "gloo" and r["teacher_step_mfu"] is None  # no bf16 peak on a CPU
    assert abs(r["eval_ratio_vs_baseline"] - r["eval_images_per_s"] / r["eval_whole_images_per_s"]) < 1e-9
