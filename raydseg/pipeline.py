"""Stage registry and resume logic: run the stages in order under one MLflow parent run, skip finished ones.

Each stage writes into its content-keyed store folder (`raydseg.outputs`): the key hashes the config sections the
stage reads plus its inputs' keys. A store folder with its `_manifest.json` (written last) is finished and is
skipped; one with only `_started.json` is an interrupted run and resumes (finished parts are kept). A changed
config gives new keys, so it never clears an earlier output; `run.force` clears and reruns a stage's folder.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from raydseg import outputs, storage, tracking
from raydseg.checks import check_inputs
from raydseg.config import Config, dump_yaml
from raydseg.data.schema import rejects_table
from raydseg.errors import UserError, in_stage
from raydseg.ports import free_port
from raydseg.procstats import peak_rss_gb

STAGE_ORDER = ["ingest", "pretrain", "proposals", "features", "cluster", "teacher", "student", "evaluate"]
OPT_IN = {"pretrain": "pretrain.enabled"}  # stages left out of the default list unless this config flag is true
MANIFEST = "_manifest.json"
STARTED = "_started.json"
# driver environment that stage tasks on other nodes need too (no secrets: nodes use their instance profile)
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class StageResult:
    """What a stage reports: counts (frames, segments...), metrics (floats), rejects ({id, reason})."""

    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)


@dataclass
class StageContext:
    cfg: Config
    run_root: str
    out_dir: str
    tracking_uri: str
    mlflow_run_id: str = ""
    parent_run_id: str = ""
    dirs: dict[str, str] = field(default_factory=dict)  # stage -> its output folder (the run's store folders)

    def stage_dir(self, name: str) -> str:
        return self.dirs.get(name) or storage.join(self.run_root, name)


@dataclass
class StageReport:
    name: str
    status: str  # ran | skipped
    seconds: float
    counts: dict[str, int]
    metrics: dict[str, float]
    n_rejects: int
    driver_peak_rss_gb: float = 0.0  # the driver process's peak memory up to the end of this stage (GiB)


def output_root(cfg: Config) -> str:
    """run.output_root; a local root is made absolute, since Ray workers run in other directories."""
    return cfg.run.output_root if storage.is_s3(cfg.run.output_root) else os.path.abspath(cfg.run.output_root)


def run_root(cfg: Config) -> str:
    """<output_root>/<name>: the run folder (config.yaml, run.json and, locally, a link per stage)."""
    return storage.join(output_root(cfg), cfg.run.name)


def available_stages() -> list[str]:
    """Stages whose module exists, in pipeline order."""
    return [s for s in STAGE_ORDER if importlib.util.find_spec(f"raydseg.stages.{s}") is not None]


def default_stages(cfg: Config) -> list[str]:
    """The stages a run without run.stages runs: the available ones, less opt-in stages whose flag is off."""
    def enabled(stage: str) -> bool:
        section, key = OPT_IN[stage].split(".")
        return bool(getattr(getattr(cfg, section), key))
    return [s for s in available_stages() if s not in OPT_IN or enabled(s)]


def load_stage(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise UserError(f"unknown stage '{name}' (stages: {', '.join(STAGE_ORDER)})")
    return importlib.import_module(f"raydseg.stages.{name}")


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stage_keys(cfg: Config) -> dict[str, dict]:
    """Every available stage's key (`raydseg.outputs.stage_keys`), in pipeline order."""
    return outputs.stage_keys(cfg, {s: load_stage(s) for s in available_stages()})


def read_manifest(stage_dir: str) -> dict | None:
    path = storage.join(stage_dir, MANIFEST)
    return storage.read_json(path) if storage.exists(path) else None


