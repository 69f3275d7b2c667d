"""Quality ladder on the synthetic world over several seeds (issue 15): descriptors, pseudo-labels, teacher,
student, oracle, and the paired distillation ablation.

`python jobs/benchmarks/quality.py --out quality.json [--seeds 0,1,2] [--root /tmp/quality] [--config FILE]
[--pretrained FILE] [--set section.key=value ...] [--ablate ema,soft_targets,refine[,degrade,class_balance,lowlight]]
[--variant NAME=student.key=value ...] [--label-oracles clustering_oracle,label_space_oracle] [--jobs 2]
[--merge LADDER.json ...]`

A finished seed's row is kept in <root>/q<S>/quality_row.json and reused by a call with the same --config / --set
(another fails at once: give another --root). Seeds run in sequence; within a seed, after its pipeline run, the
oracles and the student reruns are independent processes and run `--jobs` at a time, each on cores // jobs torch
threads (teacher, student and eval `torch_threads`: on 2 cores, two one-thread jobs side by side finish sooner than
one two-thread job after the other, whose Ray start-up, data loading and scoring leave a core idle), while this
process scores the run itself. `--jobs 1`: one after the other, on the configured threads. Every run has its own
sqlite MLflow (<root>/mlflow_<run>.db), as sqlite takes one writer at a time.
`--merge` writes the seeds of ladders run in pieces (their --out files, under the same --config / --set) as one
ladder, with its means and paired differences, and runs nothing.

Per seed S (`run.seed` S: its own synthetic world, proposals, clusters and eval scenes), under --root:
- `q<S>`: `jobs/full_run.py` of the embedded default plus --set;
- `knn_random` / `knn_pretrained` / `knn_colour`: k-NN accuracy (k = eval.knn_k) of descriptors of 16 frames'
  LiDAR segments against their majority ground-truth class (the pretrain stage's probe): masked-crop [CLS] of a
  random-init ViT and of the checkpoint --pretrained (default: the config's features.weights when set), and the
  hand-made baseline of a 64-bin colour histogram of the segment's pixels;
- `drive_knn_*`: the same three on a probe large enough to read a gain of a few points: one LiDAR frame of each of
  24 drives of world S and 24 of world 1000 + S, 24 drives against 24 (`drive_knn_segments`: its size; the probe
  above tests 2 drives against 2), and `drive_knn_std_random` / `drive_knn_std_pretrained` on descriptors
  standardised per dimension by the train side's statistics (as MAE's linear probe). Both probes are rescored on a
  finished seed when the checkpoint, its input mean / std or features.descriptor / crop_size differ from its row's
  (`knn_probe_of`);
- `pseudo_miou`: Hungarian mIoU of the run's pseudo-labels on the pixels they cover, against the ground truth;
- `teacher_*` / `student_*`: the evaluate stage's mIoU on day / night / fog (Hungarian mapping fitted on day);
  `*_unseen_*`: the same models and mapping on eval scenes of world 1000 + S, which the run never rendered;
- `oracle_*`: the teacher's architecture, init and step budget trained on the dense ground truth of the same
  images (jobs/benchmarks/teacher_recipe.py --target gt), scored on the same eval images;
- `clustering_oracle_*` / `label_space_oracle_*` (those named by --label-oracles): the teacher recipe trained on the
  pseudo-labels that perfect descriptors and clustering would give (teacher_recipe.py --target segment_gt: each
  segment its majority true class), and on those plus the labels LiDAR never gives, perfectly (`--oracle-extras
  ground,sky`: the ground's true road / sidewalk / terrain, and true sky within the LiDAR's field of view); with
  `oracle_*` and `teacher_*` they split the gap between the teacher and the oracle into clustering, label space and
  the rest;
- `no_<part>_*` / `with_<part>_*` (each part named by --ablate: ema, soft_targets, refine, degrade, class_balance,
  lowlight): the student rerun with that part toggled from the config, from the same teacher, data and seed (a copy
  of q<S> without its student and evaluate outputs), so differences are paired: `no_` turns a part that the config
  has on off, `with_` turns an off part on (the embedded default has student.refine off, so its refinement row is
  `with_refine`);
- `<NAME>_*` (each --variant NAME=student.key=value[;student.key=value]): the student rerun the same way with those
  settings (a recipe candidate, paired like the ablations), also on the unseen world (`<NAME>_unseen_*`).
A seed whose row is finished gets only the ablations / variants it lacks.
Writes {"seeds": [per-seed rows], "summary": {metric: mean, std, se}, "paired": {...}} and prints a markdown
table. All figures are mIoU / accuracy in points (0-100).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

CONDITIONS = ("day", "night", "fog")
# student part: its (off, on) values; on None = the strength StudentConfig defaults to
ABLATIONS = {"ema": ("false", "true"), "soft_targets": ("false", "true"), "refine": ("false", "true"),
             "degrade": ("0", None), "class_balance": ("0", None), "lowlight": ("0", None)}
PAPER_ABLATIONS = ("ema", "soft_targets", "refine")  # the journal version's distillation parts: the default --ablate
LABEL_ORACLES = {"clustering_oracle": ("segment_gt", ""), "label_space_oracle": ("segment_gt", "ground,sky")}
UNSEEN = 1000  # seed S's models are also scored on eval scenes of world UNSEEN + S
PROBE_DRIVES = 24  # per world, of the drive k-NN probe (worlds S and UNSEEN + S)
JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def done_row(root: str, seed: int) -> str:
    """Where seed `seed`'s finished row is kept under `root`, with the --config / --set it ran under (`cli`)."""
    return os.path.join(root, f"q{seed}", "quality_row.json")


