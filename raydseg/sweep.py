"""Config sweeps, the paper's ablations among them, as one command:
`raydseg sweep [SPEC.yaml] [--config C] [--grid section.key=v1,v2,...]... [--set section.key=v]... [--name N]`
(also `python jobs/sweep.py ...`; shipped specs: configs/sweeps/).

Every variant is a full run named `<sweep>-<variant>`. The content-keyed store (`raydseg.outputs`) lets variants
share each upstream stage their configs have in common, with each other and with earlier runs. One MLflow run per
sweep has a child run per variant, the comparison table (`sweep/table.md`, `.csv`) and a plot of each eval metric
against the swept values (`sweep/<metric>.png`); the same files go to `<output_root>/_sweeps/<sweep>/`.
"""
from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from raydseg.config import PACKAGED_CONFIGS, Config, ConfigError, RunName, load_config
from raydseg.eval.compare import mean_spread, to_csv, to_markdown

SWEEPS_DIR = "_sweeps"  # under the output root, next to outputs.STORE
SEED_KEY = "run.seed"  # a swept seed is averaged over in the table (mean and spread), not shown as a variant
TABLE_METRICS = ("cluster/purity", "eval/features/knn_acc")  # shown next to every eval/<model>/<set>/miou


class SweepSpec(BaseModel):
    """A sweep file: `variants` (name -> overrides; the paper's one-at-a-time ablations) crossed with `grid`
    (key -> values; every combination), all on `config` with `set` applied."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: RunName
    config: str = ""  # base config ("" = the packaged default)
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: dict[str, list[str]] = Field(default_factory=dict)


@dataclass
class Variant:
    name: str  # run-name suffix
    label: str  # the name without its seed: the table's row
    overrides: list[str]
    values: dict[str, str]  # swept key -> value (grid keys only)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`section.key=v1,v2` strings -> {section.key: [v1, v2]} (values stay YAML text for load_config)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or "." not in key or not vals:
            raise ConfigError(f"--grid {item}: expected section.key=v1,v2[,...]")
        grid[key.strip()] = vals
    return grid


def variants(spec: SweepSpec) -> list[Variant]:
    """Every variant x grid combination, in order (one 'base' variant when `variants` is empty)."""
    named = spec.variants or {"base": []}
    keys = list(spec.grid)
    out = []
    for (vname, vover), combo in itertools.product(named.items(), itertools.product(*spec.grid.values())):
        values = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in zip(keys, combo)}
        parts = [vname] if spec.variants or not keys else []
        label_parts = parts + [f"{k.split('.')[-1]}{v}" for k, v in values.items() if k != SEED_KEY]
        name = "-".join(parts + [f"{k.split('.')[-1]}{v}" for k, v in values.items()])
        out.append(Variant(_slug(name), _slug("-".join(label_parts)) or "base",
                           [*vover, *(f"{k}={v}" for k, v in values.items())], values))
    return out


def build_configs(spec: SweepSpec) -> list[tuple[Variant, Config]]:
    """Every variant's validated config, before any work starts (a bad value fails the whole sweep at once)."""
    out, problems = [], []
    for v in variants(spec):
        try:
            overrides = [*spec.set, *v.overrides, f"run.name={spec.name}-{v.name}"]
            out.append((v, load_config(spec.config or None, overrides)))
        except ConfigError as e:
            problems += [f"variant {v.name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return out


def eval_digest(cfg: Config, stage_dirs: dict[str, str]) -> str:
    """8 hex digits of the variant's eval images and labels: variants compared "on the same eval sets" (e.g. two
    sources or sensor set-ups, `configs/sweeps/sources.yaml`) show the same digest."""
    import hashlib

    from raydseg import storage
    from raydseg.eval.sets import eval_sets, list_samples

    h = hashlib.sha256()
    for s in eval_sets(cfg, stage_dirs["ingest"]):
        for x in list_samples(s)[:cfg.eval.max_images or None]:
            h.update(s.name.encode())
            for path in (x.image_path, x.label_path):
                h.update(hashlib.sha256(storage.read_bytes(path)).digest())
    return h.hexdigest()[:8]


def variant_metrics(stage_dirs: dict[str, str]) -> dict[str, float]:
    """A finished variant's figures: every metric of evaluate/metrics.json plus the cluster stage's purity."""
    from raydseg import storage
    from raydseg.pipeline import read_manifest

    metrics: dict[str, float] = {}
    path = storage.join(stage_dirs["evaluate"], "metrics.json")
    if storage.exists(path):
        metrics.update(storage.read_json(path))
    cluster = read_manifest(stage_dirs["cluster"]) or {}
    metrics.update({f"cluster/{k}": v for k, v in cluster.get("metrics", {}).items() if k == "purity"})
    return metrics


def table(rows: list[tuple[Variant, dict[str, float]]], swept: list[str], digests: dict[str, str] | None = None
          ) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (one per label: seeds pooled into mean and std in points) of the comparison table; with
    `digests` (variant name -> eval-set digest) a last column of the labels' digests."""
    names = sorted({k for _, m in rows for k in m if k.startswith("eval/") and k.endswith("/miou")})
    names += [k for k in TABLE_METRICS if any(k in m for _, m in rows)]
    keys = [k for k in swept if k != SEED_KEY]
    seeds = len({v.values.get(SEED_KEY) for v, _ in rows})
    header = ["variant", *keys, "seeds", *names]
    out = []
    for label in dict.fromkeys(v.label for v, _ in rows):
        group = [(v, m) for v, m in rows if v.label == label]
        cells = []
        for n in names:
            vals = np.array([m[n] for _, m in group if n in m], dtype=np.float64) * 100
            cells.append(mean_spread(vals) if len(vals) else "")
        out.append([label, *(group[0][0].values.get(k, "") for k in keys), len(group) if seeds > 1 else 1, *cells])
        if digests:
            out[-1].append(" ".join(dict.fromkeys(digests[v.name] for v, _ in group)))
    return header + (["eval sets"] if digests else []), out


def plots(header: list[str], rows: list[list[Any]], n_keys: int) -> dict[str, bytes]:
    """{file name: PNG}: per model, each eval set's mIoU against the variants (numeric x for one numeric key)."""
    from matplotlib.figure import Figure

    from raydseg.eval.plots import fig_png

    labels = [str(r[0]) for r in rows]
    xs: list[float] = list(range(len(rows)))
    if n_keys == 1:
        try:
            xs = [float(r[1]) for r in rows]
        except (TypeError, ValueError):
            pass
    models = sorted({h.split("/")[1] for h in header if h.startswith("eval/") and h.endswith("/miou")})
    out = {}
    for model in models:
        fig = Figure(figsize=(1.2 * len(rows) + 3, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        for i, h in enumerate(header):
            if h.startswith(f"eval/{model}/") and h.endswith("/miou"):
                cells = [str(r[i]) for r in rows]
                mean = [float(c.split(" ± ")[0]) if c else np.nan for c in cells]
                err = [float(c.split(" ± ")[1]) if " ± " in c else 0.0 for c in cells]
                ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=h.split("/")[2])
        ax.set_xticks(xs, labels if n_keys != 1 or xs == list(range(len(rows))) else [str(x) for x in xs],
                      rotation=20, fontsize=8)
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"{model}: mIoU per variant", fontsize=9)
        ax.legend(fontsize=7)
        out[f"{model}_miou.png"] = fig_png(fig)
    return out


@dataclass
class SweepResult:
    parent_run_id: str
    markdown: str
    out_dir: str
    stage_dirs: dict[str, dict[str, str]]  # variant name -> its stage -> store folder


def run_sweep(spec: SweepSpec, log: Callable[[str], None] = print) -> SweepResult:
    """Run every variant as a full run under one MLflow sweep run; then table, plots and their files."""
    import mlflow

    from raydseg import storage, tracking
    from raydseg.pipeline import output_root, run_pipeline

    built = build_configs(spec)
    first = built[0][1]
    uri = tracking.setup(first)
    client = mlflow.MlflowClient(uri)
    experiment = mlflow.get_experiment_by_name(first.tracking.experiment)
    parent = client.create_run(experiment.experiment_id, run_name=f"sweep-{spec.name}",
                               tags={"raydseg.sweep": spec.name})
    parent_id = parent.info.run_id
    client.log_text(parent_id, yaml.safe_dump(spec.model_dump(), sort_keys=False), "sweep/spec.yaml")
    log(f"MLflow sweep run {parent_id}: {len(built)} variants: {', '.join(v.name for v, _ in built)}")
    rows, dirs, digests = [], {}, {}
    try:
        for v, cfg in built:
            log(f"== variant {v.name}: {' '.join(v.overrides) or '(base config)'}")
            result = run_pipeline(cfg, log=log, parent_run_id=parent_id)
            dirs[v.name] = result.stage_dirs
            rows.append((v, variant_metrics(result.stage_dirs)))
            digests[v.name] = eval_digest(cfg, result.stage_dirs)
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    header, body = table(rows, list(spec.grid), digests)
    md = to_markdown(header, body)
    files = {"table.md": md.encode(), "table.csv": to_csv(header, body).encode(),
             **plots(header, body, len([k for k in spec.grid if k != SEED_KEY]))}
    out_dir = storage.join(output_root(first), SWEEPS_DIR, spec.name)
    tracking.save_and_log(files, out_dir, "sweep", parent_id)
    client.set_terminated(parent_id, "FINISHED")
    log(md)
    log(f"sweep table and plots: {out_dir}")
    return SweepResult(parent_id, md, out_dir, dirs)


def load_spec(path: str | None, args: argparse.Namespace) -> SweepSpec:
    """The sweep file (a shipped one by its name too: `k`, `sweeps/k.yaml`), with the command line on top."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():  # a shipped sweep by its name: k, k.yaml, configs/sweeps/k.yaml from a wheel install
            p = PACKAGED_CONFIGS / "sweeps" / (p.name if p.suffix else f"{p.name}.yaml")
        if not p.is_file():
            raise ConfigError(f"sweep file {path} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
    if args.name:
        data["name"] = args.name
    if args.config:
        data["config"] = args.config
    data["set"] = [*data.get("set", []), *args.overrides]
    data["grid"] = {**data.get("grid", {}), **parse_grid(args.grid)}
    data.setdefault("name", "sweep")
    from pydantic import ValidationError

    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"sweep {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]) from None
    if not spec.grid and not spec.variants:
        raise ConfigError("a sweep needs --grid section.key=v1,v2 or a sweep file with grid / variants")
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydseg sweep", description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default=None, help="sweep file (configs/sweeps/: k, density, distillation)")
    p.add_argument("--config", default=None, help="base config (default: the sweep file's, else the packaged default)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="swept values of one key (repeatable: every combination)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every variant (repeatable)")
    p.add_argument("--name", default=None, help="sweep name: runs are <name>-<variant> (default: the file's)")
    args = p.parse_args(argv)
    result = run_sweep(load_spec(args.spec, args))
    print(f"MLflow sweep run: {result.parent_run_id}")
    return 0