def init_ray(cfg: Config) -> str:
    """Join RAY_ADDRESS / run.ray_address when set (ray job submit), else start a local cluster. Returns the Ray
    dashboard's URL ('' when Ray was already initialised or the cluster has none)."""
    import ray

    if ray.is_initialized():
        return ""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if env:  # under `ray job submit`, merge with the job's runtime env (working_dir, its env_vars) instead of failing
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    dashboard = {}
    if address is None:
        # Ray Train's placement-group cleaner asks the state API, which the dashboard serves, whether the controller
        # lives. Without one it logs a warning every second; with two local clusters on the machine it cannot tell
        # which to ask and its thread dies. So a local cluster gets a dashboard on its own port, and its workers
        # are told where it is.
        port = free_port()
        dashboard = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local" always starts a fresh cluster instead of joining a stray `ray start` on this machine
    context = ray.init(address=address or "local", runtime_env={"env_vars": env} if env else None,
                       log_to_driver=True, configure_logging=False, **dashboard)
    return f"http://{context.dashboard_url}" if context.dashboard_url else ""


def check_cluster(cfg: Config, stages: list[str], log: Callable[[str], None] = print) -> None:
    """Before any stage, against the connected Ray cluster: every worker request of `stages` fits some node (alive
    or launchable by the autoscaler; `raydseg.preflight`), and a local MLflow store is used on one node only."""
    from raydseg.preflight import check_connected

    check_connected(cfg, stages, log)
    tracking.check_locality(tracking.tracking_uri(cfg))


def check_upstream(wanted: list[str], dirs: dict[str, str]) -> None:
    """Every input of a wanted stage that this run does not make has finished under the same config."""
    for name in wanted:
        for i in load_stage(name).INPUTS:
            if i not in wanted and read_manifest(dirs[i]) is None:
                raise UserError(f"stage '{name}' needs stage '{i}' of the same config, which has not finished "
                                f"({storage.join(dirs[i], MANIFEST)} missing): run it first, or the whole pipeline")


