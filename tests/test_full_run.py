"""jobs/full_run.py end to end, as users run it: on S3 with a real MLflow server, and killed and restarted. All on
configs/smoke.yaml (tiny, about a minute). `ray job submit` to a started head: tests/test_job_submit.py."""
from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raydseg import outputs, storage
from raydseg.eval.metrics import apply_mapping, scores

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
STAGES = ["ingest", "proposals", "features", "cluster", "teacher", "student", "evaluate"]
# outputs that must be identical between an interrupted-and-resumed run and an uninterrupted one
# credentials in the job's environment, whose values must appear nowhere in MLflow
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY": "awssecret" + secrets.token_hex(12),
              "RAY_AUTH_TOKEN": "raytoken" + secrets.token_hex(12)}
DETERMINISTIC = ["ingest/frames", "proposals/segments", "features", "cluster/assignments", "cluster/pseudolabels"]


def at(root: str, *rel: str) -> str:
    """A path of a run folder: on s3:// through its run.json (there are no links there)."""
    return outputs.resolve(storage.join(root, *rel))


def job_env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def full_run_args(output_root: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "full_run.py"), "--config", SMOKE,
            "--set", f"run.output_root={output_root}", *extra]


def parent_run_id(stdout: str) -> str:
    return stdout.split("MLflow parent run:")[1].split()[0]


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, s3_endpoint, mlflow_server):
    """One uninterrupted smoke run with input and output on S3 (moto) and tracking on the MLflow server."""
    import boto3

    bucket = "fullrun-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    cwd = tmp_path_factory.mktemp("s3run")
    proc = subprocess.run(full_run_args(f"s3://{bucket}/runs"), capture_output=True, text=True,
                          env={**job_env(mlflow_server), **SECRET_ENV}, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, f"s3://{bucket}/runs/smoke"


def test_full_pipeline_on_s3_tracked_on_mlflow_server(s3_run, mlflow_server):
    import mlflow

    proc, root = s3_run
    for stage in STAGES:
        assert f"[{stage}] done" in proc.stdout, stage
        manifest = storage.read_json(at(root, stage, "_manifest.json"))
        assert manifest["stage"] == stage and manifest["n_rejects"] == 0
    assert not os.path.exists("outputs/smoke"), "an s3:// output root must not write locally"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(parent_run_id(proc.stdout))
    assert parent.data.params["run.output_root"].startswith("s3://")
    assert all(parent.data.tags[f"raydseg.{s}"] == "ran" for s in STAGES)
    from importlib.metadata import version

    assert parent.data.tags["raydseg.version.torch"] == version("torch")
    assert parent.data.tags["raydseg.version.timm"] == version("timm")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == sorted(STAGES)
    metrics = parent.data.metrics
    for model in ("teacher", "student"):  # the logged mIoU is the saved confusion under the saved mapping
        mapping = storage.read_json(at(root, "evaluate", "mappings", f"{model}.json"))
        (key,) = [k for k in mapping if k.endswith("/hungarian")]
        for split in ("day", "night"):
            conf = np.load(io.BytesIO(storage.read_bytes(
                at(root, "evaluate", "confusion", model, f"synthetic_{split}.npy"))))
            assert conf.sum() > 0
            want = scores(apply_mapping(conf, np.asarray(mapping[key])))["miou"]
            assert metrics[f"eval/{model}/synthetic_{split}/miou"] == pytest.approx(want, abs=1e-12)
    assert 0.0 < metrics["cluster/purity_random"] <= metrics["cluster/purity"] <= 1.0
    evaluate = next(c for c in children if c.data.tags["mlflow.runName"] == "evaluate")
    assert "evaluate/report.html" in [a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluate")]
    assert storage.exists(at(root, "evaluate", "report.html"))


def test_no_secret_reaches_mlflow(s3_run, mlflow_server, tmp_path):
    """The job ran with AWS_SECRET_ACCESS_KEY and RAY_AUTH_TOKEN set: no param, tag, metric name or artifact of
    its parent or child runs holds either value."""
    import mlflow

    proc, _ = s3_run
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(parent_run_id(proc.stdout))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = [parent, *children]
    assert len(runs) == 1 + len(STAGES)
    texts = []
    for run in runs:
        texts += [*run.data.params, *map(str, run.data.params.values()), *run.data.tags,
                  *map(str, run.data.tags.values()), *run.data.metrics]
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id),
                                                    tracking_uri=mlflow_server)
        files = [p for p in Path(local).rglob("*") if p.is_file()]
        texts += [p.read_bytes().decode("latin-1") for p in files]
    assert len(texts) > 100
    for name, value in SECRET_ENV.items():
        assert not [t for t in texts if value in t], name


