"""Bad invocations fail before any work starts: one `error:` line naming the key or path, exit status 2, no
traceback, and nothing of an earlier run is touched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydseg.cli import full_run, one_stage
from raydseg.ports import free_port

REPO = Path(__file__).resolve().parent.parent
TIMM_MISSING = "'vit_nonexistent_patch16' is not a timm model"


def _earlier_run(root: Path) -> Path:
    """An earlier run's finished cluster output, which a rejected invocation must leave as it was."""
    manifest = root / "default" / "cluster" / "_manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"hash": "earlier"}')
    return manifest


@pytest.mark.parametrize("args, line", [
    (["--set", "cluster.k=-3"], "cluster.k: input should be greater than or equal to 2, got -3"),
    (["--set", "cluster.k=0"], "cluster.k: input should be greater than or equal to 2, got 0"),
    (["--set", "teacher.lr=-0.1"], "teacher.lr: input should be greater than 0, got -0.1"),
    (["--set", "student.steps=0"], "student.steps: input should be greater than or equal to 1, got 0"),
    (["--set", "teacher.crop_size=200"],
     "teacher.crop_size: 200 must be a positive multiple of the patch size 16 of vit_tiny_patch16_224"),
    (["--set", "proposals.point_fraction=1.5"], "proposals.point_fraction: input should be less than or equal to 1"),
    (["--set", "eval.sets=x:cityscapes:{tmp}/nonexistent"], "eval.sets (x): {tmp}/nonexistent does not exist"),
    (["--set", "eval.sets=x:bogus:{tmp}"],
     "eval.sets: eval set 'x': unknown format 'bogus' (known: cityscapes, cityscapes27, acdc, darkzurich, "
     "nightdriving)"),
    (["--set", "eval.sets=x:cityscapes:{tmp}", "--set", "eval.fit_set=y"],
     "eval.fit_set: 'y' is not one of the eval sets (x)"),
    (["--set", "features.backbone=vit_nonexistent_patch16"], f"features.backbone: {TIMM_MISSING}"),
    (["--set", "teacher.weights={tmp}/none.safetensors"], "teacher.weights: {tmp}/none.safetensors does not exist"),
    (["--set", "data.source=waymo", "--set", "data.root={tmp}/empty", "--set", "eval.sets=x:cityscapes:{tmp}"],
     "data.root: no Waymo Open v2 segments in {tmp}/empty (looked for {tmp}/empty/lidar/*.parquet)"),
    (["--set", "data.source=kitti", "--set", "data.root={tmp}/missing", "--set", "eval.sets=x:cityscapes:{tmp}"],
     "data.root: {tmp}/missing does not exist"),
    (["--set", "data.source=nuscenes", "--set", "eval.sets=x:cityscapes:{tmp}"],
     "data.root: required for data.source=nuscenes (a local folder or s3:// URL)"),
    (["--set", "data.source=kitti", "--set", "data.root={tmp}"],  # two problems: two lines
     "data.root: no KITTI data in {tmp} (looked for object splits training/ testing/ with calib/, or raw date "
     "folders with calib_cam_to_cam.txt)\nerror: eval.sets: required for data.source=kitti (NAME:FORMAT:PATH,...); "
     "only the synthetic source brings its own eval splits"),
    (["--set", "run.name=../escape"], "run.name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$', "
                                      "got '../escape'"),
    (["--set", "teacher.n_cls=7"], "teacher.n_cls: 7 does not match cluster.k + ground (cluster.ground_k) + sky"),
    (["--config", "{tmp}/none.yaml"], "config file {tmp}/none.yaml does not exist"),
    (["--set", "cluster.kk=3"], "unknown key 'cluster.kk'"),
])
def test_bad_invocation_fails_at_once_naming_its_key_and_keeps_earlier_outputs(tmp_path, capsys, args, line):
    (tmp_path / "empty").mkdir()
    manifest = _earlier_run(tmp_path / "out")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = full_run([*args, "--set", f"run.output_root={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: " + line.replace("{tmp}", str(tmp_path))), err
    assert len(err.splitlines()) == 1 + line.count("\n") and "Traceback" not in err
    assert manifest.read_text() == '{"hash": "earlier"}'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["default"]


def test_unknown_stage_and_unwritable_output_root(tmp_path, capsys):
    assert one_stage(["bogus"]) == 2
    assert capsys.readouterr().err == ("error: unknown stage 'bogus' (stages: ingest, pretrain, proposals, features, "
                                       "cluster, teacher, student, evaluate)\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert full_run(["--set", f"run.output_root={blocker}/out"]) == 2
    assert capsys.readouterr().err.startswith(f"error: run.output_root: cannot write to {blocker}/out (")


def test_unreachable_s3_endpoint_is_one_line(tmp_path, capsys, monkeypatch):
    port = free_port()  # a loopback port nobody listens on
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert full_run(["--set", "run.output_root=s3://bucket/prefix", "--set", "run.stages=cluster"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.output_root: cannot write to s3://bucket/prefix (") and "Could not connect" in err
    assert len(err.splitlines()) == 1


def test_scripts_print_one_line_and_exit_2_without_traceback(tmp_path):
    """The real scripts, as a user runs them: `jobs/full_run.py` and `jobs/prepare_data.py`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [
        (["jobs/full_run.py", "--set", "cluster.k=-3"], "error: cluster.k: input should be greater than or equal to 2"),
        (["jobs/prepare_data.py", "--source", "waymo", "--input", str(tmp_path / "nonexistent"), "--output",
          str(tmp_path / "out")], f"error: data.root: {tmp_path / 'nonexistent'} does not exist"),
    ]
    for argv, line in cases:
        p = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == line or p.stderr.startswith(line), p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs as output root (root only), unmounted afterwards; `grow()` frees space by resizing it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.ray
def test_full_disk_names_the_stage_and_path_and_the_rerun_finishes_after_space_is_freed(small_disk, capsys):
    disk, grow = small_disk
    args = ["--config", str(REPO / "configs" / "smoke.yaml"), "--set", f"run.output_root={disk}",
            "--set", "run.stages=ingest", "--set", f"tracking.uri=sqlite:///{disk.parent}/mlflow.db"]
    assert full_run(args) == 2
    err = capsys.readouterr().err  # Ray's own log lines go to stderr too (in process)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: stage 'ingest': {disk}/_store/ingest/"), errors
    assert "/frames/part-" in errors[0], errors
    assert errors[0].endswith(".parquet: write failed: [Errno 28] No space left on device"), errors
    grow()
    assert full_run(args) == 0
    out = capsys.readouterr().out
    assert "[ingest] resuming an interrupted run" in out and (disk / "smoke" / "ingest" / "_manifest.json").exists()


@pytest.mark.ray
def test_a_real_out_of_memory_kill_names_the_stage_and_the_rerun_finishes(tmp_path):
    """Ray's memory monitor with a kill threshold below what the machine already uses (2 % of its memory, checked
    every 100 ms, no OOM retries) kills the ingest stage's worker: `jobs/full_run.py` ends with one error line that
    names the stage, exit status 2 (Ray's memory report comes before it);
    the same command without the low threshold then finishes the stage."""
    args = [sys.executable, "jobs/full_run.py", "--config", "configs/smoke.yaml", "--set", "run.stages=ingest",
            "--set", f"run.output_root={tmp_path / 'out'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    oom = {**env, "RAY_memory_usage_threshold": "0.02", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_task_oom_retries": "0"}
    p = subprocess.run(args, cwd=REPO, env=oom, capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() + p.stdout.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("error: stage 'ingest': a worker ran out of memory ("), errors
    assert p.stderr.strip().splitlines()[-1] == errors[0]  # last, after Ray's own memory report
    assert not (tmp_path / "out" / "smoke" / "ingest" / "_manifest.json").exists()
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "smoke" / "ingest" / "_manifest.json").exists()


def test_stage_failures_name_the_stage_and_bugs_keep_their_traceback():
    import ray.exceptions

    from raydseg.errors import StorageError, UserError, in_stage

    oom = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node")
    named = in_stage("features", oom)
    assert type(named) is UserError and named.problems == [
        "stage 'features': a worker ran out of memory (Task was killed due to the node running low on memory.); give "
        "its workers more memory or smaller batches and rerun: finished parts are kept"]
    remote = RuntimeError("ray::MapBatches(work)()\nTraceback ...\nraydseg.errors.StorageError: /o/part-1.parquet: "
                          "write failed: [Errno 28] No space left on device\n\nThe above exception was ...")
    named = in_stage("proposals", remote)  # Ray Data / Ray Train keep only the text of a task's error
    assert type(named) is StorageError and named.problems == [
        "stage 'proposals': /o/part-1.parquet: write failed: [Errno 28] No space left on device"]
    assert in_stage("cluster", KeyError("a bug")) is None