def run_stage(cfg: Config, name: str, root: str, dirs: dict[str, str], key: dict[str, Any], uri: str,
              parent_run_id: str, log: Callable[[str], None] = print) -> StageReport:
    """Run stage `name` into its store folder `dirs[name]` (skip it when finished; resume it when interrupted)."""
    stage = load_stage(name)
    out_dir = dirs[name]
    manifest = read_manifest(out_dir)
    if manifest and manifest["hash"] == key["hash"] and name not in cfg.run.force:
        log(f"[{name}] skipped: finished output with matching manifest in {out_dir}")
        return StageReport(name, "skipped", 0.0, manifest.get("counts", {}), manifest.get("metrics", {}),
                           manifest.get("n_rejects", 0))
    started_path = storage.join(out_dir, STARTED)
    if manifest or name in cfg.run.force:  # run.force (a keyed folder holds no other key's manifest)
        log(f"[{name}] run.force: clearing {out_dir} to rerun it")
        storage.rmtree(out_dir)
    elif storage.exists(started_path):
        log(f"[{name}] resuming an interrupted run in {out_dir}")
    storage.makedirs(out_dir)
    outputs.link(root, name, out_dir)
    storage.write_json(started_path, key)
    log(f"[{name}] running ...")
    t0 = time.time()
    with tracking.child_run(name, parent_run_id) as child_id:
        ctx = StageContext(cfg=cfg, run_root=root, out_dir=out_dir, tracking_uri=uri, mlflow_run_id=child_id,
                           parent_run_id=parent_run_id, dirs=dirs)
        try:
            result: StageResult = stage.run(ctx)
        except Exception as e:  # noqa: BLE001 - re-raised: named when the user can act on it, else unchanged
            named = in_stage(name, e)
            if named is None:
                raise
            raise named from e
        seconds = time.time() - t0
        storage.write_table(rejects_table(result.rejects), storage.join(out_dir, "rejects.parquet"))
        tracking.log_metrics({**result.counts, **result.metrics, "rejects": len(result.rejects),
                              "wall_s": seconds}, prefix=f"{name}/")
    reasons: dict[str, int] = {}
    for r in result.rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    storage.write_json(storage.join(out_dir, MANIFEST), {
        **key, "stage": name, "counts": result.counts, "metrics": result.metrics,
        "n_rejects": len(result.rejects), "reject_reasons": reasons, "wall_s": round(seconds, 3),
        "code_version": code_version(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    log(f"[{name}] done in {seconds:.1f}s: {result.counts} rejects={len(result.rejects)}")
    return StageReport(name, "ran", seconds, result.counts, result.metrics, len(result.rejects))


@dataclass
class PipelineResult:
    parent_run_id: str
    run_root: str
    reports: list[StageReport]
    stage_dirs: dict[str, str]  # stage -> its store folder (every available stage, run or not)


def run_pipeline(cfg: Config, stages: list[str] | None = None, log: Callable[[str], None] = print,
                 parent_run_id: str | None = None) -> PipelineResult:
    """Run `stages` (default: cfg.run.stages or `default_stages`) in pipeline order under one MLflow run (nested
    under `parent_run_id` when given: a sweep's variant)."""
    import mlflow

    wanted = stages or cfg.run.stages or default_stages(cfg)
    for s in wanted:
        load_stage(s)  # fail fast on unknown names
    wanted = [s for s in STAGE_ORDER if s in wanted]
    check_inputs(cfg, wanted)  # every bad path, backbone or weights file now, before Ray starts
    root, keys = run_root(cfg), stage_keys(cfg)
    for name in keys:
        outputs.adopt_legacy(output_root(cfg), cfg.run.name, name, log)
    rel = {s: outputs.store_rel(s, k["hash"]) for s, k in keys.items()}
    dirs = {s: storage.join(output_root(cfg), r) for s, r in rel.items()}
    dashboard = init_ray(cfg)
    if dashboard:
        log(f"Ray dashboard: {dashboard}")
    check_cluster(cfg, wanted, log)  # requests that could never be scheduled, a tracking store other nodes cannot reach
    check_upstream(wanted, dirs)
    uri = tracking.setup(cfg)
    storage.makedirs(root)
    storage.write_bytes(storage.join(root, "config.yaml"), dump_yaml(cfg).encode())
    outputs.write_run(root, rel)
    for name in keys:
        outputs.link(root, name, dirs[name])
    reports = []
    with mlflow.start_run(run_name=cfg.run.name, parent_run_id=parent_run_id) as parent:
        tracking.log_params(cfg.flat())
        mlflow.log_text(dump_yaml(cfg), "config.yaml")
        mlflow.set_tags({"raydseg.run_root": root, **tracking.package_versions()})
        log(f"MLflow parent run {parent.info.run_id} ({uri}); outputs in {root}")
        for name in wanted:
            r = run_stage(cfg, name, root, dirs, keys[name], uri, parent.info.run_id, log)
            r.driver_peak_rss_gb = peak_rss_gb()
            reports.append(r)
            mlflow.set_tags({f"raydseg.{name}": r.status, f"raydseg.output.{name}": dirs[name]})
            # the parent carries every stage's figures too (also of skipped stages, from their manifest), so
            # that runs compare side by side in the MLflow UI without opening child runs
            tracking.log_metrics({**r.counts, **r.metrics, "rejects": r.n_rejects,
                                  "driver_peak_rss_gb": r.driver_peak_rss_gb}, prefix=f"{name}/")
            reused = getattr(load_stage(name), "parent_metrics", None)  # what the stage logs to the parent itself
            if r.status == "skipped" and reused is not None:
                tracking.log_metrics(reused(dirs[name]))
    log(summary_table(reports))
    return PipelineResult(parent.info.run_id, root, reports, dirs)


HEADLINE = ("miou", "purity", "loss", "per_s", "recall")  # metrics the summary table shows


def summary_table(reports: list[StageReport]) -> str:
    rows = [("stage", "status", "time_s", "rejects", "counts / metrics")]
    for r in reports:
        key = {k: round(v, 4) for k, v in r.metrics.items() if any(h in k for h in HEADLINE) and "iou_" not in k}
        shown = {**dict(list(r.counts.items())[:4]), **dict(list(key.items())[:8])}
        text = ", ".join(f"{k}={v}" for k, v in shown.items())
        rows.append((r.name, r.status, f"{r.seconds:.1f}", str(r.n_rejects), text))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4] for row in rows]
    return "\n".join(lines)