def _tables_equal(a_root: str, b_root: str, rel: str) -> None:
    a, b = storage.read_table(at(a_root, rel)), storage.read_table(at(b_root, rel))
    assert a.num_rows == b.num_rows > 0, rel
    if rel == "features":  # floats from two processes: equal up to kernel-level rounding
        da, db = (np.array(t["descriptor"].to_pylist(), np.float32) for t in (a, b))
        np.testing.assert_allclose(da, db, atol=1e-5, err_msg=rel)
        a, b = a.drop(["descriptor"]), b.drop(["descriptor"])
    assert a.equals(b), rel


def _model_digest(model_dir: str) -> str:
    from raydseg.models.io import load_model
    from raydseg.train.engine import weights_digest

    return weights_digest(load_model(model_dir))


def _markers(folder: Path) -> dict[str, int]:
    """Finished-part markers (not temp files) and their modification times, ns."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.is_dir() else {}


def test_run_killed_mid_stage_restarts_and_matches_uninterrupted_run(s3_run, tmp_path, mlflow_server):
    """SIGKILL the whole job (driver and its local Ray) while `features` has finished some parts, rerun. It stops
    after the teacher (the student's own restart is tests/test_student.py's)."""
    _, s3_root = s3_run
    out = tmp_path / "out"
    root = out / "smoke"
    args = full_run_args(str(out), "--set", "features.batch_size=1", "--set", f"run.stages={','.join(STAGES[:5])}")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(mlflow_server), cwd=tmp_path, start_new_session=True)
    markers = root / "features" / "_parts"
    deadline = time.time() + 300
    while time.time() < deadline and not (markers.is_dir() and any(markers.iterdir())):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # Ray's workers are not all in the driver's process group: one may still finish its part before it notices
    # that its raylet died. Wait until the markers stop changing, then snapshot them.
    done = _markers(markers)
    for _ in range(30):
        time.sleep(1)
        done, before = _markers(markers), done
        if done == before:
            break
    assert not (root / "features" / "_manifest.json").exists(), "killed too late: features had finished"

    again = subprocess.run(args, capture_output=True, text=True, env=job_env(mlflow_server), cwd=tmp_path,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "[ingest] skipped" in again.stdout and "[proposals] skipped" in again.stdout
    assert "[features] done" in again.stdout
    report = storage.read_json(str(root / "features" / "_manifest.json"))
    assert report["counts"]["parts_resumed"] == len(done) >= 1
    assert report["counts"]["parts"] > len(done), "nothing was left to redo: the kill came too late"
    assert {n: m for n, m in _markers(markers).items() if n in done} == done, "a finished part was redone"
    for rel in DETERMINISTIC:
        _tables_equal(str(root), s3_root, rel)
    # the same seed: bit-identical trained weights
    assert _model_digest(str(root / "teacher" / "model")) == _model_digest(f"{s3_root}/teacher/model")
    for stage in STAGES[:5]:
        assert (root / stage / "_manifest.json").exists(), stage
    assert not list(out.rglob("*.tmp*")), "half-written files left behind"


def test_sweep_reuses_an_earlier_runs_outputs_and_deletes_nothing(s3_run, s3_endpoint, mlflow_server, tmp_path):
    """`jobs/sweep.py` on the S3 run's output root: the variant whose config equals the earlier run's skips every
    stage; the other reruns only the stage its change touches (evaluate); no object of the earlier run changes."""
    import boto3
    import mlflow

    _, s3_root = s3_run
    bucket = s3_root.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def objects() -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    before = objects()
    args = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", SMOKE, "--name", "abl",
            "--set", f"run.output_root=s3://{bucket}/runs", "--grid", "eval.n_overlays=1,2"]
    proc = subprocess.run(args, capture_output=True, text=True, env=job_env(mlflow_server), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    same, changed = proc.stdout.split("== variant n_overlays2")  # smoke.yaml has eval.n_overlays 1
    assert all(f"[{s}] skipped" in same for s in STAGES), same[-3000:]
    assert all(f"[{s}] skipped" in changed for s in STAGES[:6]) and "[evaluate] done" in changed
    after = objects()
    assert {k: after.get(k) for k in before} == before, "an object of the earlier run changed or went"
    assert {k.split("/")[2] for k in set(after) - set(before) if k.startswith("runs/_store/")} == {"evaluate"}

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    sweep_id = proc.stdout.split("MLflow sweep run:")[1].split()[0]
    sweep = client.get_run(sweep_id)
    children = client.search_runs([sweep.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == ["abl-n_overlays1", "abl-n_overlays2"]
    assert {a.path for a in client.list_artifacts(sweep_id, "sweep")} >= {
        "sweep/table.md", "sweep/table.csv", "sweep/spec.yaml", "sweep/teacher_miou.png", "sweep/student_miou.png"}
    table = storage.read_bytes(f"s3://{bucket}/runs/_sweeps/abl/table.md").decode().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["variant", "eval.n_overlays", "seeds"]
    col = header.index("eval/student/synthetic_day/miou")
    assert header[-1] == "eval sets" and len({line.split("|")[-2].strip() for line in table[2:]}) == 1
    for line, child in zip(table[2:], sorted(children, key=lambda c: c.data.tags["mlflow.runName"])):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == child.data.tags["mlflow.runName"].removeprefix("abl-")
        assert float(cells[col]) == pytest.approx(100 * child.data.metrics["eval/student/synthetic_day/miou"], abs=0.051)


def test_finetune_from_the_student_on_nested_labelled_subsets_scored_on_the_eval_sets(s3_run, mlflow_server,
                                                                                      tmp_path, capsys):
    """`jobs/finetune.py` on the S3 run: a labelled split from unseen scenes, N=2 inside N=4, the student's encoder
    under a 19-class head, each model's logged mIoU its saved confusion's; a rerun keeps the trained models."""
    import mlflow
    import pyarrow.parquet as pq

    from raydseg.config import load_config
    from raydseg.finetune import N_CLASSES, finetune_one

    _, s3_root = s3_run
    args = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--run", s3_root, "--n", "4,2", "--inits", "student",
            "--steps", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, env=job_env(mlflow_server), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = s3_root.rsplit("/", 1)[0] + "/_finetune/smoke"
    parts = {n: pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/data/n{n}/part-00000.parquet"))).to_pydict()
             for n in (2, 4)}
    assert parts[2]["frame_id"] == parts[4]["frame_id"][:2] and len(set(parts[4]["frame_id"])) == 4
    eval_images = {storage.read_bytes(f"{d}/{f}") for d in [at(s3_root, "ingest", "eval", "day", "leftImg8bit",
                                                                "val", "synthcity")] for f in storage.listdir(d)}
    assert eval_images and not eval_images & set(parts[4]["image"]), "a labelled image is an eval image"
    results = storage.read_json(f"{out}/results.json")["results"]
    assert [(r["init"], r["n"]) for r in results] == [("student", 2), ("student", 4)]
    for r in results:
        assert sorted(r["sets"]) == ["synthetic_day", "synthetic_night"]
        for v in r["sets"].values():
            conf = np.array(v["confusion"])
            assert conf.shape == (N_CLASSES, N_CLASSES) and conf.sum() > 0
            assert v["miou"] == pytest.approx(scores(conf)["miou"], abs=1e-12)
    run_id = proc.stdout.split("MLflow run:")[1].split()[0]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert {a.path for a in client.list_artifacts(run_id, "finetune")} == {
        "finetune/table.md", "finetune/results.json", "finetune/miou_vs_n.png"}
    assert client.get_run(run_id).data.metrics["finetune/student/n4/seed0/synthetic_day/miou"] == pytest.approx(
        results[1]["sets"]["synthetic_day"]["miou"])
    # a rerun keeps a trained model (returns before Ray Train starts)
    cfg = load_config(storage.local_copy(f"{s3_root}/config.yaml"))
    assert finetune_one(cfg, f"{out}/data/n2", f"{out}/student-n2-seed0", {}, 1, 0, "student-n2-seed0") == \
        results[0]["model"]
    assert "[finetune] student-n2-seed0: kept" in capsys.readouterr().out