def cli_words(cli: list[str] | None) -> str:
    """A row's --config / --set arguments as the one-line error names them."""
    return "unrecorded arguments" if cli is None else " ".join(cli) or "no --config / --set"


def run_pipeline(root: str, name: str, seed: int, cli: list[str], env: dict[str, str]) -> float:
    """`jobs/full_run.py` as run `name` under `root` (its own sqlite MLflow, so that runs can go side by side);
    returns the wall time in s. `cli`: --config FILE / --set overrides, as given to this script."""
    args = [sys.executable, os.path.join(JOBS, "full_run.py"), "--set", f"run.name={name}", "--set",
            f"run.seed={seed}", "--set", f"run.output_root={root}", "--set",
            f"tracking.uri=sqlite:///{os.path.abspath(root)}/mlflow_{name}.db", *cli]
    t0 = time.time()
    subprocess.run(args, check=True, env=env)
    return time.time() - t0


def eval_miou(run: str, model: str) -> dict[str, float]:
    """{condition: mIoU points} of `model` from the run's evaluate/metrics.json (sets synthetic_<condition>)."""
    with open(os.path.join(run, "evaluate", "metrics.json")) as f:
        m = json.load(f)
    keys = {c: f"eval/{model}/synthetic_{c}/miou" for c in CONDITIONS}
    return {c: 100 * m[k] for c, k in keys.items() if k in m}


def stage_mapping(run: str, model: str) -> np.ndarray:
    """(n_pred,) the evaluate stage's Hungarian mapping of `model` onto the 19 classes (fitted on day)."""
    with open(os.path.join(run, "evaluate", "mappings", f"{model}.json")) as f:
        return np.asarray(json.load(f)["19/hungarian"], np.int64)


