"""Supervised fine-tuning from several initialisations, as in the paper's fine-tuning experiment:
`raydseg finetune --run RUN_FOLDER [--n 8,32] [--inits student,teacher,features,random] [--steps S] [--seeds 0]
[--train-set DIR]` (also `python jobs/finetune.py ...`).

A Segmenter with the 19 Cityscapes classes is trained on N labelled images (a Cityscapes-layout `train` split: the
`--train-set`, or for a synthetic run a labelled split rendered from scenes disjoint from training and eval) for
each N and initialisation; `student` / `teacher` take the run's model's encoder, `features` the run's
`features.weights`, `random` none. Each model is scored on the run's eval sets (no class matching: its classes are
Cityscapes'). Out: `<output_root>/_finetune/<run>/` (models, results.json, table.md, miou_vs_n.png) and one MLflow
run with the same. A rerun keeps finished models.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from raydseg import storage
from raydseg.config import Config, load_config
from raydseg.errors import InputError, UserError

INITS = ("student", "teacher", "features", "random")
N_CLASSES = 19  # Cityscapes train ids
FINETUNE_DIR = "_finetune"  # under the output root, next to outputs.STORE


def labelled_samples(cfg: Config, train_set: str, out_dir: str, n: int) -> list:
    """At least `n` (image, label) samples of the labelled train split, sorted (the first n are the subset of size
    n, so that a smaller set is inside every larger one)."""
    from raydseg.eval.sets import EvalSet, list_samples

    root = train_set
    if not root:
        if cfg.data.source != "synthetic":
            raise UserError("--train-set: needed for a run on real data (a Cityscapes-layout folder with "
                            "leftImg8bit/train and gtFine/train)")
        from raydseg.data.sources.synthetic import write_eval_split

        root = storage.join(out_dir, "labelled")
        marker = storage.join(root, f"_done_{n}.json")
        if not storage.exists(marker):
            write_eval_split(root, "day", cfg.synthetic, cfg.run.seed, labelled_train=n)
            storage.write_json(marker, {"images": n})
    samples = list_samples(EvalSet("labelled", "cityscapes", root), split="train")
    if len(samples) < n:
        raise InputError(f"--train-set: {root} has {len(samples)} labelled train images, fewer than --n {n}")
    return samples


def write_part(samples: list, path: str) -> None:
    """The samples as one pseudo-label part (`frame_id`, `camera`, `image`, `label` = train ids), the training
    feed's input format."""
    import pyarrow as pa

    from raydseg.data.schema import encode_png
    from raydseg.eval.sets import load_label

    rows = [{"frame_id": s.sample_id, "camera": "camera", "image": storage.read_bytes(s.image_path),
             "label": encode_png(load_label(s, N_CLASSES).astype(np.uint8))} for s in samples]
    storage.write_table(pa.Table.from_pylist(rows), path)


def init_weights(cfg: Config, run: str, init: str) -> dict[str, str]:
    """The loop-config keys that initialise the encoder for `init` (a missing model is an error naming its path)."""
    from raydseg.outputs import resolve
    from raydseg.train.teacher import encoder_weights

    if init in ("student", "teacher"):
        model = resolve(storage.join(run, init, "model"))
        if not storage.exists(model):
            raise InputError(f"--inits {init}: no model at {model}")
        return {"encoder_weights": "", "init_encoder_from": model}
    return {"encoder_weights": encoder_weights(cfg) if init == "features" else ""}


def finetune_one(cfg: Config, pl_dir: str, out_dir: str, init: dict[str, str], steps: int, seed: int,
                 name: str) -> str:
    """Train a 19-class Segmenter on the part in `pl_dir` with Ray Train (the teacher's loop and recipe, no held-out
    frames); returns its model folder (kept when it exists: a rerun resumes)."""
    from raydseg.models.io import WEIGHTS
    from raydseg.train.data import train_feed
    from raydseg.train.teacher import loop_config, model_cfg_from, run_trainer

    model_dir = storage.join(out_dir, "model")
    if storage.exists(storage.join(model_dir, WEIGHTS)):
        print(f"[finetune] {name}: kept (trained in an earlier run)", flush=True)
        return model_dir
    print(f"[finetune] {name}: {steps} steps on the labelled images of {pl_dir}", flush=True)
    t = cfg.teacher.model_copy(update={"steps": steps, "val_fraction": 0.0, "val_every": -1, "n_overlays": 0})
    config = loop_config(t, stage="finetune", model_cfg={**model_cfg_from(cfg), "n_cls": N_CLASSES}, pl_dir=pl_dir,
                         out_dir=out_dir, seed=seed,
                         extra={**init, "class_balance": t.class_balance, "feed": train_feed(pl_dir, t)})
    run_trainer(t, config, out_dir, f"{cfg.run.name}-finetune-{name}")
    return model_dir


def score(cfg: Config, model_dir: str, sets: list) -> dict[str, dict[str, Any]]:
    """{set: {miou, pixel_acc, confusion}} of a 19-class model on the eval sets (eval.size / window / stride)."""
    from raydseg.eval.metrics import confusion_matrix, scores
    from raydseg.eval.sets import list_samples, load_image, load_label
    from raydseg.models.infer import predict_image
    from raydseg.models.io import load_model

    model = load_model(model_dir)
    out = {}
    for s in sets:
        conf = np.zeros((N_CLASSES, N_CLASSES), np.int64)
        for x in list_samples(s)[:cfg.eval.max_images or None]:
            pred = predict_image(model, load_image(x), size=cfg.eval.size or None, window=cfg.eval.window or None,
                                 stride=cfg.eval.stride or None)
            conf += confusion_matrix(pred, load_label(x, N_CLASSES), N_CLASSES, N_CLASSES)
        sc = scores(conf)
        out[s.name] = {"miou": float(sc["miou"]), "pixel_acc": float(sc["pixel_acc"]), "confusion": conf.tolist()}
    return out


