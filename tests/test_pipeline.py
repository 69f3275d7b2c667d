"""Ingest and the pipeline's resume logic on real Ray clusters, and jobs/full_run.py as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydseg import outputs, storage
from raydseg.config import load_config
from raydseg.data.schema import table_to_frames, validate_frame
from raydseg.errors import UserError
from raydseg.pipeline import run_pipeline

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent
TINY = ["synthetic.n_sequences=2", "synthetic.frames_per_sequence=3", "synthetic.width=160",
        "synthetic.height=80", "synthetic.eval_images_per_condition=2", "data.frames_per_part=2"]


def tiny_cfg(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"run.output_root={tmp_path / 'out'}", "run.stages=ingest",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra])


def test_ingest_on_two_node_cluster_writes_valid_frames_and_eval_splits(ray_two_nodes, mlflow_server, tmp_path):
    cfg = tiny_cfg(tmp_path, f"tracking.uri={mlflow_server}")  # sqlite on one node's disk is refused on two nodes
    result = run_pipeline(cfg, log=lambda m: None)
    frames_dir = storage.join(result.run_root, "ingest", "frames")
    rows = table_to_frames(storage.read_table(frames_dir))
    assert len(rows) == 6 and len({r["frame_id"] for r in rows}) == 6
    assert all(validate_frame(r) is None for r in rows)
    assert len(storage.listdir(frames_dir)) == 4  # 2 sequences x ceil(3 / 2) parts
    manifest = storage.read_json(storage.join(result.run_root, "ingest", "_manifest.json"))
    assert manifest["counts"]["frames"] == 6 and manifest["n_rejects"] == 0
    for cond in ("day", "night", "fog"):
        images = list(Path(result.run_root, "ingest", "eval", cond, "leftImg8bit", "val").rglob("*_leftImg8bit.png"))
        assert len(images) == 2


def test_interrupted_stage_resumes_only_unfinished_shards(ray_local, tmp_path):
    cfg = tiny_cfg(tmp_path)
    first = run_pipeline(cfg, log=lambda m: None)
    ingest_dir = Path(first.run_root, "ingest")
    before = {p.name: p.read_bytes() for p in (ingest_dir / "frames").iterdir()}
    # simulate a crash in the middle of the stage: shard 1 unfinished, no manifest yet
    (ingest_dir / "_manifest.json").unlink()
    (ingest_dir / "_shards" / "00001.json").unlink()
    for p in (ingest_dir / "frames").glob("part-00001-*"):
        p.unlink()
    logs = []
    second = run_pipeline(cfg, log=logs.append)
    assert any("resuming an interrupted run" in m for m in logs)
    report = second.reports[0]
    assert report.status == "ran" and report.counts["shards_resumed"] == 1 and report.counts["frames"] == 6
    after = {p.name: p.read_bytes() for p in (ingest_dir / "frames").iterdir()}
    assert after.keys() == before.keys()
    assert table_to_frames(storage.read_table(str(ingest_dir / "frames"))) is not None
    # a change of config writes under a new key next to the earlier output, which stays whole
    old_dir = Path(second.stage_dirs["ingest"])
    third = run_pipeline(tiny_cfg(tmp_path, "synthetic.frames_per_sequence=2"), log=logs.append)
    assert third.reports[0].counts["frames"] == 4 and third.stage_dirs["ingest"] != str(old_dir)
    assert len(list((ingest_dir / "frames").iterdir())) == 2  # the run folder's link follows the new key
    assert {p.name: p.read_bytes() for p in (old_dir / "frames").iterdir()} == after
    assert (old_dir / "_manifest.json").exists()


def test_variants_share_outputs_and_gc_removes_only_unreferenced_ones(ray_local, tmp_path, capsys):
    a = run_pipeline(tiny_cfg(tmp_path, "run.name=a"), log=lambda m: None)
    logs = []
    b = run_pipeline(tiny_cfg(tmp_path, "run.name=b"), log=logs.append)  # same config, another run: shared
    assert b.reports[0].status == "skipped" and b.stage_dirs == a.stage_dirs
    assert os.path.realpath(Path(b.run_root, "ingest")) == a.stage_dirs["ingest"]
    run_pipeline(tiny_cfg(tmp_path, "run.name=b", "synthetic.frames_per_sequence=2"), log=lambda m: None)
    out = str(tmp_path / "out")
    assert outputs.gc(out, yes=True, log=logs.append) == []  # run a still maps the first ingest
    (Path(a.run_root) / outputs.RUN_FILE).unlink()  # run a is forgotten: its ingest is b's old one, unreferenced
    assert outputs.gc(out, yes=False, log=logs.append) == []  # listed, not removed without --yes
    stale = os.path.relpath(a.stage_dirs["ingest"], out)
    assert any(m.endswith(stale) and "MiB" in m for m in logs) and "kept 1 outputs" in logs[-1]
    assert Path(a.stage_dirs["ingest"], "_manifest.json").exists()
    assert subprocess.run([sys.executable, "-m", "raydseg.cli", "gc", "--output-root", out, "--yes"],
                          capture_output=True, text=True, cwd=REPO).returncode == 0
    assert not Path(a.stage_dirs["ingest"]).exists()
    assert len(list(Path(out, outputs.STORE, "ingest").iterdir())) == 1  # b's current ingest is kept


def test_output_of_the_layout_before_the_store_is_adopted_not_rerun(ray_local, tmp_path):
    first = run_pipeline(tiny_cfg(tmp_path), log=lambda m: None)
    link = Path(first.run_root, "ingest")
    store_dir = Path(first.stage_dirs["ingest"])
    link.unlink()
    store_dir.rename(link)  # the old layout: a real folder <run>/ingest with its manifest
    logs = []
    second = run_pipeline(tiny_cfg(tmp_path), log=logs.append)
    assert second.reports[0].status == "skipped" and any("moved the earlier output" in m for m in logs)
    assert link.is_symlink() and Path(second.stage_dirs["ingest"], "_manifest.json").exists()
    forced = run_pipeline(tiny_cfg(tmp_path, "run.force=ingest"), log=logs.append)
    assert forced.reports[0].status == "ran" and f"[ingest] run.force: clearing {store_dir} to rerun it" in logs
    with pytest.raises(UserError, match=r"^stage 'proposals' needs stage 'ingest' of the same config, which has "
                                        r"not finished \(.*/_store/ingest/[0-9a-f]{16}/_manifest.json missing\): "):
        run_pipeline(tiny_cfg(tmp_path, "run.stages=proposals", "synthetic.n_sequences=1"), log=logs.append)


def test_ingest_on_s3(ray_local, tmp_path, s3_bucket):
    cfg = tiny_cfg(tmp_path, f"run.output_root=s3://{s3_bucket}/runs", "synthetic.n_sequences=1",
                   "synthetic.eval_conditions=day")
    result = run_pipeline(cfg, log=lambda m: None)
    assert result.run_root == f"s3://{s3_bucket}/runs/default"
    assert result.stage_dirs["ingest"].startswith(f"s3://{s3_bucket}/runs/_store/ingest/")
    frames_dir = outputs.resolve(storage.join(result.run_root, "ingest", "frames"))  # through run.json
    assert frames_dir == storage.join(result.stage_dirs["ingest"], "frames")
    assert len(table_to_frames(storage.read_table(frames_dir))) == 3
    assert storage.read_json(storage.join(result.stage_dirs["ingest"], "_manifest.json"))["counts"]["frames"] == 3


def _full_run(tmp_path, tracking_uri, *extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS")
    args = [sys.executable, str(REPO / "jobs" / "full_run.py"), *[a for o in TINY for a in ("--set", o)],
            "--set", f"run.output_root={tmp_path / 'out'}", "--set", "run.stages=ingest", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_full_run_twice_second_skips_ingest(tmp_path, mlflow_server):
    import mlflow

    first = _full_run(tmp_path, mlflow_server)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[ingest] done" in first.stdout and "MLflow parent run:" in first.stdout
    assert "Ray dashboard: http://127.0.0.1:" in first.stdout  # a local cluster serves its state API
    second = _full_run(tmp_path, mlflow_server)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[ingest] skipped" in second.stdout
    run_id = second.stdout.split("MLflow parent run:")[1].split()[0]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["cluster.k"] == str(load_config().cluster.k)
    assert run.data.tags["raydseg.ingest"] == "skipped"
    first_id = first.stdout.split("MLflow parent run:")[1].split()[0]
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first_id}'")
    assert [c.data.metrics["ingest/frames"] for c in children] == [6.0]


def test_full_run_rejects_bad_config_with_clear_message(tmp_path, mlflow_server):
    bad = _full_run(tmp_path, mlflow_server, "--set", "cluster.k=many")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1] == "error: cluster.k: input should be a valid integer, got 'many'"


def test_a_stage_output_version_changes_its_key_and_the_keys_below_it_only():
    """OUTPUT_VERSION: the same config gives new outputs after a code change, so the older stores are not reused."""
    import types

    from raydseg.config import load_config
    from raydseg.outputs import stage_keys

    def stage(inputs, version=0):
        return types.SimpleNamespace(INPUTS=inputs, CONFIG_SECTIONS=("data",), OUTPUT_VERSION=version)

    cfg = load_config()
    before = stage_keys(cfg, {"a": stage(()), "b": stage(("a",)), "c": stage(("b",))})
    after = stage_keys(cfg, {"a": stage(()), "b": stage(("a",), 1), "c": stage(("b",))})
    assert before["a"] == after["a"]
    assert before["b"]["hash"] != after["b"]["hash"] and after["b"]["config_hash"].endswith("-seed0-v1")
    assert before["c"]["hash"] != after["c"]["hash"] and before["c"]["config_hash"] == after["c"]["config_hash"]


LIVE_ACTOR_STATE = """
import ray
from raydseg.config import load_config
from raydseg.pipeline import init_ray

init_ray(load_config(None))


@ray.remote
class Probe:
    def state_of(self, actor_id):  # what Ray Train's placement-group cleaner asks, from inside the cluster
        from ray.util.state import get_actor
        return get_actor(actor_id, timeout=10).state


probe = Probe.remote()
print("state:", ray.get(probe.state_of.remote(probe._actor_id.hex())))
"""


def test_a_local_cluster_serves_its_state_api_to_its_own_workers(tmp_path):
    # Ray Train's placement-group cleaner asks the state API from a worker whether the controller lives; without it
    # `make run` logged a warning every second of training (docs/results.md, End to end)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", LIVE_ACTOR_STATE], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "state: ALIVE" in done.stdout


def test_free_ports_skip_the_port_ray_keeps_for_its_dashboard_agent():
    # the OS handed a ladder run's dashboard 52365, and ray.init failed (issue 15, eighteenth session)
    from ray._private import ray_constants

    from raydseg.ports import RAY_FIXED_PORTS, free_port

    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT in RAY_FIXED_PORTS
    refused = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='local', dashboard_port=52365)"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "port number 52365 that is used by other components" in refused.stderr
    draws = iter([52365, 52365, 41234])
    assert free_port(draw=lambda host: next(draws)) == 41234