def bootstrap_se(run: str, model: str, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """{<condition>_se_images / <condition>_se_scenes: standard error (points) of `model`'s mIoU}: the std of the
    mIoU over `n_boot` resamples (with replacement) of the eval images, or of whole scenes (sample id
    `<city>_<scene>_<frame>`: a scene's frames are metres apart and not independent), the stage's Hungarian mapping
    (fitted on day) held fixed."""
    from raydseg.config import load_config
    from raydseg.eval.metrics import apply_mapping, confusion_matrix
    from raydseg.eval.sets import eval_sets, list_samples, load_label, read_prediction

    mapping = stage_mapping(run, model)
    out = {}
    pred_root = os.path.join(run, "evaluate", "predictions", model)
    for eval_set in eval_sets(load_config(os.path.join(run, "config.yaml")), os.path.join(run, "ingest")):
        samples = list_samples(eval_set)
        mapped = np.stack([apply_mapping(confusion_matrix(read_prediction(pred_root, eval_set.name, x.sample_id),
                                                          load_label(x, 19), len(mapping), 19), mapping)
                           for x in samples])
        condition = eval_set.name.removeprefix("synthetic_")
        for unit, groups in (("images", [x.sample_id for x in samples]),
                             ("scenes", [x.sample_id.rsplit("_", 1)[0] for x in samples])):
            units = np.stack([mapped[[g == n for g in groups]].sum(0) for n in sorted(set(groups))])
            out[f"{condition}_se_{unit}"] = bootstrap_std(units, n_boot, np.random.default_rng(seed))
    return out


def bootstrap_std(units: np.ndarray, n_boot: int, rng: np.random.Generator) -> float:
    """The std (points) of the mIoU of `n_boot` resamples with replacement of units (N, C, C) mapped confusions."""
    from raydseg.eval.metrics import scores

    boot = [scores(units[rng.integers(0, len(units), len(units))].sum(0))["miou"] for _ in range(n_boot)]
    return 100 * float(np.std(boot, ddof=1))


def rendered_confusions(nets: dict, syn, condition: str, seed: int) -> dict[str, np.ndarray]:
    """{name: (N, 19, 19) confusions, one per image} of each (net, mapping: pseudo-class -> class) of `nets` on the
    synthetic eval scenes of `condition` rendered for world `seed` (config `syn`); each image is rendered once."""
    from raydseg.data.sources.synthetic import render_eval_images
    from raydseg.eval.metrics import apply_mapping, confusion_matrix
    from raydseg.models.infer import predict_image

    out: dict[str, list] = {name: [] for name in nets}
    for *_, rgb, sem in render_eval_images(condition, syn, seed):
        for name, (net, mapping) in nets.items():
            out[name].append(apply_mapping(confusion_matrix(predict_image(net, rgb), sem, len(mapping), 19), mapping))
    return {name: np.stack(v) for name, v in out.items()}


def run_models(run: str, models: list[str]) -> dict:
    """{model: (net, the evaluate stage's Hungarian mapping)} of a run."""
    from raydseg.models.io import load_model

    return {m: (load_model(os.path.join(run, m, "model")), stage_mapping(run, m)) for m in models}


def unseen_world_miou(run: str, models: list[str], seed: int) -> dict[str, float]:
    """{<model>_unseen_<condition>: mIoU points} of the run's `models` on eval scenes of another world (run.seed
    `seed`, never seen by the run: its own eval seed stream too), each under the run's own Hungarian mapping (fitted
    on its day split)."""
    from raydseg.config import load_config
    from raydseg.eval.metrics import scores

    syn, nets = load_config(os.path.join(run, "config.yaml")).synthetic, run_models(run, models)
    return {f"{m}_unseen_{c}": 100 * scores(per.sum(0))["miou"]
            for c in CONDITIONS for m, per in rendered_confusions(nets, syn, c, seed).items()}


def pseudo_label_miou(run: str) -> dict[str, float]:
    """Hungarian mIoU / pixel accuracy (points) of the stored pseudo-labels on the pixels they cover, and their
    coverage, against the ground truth of the same images."""
    from raydseg import storage
    from raydseg.config import load_config, painted_classes
    from raydseg.data.schema import decode_image
    from raydseg.eval.matching import covered_scores
    from raydseg.parts import part_names

    cfg = load_config(os.path.join(run, "config.yaml"))
    pl_dir = os.path.join(run, "cluster", "pseudolabels")
    labels, gts = [], []
    for name in part_names(pl_dir):
        t = storage.read_table(os.path.join(pl_dir, name), columns=["label", "gt_semantic"])
        labels += [decode_image(v) for v in t.column("label").to_pylist()]
        gts += [decode_image(v) for v in t.column("gt_semantic").to_pylist()]
    sc = covered_scores(np.stack(labels), np.stack(gts), painted_classes(cfg))
    return {"pseudo_miou": 100 * sc["miou"], "pseudo_pixel_acc": 100 * sc["pixel_acc"],
            "pseudo_coverage": 100 * sc["coverage"]}


def descriptor_knn(run: str, weights: str, k: int, seed: int) -> dict[str, float]:
    """`probe_knn` on 16 frames of the run's own ingest (the pretrain stage's probe: 2 drives against 2)."""
    from raydseg.config import load_config
    from raydseg.train.pretrain import build_knn_probe

    cfg = load_config(os.path.join(run, "config.yaml"))
    return probe_knn(build_knn_probe(os.path.join(run, "ingest", "frames"), cfg.proposals, 16, seed), cfg, weights,
                     k, seed)


def drive_knn(root: str, cfg, weights: str, k: int, seed: int) -> dict[str, float]:
    """`probe_knn` as `drive_knn_*` on `PROBE_DRIVES` drives of world `seed` and as many of world UNSEEN + seed, split
    by drive (raydseg.train.pretrain.synthetic_drive_probe), also on standardised descriptors (`drive_knn_std_*`), with
    `drive_knn_segments`: the probe's size."""
    from raydseg.train.pretrain import synthetic_drive_probe

    probe = synthetic_drive_probe(cfg, [seed, UNSEEN + seed], PROBE_DRIVES, os.path.join(root, f"probe{seed}"))
    out = {f"drive_{key}": v for key, v in probe_knn(probe, cfg, weights, k, seed, standardised=True).items()}
    return {**out, "drive_knn_segments": float(len(probe["seg_id"]))}


def probe_knn(probe: dict, cfg, weights: str, k: int, seed: int, standardised: bool = False) -> dict[str, float]:
    """k-NN accuracy (points) of the colour-histogram baseline, a random-init ViT (seeded by `seed`) and `weights` on
    the probe's segments, with the config's features descriptor and crop size; with `standardised` also the ViTs'
    on descriptors standardised per dimension (`knn_std_random`, `knn_std_pretrained`)."""
    import torch

    from raydseg.eval.knn import colour_histogram
    from raydseg.features.backbone import create_backbone, is_random_init
    from raydseg.features.pooling import CROP_DESCRIPTORS
    from raydseg.train.pretrain import probe_cls_descriptors, probe_descriptors, probe_knn_scores

    hist = probe_descriptors(probe, colour_histogram, 64)
    out = {"knn_colour": 100 * probe_knn_scores(probe, hist, k)["knn_acc"]}
    for key, w in (("knn_random", ""), ("knn_pretrained", weights)):
        if key == "knn_pretrained" and is_random_init(w):
            continue
        torch.manual_seed(seed)
        net = create_backbone(cfg.features.backbone, w, dynamic_img_size=True, num_classes=0)
        x = probe_cls_descriptors(net, probe, cfg.features.crop_size,
                                  pool=CROP_DESCRIPTORS.get(cfg.features.descriptor, "cls"))
        out[key] = 100 * probe_knn_scores(probe, x, k)["knn_acc"]
        if standardised:
            out[key.replace("knn_", "knn_std_")] = 100 * probe_knn_scores(probe, x, k, standardise=True)["knn_acc"]
    return out


def oracle(run: str, seed: int, cli: list[str], eval_images: int, env: dict[str, str], name: str = "oracle",
           target: str = "gt", extras: str = "") -> dict[str, float]:
    """The teacher recipe trained on `target` (teacher_recipe.py --target, --oracle-extras) on the run's images,
    kept as <run>/<name>.json: by default on the dense ground truth."""
    out_json = os.path.join(run, f"{name}.json")
    if not os.path.exists(out_json):
        args = [sys.executable, os.path.join(JOBS, "benchmarks", "teacher_recipe.py"), "--run", run, "--target", target,
                "--out", out_json, "--seed", str(seed), "--eval-images", str(eval_images), *cli]
        subprocess.run(args + (["--oracle-extras", extras] if extras else []), check=True, env=env)
    with open(out_json) as f:
        o = json.load(f)
    return {c: o[f"{c}_miou"] for c in CONDITIONS}


def variant_run(root: str, base: str, name: str, overrides: list[str], seed: int, cli: list[str],
                env: dict[str, str], unseen: bool = False) -> dict[str, float]:
    """The student rerun with `overrides` (student.key=value), from a copy of run `base` without its student /
    evaluate outputs: the same teacher, data and seed, so that the difference is paired. Only the student is scored
    (`eval.models`): the teacher's figures are the base run's. With `unseen` (a recipe candidate, whose goals must
    hold on worlds the run never saw) also on the unseen world, as `unseen_<condition>`."""
    dst = os.path.join(root, f"{base}_{name}")
    if not os.path.exists(dst):
        shutil.copytree(os.path.join(root, base), dst, symlinks=True,  # stage links into the shared store
                        ignore=shutil.ignore_patterns("student", "evaluate"))
    sets = [*overrides, "eval.models=[student]"]
    run_pipeline(root, f"{base}_{name}", seed, cli + [a for o in sets for a in ("--set", o)], env)
    scored = eval_miou(dst, "student")
    if unseen:
        scored.update({k.removeprefix("student_"): v
                       for k, v in unseen_world_miou(dst, ["student"], UNSEEN + seed).items()})
    return scored


def ablation_variants(parts: list[str], student) -> dict[str, list[str]]:
    """{variant name: overrides} toggling each student part from its configured value: `no_<part>` when it is on,
    `with_<part>` when it is off (degrade, class_balance, lowlight: on = any value > 0)."""
    out = {}
    for part in parts:
        off, on = ABLATIONS[part]
        on = on if on is not None else str(type(student).model_fields[part].default)
        is_on = bool(getattr(student, part))
        out[f"no_{part}" if is_on else f"with_{part}"] = [f"student.{part}={off if is_on else on}"]
    return out


def thread_sets(sections: list[str], jobs: int) -> list[str]:
    """--set overrides giving each of `jobs` processes side by side its share of this machine's cores as the
    `torch_threads` of `sections` (none for one job: the configured threads)."""
    return [a for k in sections for a in ("--set", f"{k}.torch_threads={job_threads(jobs)}")] if jobs > 1 else []


def job_threads(jobs: int) -> int:
    """Torch threads of each of `jobs` processes side by side."""
    return max(1, (os.cpu_count() or 1) // jobs)


def timed(job) -> tuple:
    """(job(), its wall time in s)."""
    t0 = time.time()
    return job(), time.time() - t0


def stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "std": std, "se": std / np.sqrt(len(v)) if len(v) > 1 else float("nan"),
            "n": len(v)}


def write_ladder(out: str, rows: list[dict], variants: dict, recipes: dict, config: str | None, overrides: list[str],
                 pretrained: str) -> None:
    """The seeds' rows, their mean ± std per metric and the paired differences, as JSON to `out` and a table."""
    metrics = [k for k in rows[0] if k not in ("seed", "cli", "knn_probe_of") and not k.endswith("_s")]
    summary = {k: stats([r[k] for r in rows if k in r]) for k in metrics}
    paired = {}
    for c in [c for c in CONDITIONS if f"student_{c}" in rows[0]]:
        paired[f"student_minus_teacher_{c}"] = stats([r[f"student_{c}"] - r[f"teacher_{c}"] for r in rows])
        paired[f"student_over_oracle_{c}"] = stats([r[f"student_{c}"] / max(r[f"oracle_{c}"], 1e-9) for r in rows])
        for name in [n for n in variants if f"{n}_{c}" in rows[0]]:
            paired[f"student_minus_{name}_{c}"] = stats([r[f"student_{c}"] - r[f"{name}_{c}"] for r in rows])
    for name, key in [(n, k) for n in recipes for c in CONDITIONS for k in (c, f"unseen_{c}") if f"{n}_{k}" in rows[0]]:
        paired[f"{name}_minus_teacher_{key}"] = stats([r[f"{name}_{key}"] - r[f"teacher_{key}"] for r in rows])
    for knn in [k for k in ("knn", "drive_knn", "drive_knn_std") if f"{k}_pretrained" in rows[0]]:
        paired[f"{knn}_pretrained_minus_random"] = stats([r[f"{knn}_pretrained"] - r[f"{knn}_random"] for r in rows])
    with open(out, "w") as f:
        json.dump({"seeds": rows, "summary": summary, "paired": paired, "config": config, "overrides": overrides,
                   "pretrained": pretrained}, f, indent=1)
    print("| metric | mean ± std (n) |\n|---|---|")
    for k, s in {**summary, **paired}.items():
        print(f"| {k} | {s['mean']:.2f} ± {s['std']:.2f} ({s['n']}) |")


def merged_rows(p: argparse.ArgumentParser, files: list[str], config: str | None, overrides: list[str],
                pretrained: str) -> list[dict]:
    """The rows of finished ladders (their --out files), in file order; each file must have run this call's
    --config / --set / checkpoint, and each seed must come from one file only (else a one-line error)."""
    rows = []
    for path in files:
        with open(path) as f:
            ladder = json.load(f)
        if (ladder["config"], ladder["overrides"], ladder["pretrained"]) != (config, overrides, pretrained):
            p.error(f"--merge {path}: ran with --config {ladder['config']} --set {ladder['overrides']} and checkpoint "
                    f"{ladder['pretrained']!r}, not --config {config} --set {overrides} and {pretrained!r}")
        again = sorted({r["seed"] for r in ladder["seeds"]} & {r["seed"] for r in rows})
        if again:
            p.error(f"--merge {path}: seed {again[0]} is already in an earlier file")
        rows += ladder["seeds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", default="/tmp/quality")
    p.add_argument("--pretrained", default="", help="checkpoint for knn_pretrained (default: features.weights)")
    p.add_argument("--config", default=None, help="config file of every run (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    p.add_argument("--ablate", default=",".join(PAPER_ABLATIONS),
                   help=f"student parts toggled one at a time, of {', '.join(ABLATIONS)} ('' = none)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=student.key=value[;student.key=value]: a paired student recipe candidate")
    p.add_argument("--label-oracles", default="", help=f"comma list of {', '.join(LABEL_ORACLES)}")
    p.add_argument("--jobs", type=int, default=2, help="a seed's oracles and student reruns side by side")
    p.add_argument("--merge", action="append", default=[],
                   help="a finished ladder's --out file: merge their seeds into --out without running anything")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs: expected at least 1, got {args.jobs}")
    ablate = [a for a in args.ablate.split(",") if a]
    unknown = sorted(set(ablate) - set(ABLATIONS))
    if unknown:
        p.error(f"--ablate: unknown student part(s) {', '.join(unknown)} (known: {', '.join(ABLATIONS)})")
    recipes = {}
    for v in args.variant:
        name, _, sets = v.partition("=")
        if not name.isidentifier() or not sets or any(not o.startswith("student.") or "=" not in o
                                                      for o in sets.split(";")):
            p.error(f"--variant: expected NAME=student.key=value[;student.key=value], got {v!r}")
        recipes[name] = sets.split(";")
    label_oracles = [o for o in args.label_oracles.split(",") if o]
    unknown = sorted(set(label_oracles) - set(LABEL_ORACLES))
    if unknown:
        p.error(f"--label-oracles: unknown {', '.join(unknown)} (known: {', '.join(LABEL_ORACLES)})")

    from raydseg.config import load_config
    from raydseg.features.backbone import weights_input_stats

    cfg = load_config(args.config, overrides=args.set)
    variants = {**ablation_variants(ablate, cfg.student), **recipes}
    passed = (["--config", args.config] if args.config else []) + [a for s in args.set for a in ("--set", s)]
    pretrained = args.pretrained or cfg.features.weights
    if args.merge:
        rows = merged_rows(p, args.merge, args.config, args.set, pretrained)
        write_ladder(args.out, rows, variants, recipes, args.config, args.set, pretrained)
        return 0
    # a finished seed's probes are rescored when the checkpoint or the descriptor changed (they do not need its run)
    probe_of = {"pretrained": pretrained, "descriptor": cfg.features.descriptor, "crop_size": cfg.features.crop_size,
                "input_stats": weights_input_stats(pretrained, cfg.features.backbone)}
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for seed in seeds:  # a finished seed is reused only under the same --config / --set
        if os.path.exists(done_row(args.root, seed)):
            with open(done_row(args.root, seed)) as f:
                ran = json.load(f).get("cli")
            if ran != passed:
                p.error(f"--root {args.root}: seed {seed} finished there with {cli_words(ran)}, not "
                        f"{cli_words(passed)}; give another --root")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(os.path.join(JOBS, "..")),
                                                       os.environ.get("PYTHONPATH", "")]))
    os.makedirs(args.root, exist_ok=True)
    # side by side, the oracles (teacher recipe) and the student reruns each get their share of the cores; a rerun
    # keeps the teacher's threads, which are part of the stored teacher's config
    oracle_cli, variant_cli = (passed + thread_sets(sections, args.jobs) for sections in (["teacher"],
                                                                                          ["student", "eval"]))
    eval_images = cfg.synthetic.eval_images_per_condition
    if args.jobs > 1:
        import torch

        torch.set_num_threads(job_threads(args.jobs))  # this process's scoring runs beside the jobs
    rows = []
    for seed in seeds:
        base = f"q{seed}"
        run, done = os.path.join(args.root, base), done_row(args.root, seed)
        fresh = not os.path.exists(done)
        if fresh:
            row = {"seed": seed, "cli": passed, "wall_s": run_pipeline(args.root, base, seed, passed, env)}
        else:
            with open(done) as f:
                row = json.load(f)
        jobs = {"oracle": functools.partial(oracle, run, seed, oracle_cli, eval_images, env)}  # each its own process
        for name, overrides in variants.items():
            jobs[name] = functools.partial(variant_run, args.root, base, name, overrides, seed, variant_cli, env,
                                           unseen=name in recipes)
        for name in label_oracles:
            jobs[name] = functools.partial(oracle, run, seed, oracle_cli, eval_images, env, name,
                                           *LABEL_ORACLES[name])
        jobs = {name: job for name, job in jobs.items() if f"{name}_day" not in row}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            started = {name: pool.submit(timed, job) for name, job in jobs.items()}
            if row.get("knn_probe_of") != probe_of:  # the probes score this checkpoint and descriptor
                row.update(descriptor_knn(run, pretrained, cfg.eval.knn_k, seed), knn_probe_of=probe_of)
                row.update(drive_knn(args.root, cfg, pretrained, cfg.eval.knn_k, seed))
            if fresh:  # this process scores the run meanwhile
                row.update(pseudo_label_miou(run))
                for model in ("teacher", "student"):
                    row.update({f"{model}_{c}": v for c, v in eval_miou(run, model).items()})
                    row.update({f"{model}_{k}": v for k, v in bootstrap_se(run, model).items()})
                row.update(unseen_world_miou(run, ["teacher", "student"], UNSEEN + seed))
            for name, future in started.items():
                scored, wall = future.result()
                row.update({f"{name}_{c}": v for c, v in scored.items()})
                row[f"{name}_s"] = wall
        rows.append(row)
        with open(done, "w") as f:
            json.dump(row, f)
        print(json.dumps(row), flush=True)
    write_ladder(args.out, rows, variants, recipes, args.config, args.set, pretrained)
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