def table(results: list[dict[str, Any]], set_names: list[str]) -> str:
    """Markdown: one row per (init, N), mIoU per eval set in % (mean ± std over seeds)."""
    from raydseg.eval.compare import mean_spread

    lines = ["| init | N | seeds | " + " | ".join(set_names) + " |", "|---|---|---|" + "---|" * len(set_names)]
    keys = list(dict.fromkeys((r["init"], r["n"]) for r in results))
    for init, n in keys:
        group = [r for r in results if (r["init"], r["n"]) == (init, n)]
        cells = []
        for s in set_names:
            v = 100 * np.array([r["sets"][s]["miou"] for r in group])
            cells.append(mean_spread(v))
        lines.append(f"| {init} | {n} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], set_names: list[str]) -> bytes:
    """mIoU against N (log scale) per initialisation, one panel per eval set, as PNG bytes."""
    from matplotlib.figure import Figure

    from raydseg.eval.plots import fig_png

    fig = Figure(figsize=(4 * len(set_names), 3.2))
    for i, s in enumerate(set_names):
        ax = fig.add_subplot(1, len(set_names), i + 1)
        for init in dict.fromkeys(r["init"] for r in results):
            ns = sorted({r["n"] for r in results if r["init"] == init})
            v = [[100 * r["sets"][s]["miou"] for r in results if (r["init"], r["n"]) == (init, n)] for n in ns]
            ax.errorbar(ns, [np.mean(x) for x in v], yerr=[np.std(x, ddof=1) if len(x) > 1 else 0 for x in v],
                        marker="o", capsize=3, label=init)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled images N")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(s, fontsize=9)
        ax.legend(fontsize=7)
    return fig_png(fig)


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not vals or min(vals) < 0 or (flag == "--n" and min(vals) < 1):
        raise UserError(f"{flag}: expected comma-separated {'positive' if flag == '--n' else 'non-negative'} "
                        f"integers, got '{text}'")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydseg finetune", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder, e.g. outputs/default (local or s3://)")
    p.add_argument("--n", default="8,32", help="labelled image counts (comma-separated)")
    p.add_argument("--inits", default=",".join(INITS), help=f"initialisations among {', '.join(INITS)}")
    p.add_argument("--steps", type=int, default=0, help="optimiser steps per model (0 = the run's teacher.steps)")
    p.add_argument("--seeds", default="0", help="seeds (comma-separated): mean and spread in the table")
    p.add_argument("--train-set", default="", help="Cityscapes-layout folder with leftImg8bit/train, gtFine/train")
    args = p.parse_args(argv)
    import mlflow

    from raydseg import tracking
    from raydseg.eval.sets import eval_sets
    from raydseg.outputs import resolve
    from raydseg.pipeline import init_ray, output_root

    ns, seeds = sorted(_ints(args.n, "--n")), _ints(args.seeds, "--seeds")
    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    if not inits or set(inits) - set(INITS):
        raise UserError(f"--inits: expected some of {', '.join(INITS)}, got '{args.inits}'")
    run = args.run.rstrip("/") if storage.is_s3(args.run) else os.path.abspath(args.run)  # workers run elsewhere
    if not storage.exists(storage.join(run, "config.yaml")):
        raise InputError(f"--run: no run folder at {run} (its config.yaml is missing)")
    cfg = load_config(storage.local_copy(storage.join(run, "config.yaml")))
    init_keys = {i: init_weights(cfg, run, i) for i in inits}  # every missing model now, before any work
    steps = args.steps or cfg.teacher.steps
    out = storage.join(output_root(cfg), FINETUNE_DIR, cfg.run.name)
    samples = labelled_samples(cfg, args.train_set, out, ns[-1])
    sets = eval_sets(cfg, resolve(storage.join(run, "ingest")))
    init_ray(cfg)
    tracking.setup(cfg)
    results = []
    with mlflow.start_run(run_name=f"finetune-{cfg.run.name}") as mrun:
        tracking.log_params({"finetune.run": run, "finetune.n": args.n, "finetune.inits": ",".join(inits),
                             "finetune.steps": steps, "finetune.seeds": args.seeds})
        for n in ns:
            pl_dir = storage.join(out, "data", f"n{n}")
            if not storage.exists(storage.join(pl_dir, "part-00000.parquet")):
                write_part(samples[:n], storage.join(pl_dir, "part-00000.parquet"))
            for init in inits:
                for seed in seeds:
                    name = f"{init}-n{n}-seed{seed}"
                    model = finetune_one(cfg, pl_dir, storage.join(out, name), init_keys[init], steps, seed,
                                         name)
                    r = {"init": init, "n": n, "seed": seed, "model": model, "sets": score(cfg, model, sets)}
                    results.append(r)
                    tracking.log_metrics({f"{s}/miou": v["miou"] for s, v in r["sets"].items()},
                                         prefix=f"finetune/{init}/n{n}/seed{seed}/")
        names = [s.name for s in sets]
        md = table(results, names)
        files = {"results.json": json.dumps({"steps": steps, "results": results}).encode(), "table.md": md.encode(),
                 "miou_vs_n.png": plot(results, names)}
        tracking.save_and_log(files, out, "finetune", mrun.info.run_id)
    print(md)
    print(f"fine-tuned models and results: {out}\nMLflow run: {mrun.info.run_id}")
    return 0
