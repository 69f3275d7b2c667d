"""Sweep specs, variant naming, the comparison table and bad input (the runs themselves: tests/test_full_run.py)."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from raydseg.errors import ConfigError
from raydseg.sweep import Variant, load_spec, parse_grid, plots, table, variants

REPO = Path(__file__).resolve().parent.parent


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"name": None, "config": None, "overrides": [], "grid": [], **kw})


def test_grid_crossed_with_variants_names_runs_and_pools_seeds_in_the_label():
    spec = load_spec("distillation", _args(grid=["cluster.k=8,20", "run.seed=0,1"]))
    vs = variants(spec)
    assert len(vs) == 4 * 2 * 2
    v = vs[3]
    assert (v.name, v.label) == ("base-k20-seed1", "base-k20")
    assert v.overrides == ["cluster.k=20", "run.seed=1"] and v.values == {"cluster.k": "20", "run.seed": "1"}
    assert [x.name for x in variants(load_spec("k", _args()))] == ["k8", "k12", "k20"]


def test_shipped_sweeps_build_valid_configs_with_distinct_run_names():
    from raydseg.sweep import build_configs

    for name in ("k", "density", "distillation", "sources"):
        spec = load_spec(name, _args())
        configs = [cfg for _, cfg in build_configs(spec)]
        names = [cfg.run.name for cfg in configs]
        assert len(set(names)) == len(names) > 1 and all(n.startswith(f"{spec.name}-") for n in names)
        # no variant repeats another's config (a part "switched off" that the base already has off)
        assert len({cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": ""})}).model_dump_json()
                    for cfg in configs}) == len(configs), name


def test_table_pools_seeds_into_mean_and_spread_and_plots_each_model():
    rows = [(Variant(f"k{k}-seed{s}", f"k{k}", [], {"cluster.k": str(k), "run.seed": str(s)}),
             {"eval/student/synthetic_day/miou": m, "eval/teacher/synthetic_day/miou": m / 2, "cluster/purity": 0.5})
            for k, s, m in ((8, 0, 0.10), (8, 1, 0.14), (20, 0, 0.30), (20, 1, 0.30))]
    header, body = table(rows, ["cluster.k", "run.seed"])
    assert header == ["variant", "cluster.k", "seeds", "eval/student/synthetic_day/miou",
                      "eval/teacher/synthetic_day/miou", "cluster/purity"]
    assert body[0] == ["k8", "8", 2, "12.0 ± 2.8", "6.0 ± 1.4", "50.0 ± 0.0"]
    assert body[1][3] == "30.0 ± 0.0"
    digests = {"k8-seed0": "aa", "k8-seed1": "aa", "k20-seed0": "aa", "k20-seed1": "bb"}
    header2, body2 = table(rows, ["cluster.k", "run.seed"], digests)
    assert header2 == [*header, "eval sets"] and [r[-1] for r in body2] == ["aa", "aa bb"]
    pngs = plots(header, body, 1)
    assert sorted(pngs) == ["student_miou.png", "teacher_miou.png"]
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs.values())


def test_bad_grid_and_bad_values_fail_in_one_line_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"^--grid cluster.k: expected section.key=v1,v2\[,...\]$"):
        parse_grid(["cluster.k"])
    with pytest.raises(ConfigError, match="^a sweep needs --grid"):
        load_spec(None, _args())
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), "--grid", "cluster.k=4,many",
                           "--set", f"run.output_root={tmp_path / 'out'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["error: variant kmany: cluster.k: input should be a valid integer, got 'many'"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), "nosuch"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: sweep file nosuch does not exist"]
