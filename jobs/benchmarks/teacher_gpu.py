"""The teacher and its oracle at GPU budget without Ray: what the recipe reaches when steps are not the limit.

Three commands:
- `python jobs/benchmarks/teacher_gpu.py pack --run RUN --out DIR [--eval-images 32] [--seed S]` (here; needs the
  pipeline's readers): DIR/data.pt holds the run's training images with their pseudo-labels and ground truth, and
  the synthetic eval splits (day, night, fog), as PNG bytes.
- `python jobs/benchmarks/teacher_gpu.py train --data DIR --out OUT [--variant NAME=key=value,...] [--set
  key=value ...]` (the device machine: torch, timm, torchvision, PyYAML and Pillow only). Each variant is
  configs/default.yaml's `teacher` section, then every `--set`, then its own keys, plus `target` (`label`: the
  pseudo-labels, validation frames held out as in the teacher stage; `gt`: the dense ground truth, the oracle;
  `segment_gt`: the clustering oracle, see teacher_recipe.py). It
  trains with the teacher stage's step function (`SegmentationStep`, `train_one_step`, bf16 autocast on CUDA) on
  views that DataLoader workers augment with `augment_example`, each view seeded by (seed, stream position), and
  writes OUT/teacher_gpu.json after every variant: its losses and its (n_cls, 19) confusion matrices per condition.
- `python jobs/benchmarks/teacher_gpu.py score --out OUT` (here, scipy): the Hungarian mapping fitted on day and the
  mIoU per condition, as `teacher_recipe.py` and the evaluate stage score (`train` does it too where scipy exists).
`--tiny --device cpu` runs `train` at toy sizes in seconds (the test suite does this).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dino_gpu import pairs  # noqa: E402
from gpu_check import NOT_ON_DEVICE  # noqa: E402
from teacher_recipe import recipe_scores  # noqa: E402

CONDITIONS = ("day", "night", "fog")
N_GT = 19  # Cityscapes train ids of the synthetic world's ground truth
TINY = {"steps": 3, "batch_size": 2, "crop_size": 32, "warmup_steps": 1}


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def pack(args: argparse.Namespace) -> int:
    """DIR/data.pt: {train: [{frame_id, image, label, gt, segment_gt}], eval: {condition: [(image, gt)]}, run, seed,
    n_label}, images as PNG bytes (`segment_gt`: teacher_recipe.segment_truth, the clustering oracle's labels)."""
    from teacher_recipe import load_rows

    from raydseg.config import load_config, painted_classes
    from raydseg.data.sources.synthetic import render_eval_images

    cfg = load_config(os.path.join(args.run, "config.yaml"))
    syn = cfg.synthetic.model_copy(update=dict(eval_images_per_condition=args.eval_images))
    data = {"run": os.path.abspath(args.run), "seed": args.seed,
            "n_label": cfg.teacher.n_cls or painted_classes(cfg),
            "train": [{"frame_id": r["frame_id"], **{k: png(r[k]) for k in ("image", "label", "gt", "segment_gt")}}
                      for r in load_rows(args.run, {})],
            "eval": {c: [(png(rgb), png(sem)) for *_, rgb, sem in render_eval_images(c, syn, args.seed)]
                     for c in CONDITIONS}}
    os.makedirs(args.out, exist_ok=True)
    torch.save(data, os.path.join(args.out, "data.pt"))
    print(json.dumps({"train": len(data["train"]), "eval": {c: len(v) for c, v in data["eval"].items()},
                      "bytes": os.path.getsize(os.path.join(args.out, "data.pt"))}))
    return 0


class Views(torch.utils.data.Dataset):
    """Training views of `rows`: view `pos` samples a row and augments it with generator (seed, pos), so the
    stream does not depend on the number of loader workers. Item: {image, label[, degraded]} uint8 tensors."""

    def __init__(self, rows: list[dict], target: str, recipe: dict, seed: int):
        self.rows, self.target, self.r, self.seed = rows, target, recipe, seed

    def __len__(self) -> int:
        return self.r["steps"] * self.r["batch_size"]

    def __getitem__(self, pos: int) -> dict[str, torch.Tensor]:
        from raydseg.train.data import augment_example, degraded_view

        r = self.r
        rng = np.random.default_rng((self.seed, pos))
        row = self.rows[int(rng.integers(len(self.rows)))]
        im, lb, _ = augment_example(row["image"], row[self.target], None, rng, r["crop_size"],
                                    (r["scale_min"], r["scale_max"]), r["flip"], r["jitter"])
        out = {"image": torch.from_numpy(im), "label": torch.from_numpy(lb)}
        if r["degrade"] > 0:
            out["degraded"] = torch.from_numpy(degraded_view(im, rng, r["degrade"], r["lowlight"]))
        return out


def train_variant(data: dict, recipe: dict, device: torch.device, workers: int, seed: int) -> dict:
    """Train one recipe and return its losses, speed and per-condition confusion matrices (lists)."""
    from raydseg.eval.metrics import confusion_matrix
    from raydseg.features.backbone import weights_input_stats
    from raydseg.models.infer import predict_image
    from raydseg.models.segmenter import build_segmenter, resolve_model_cfg
    from raydseg.train.data import is_val
    from raydseg.train.engine import lr_scheduler, make_optimizer, train_one_step
    from raydseg.train.steps import SegmentationStep

    target = recipe["target"]
    n_cls = data["n_label"] if target == "label" else N_GT
    rows = [{"frame_id": r["frame_id"], "image": unpng(r["image"]), target: unpng(r[target])} for r in data["train"]
            if target == "gt" or not is_val(r["frame_id"], recipe["val_fraction"])]
    torch.manual_seed(seed)
    model_cfg = resolve_model_cfg({"n_cls": n_cls, **{k: recipe[k] for k in ("backbone", "decoder", "n_layers",
                                                                              "dropout", "drop_path", "input_norm")},
                                   **weights_input_stats(recipe["weights"], recipe["backbone"])})
    model = build_segmenter(model_cfg, recipe["weights"]).to(device)
    opt = make_optimizer(model, recipe)
    sched = lr_scheduler(opt, recipe["steps"], recipe["schedule"], recipe["warmup_steps"])
    loader = torch.utils.data.DataLoader(Views(rows, target, recipe, seed), batch_size=recipe["batch_size"],
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=8 if workers else None)
    batches = ({k: v.to(device, non_blocking=True) for k, v in b.items()} for b in loader)
    step_fn = SegmentationStep(model_cfg["mean"], model_cfg["std"], recipe["class_balance"])
    model.train()
    losses, t0 = [], time.time()
    for step in range(recipe["steps"]):
        losses.append(train_one_step(model, opt, batches, step_fn, step, amp=device.type == "cuda",
                                     device_type=device.type)["loss"])
        sched.step()
    train_s = time.time() - t0
    model.eval()
    amp = torch.bfloat16 if device.type == "cuda" else None
    confs = {c: sum(confusion_matrix(predict_image(model, unpng(im), autocast_dtype=amp), unpng(gt), n_cls, N_GT)
                    for im, gt in data["eval"][c]).tolist() for c in CONDITIONS}
    every = max(1, recipe["steps"] // 20)
    return {"recipe": recipe, "n_train_images": len(rows), "train_s": train_s,
            "images_per_s": recipe["steps"] * recipe["batch_size"] / train_s,
            "loss_first5": float(np.mean(losses[:5])), "loss_last5": float(np.mean(losses[-5:])),
            "loss_every": {str(s): losses[s] for s in range(0, len(losses), every)}, "confusion": confs}


def add_scores(entry: dict) -> None:
    """`<condition>_miou` / `_pixel_acc` of a trained variant, from its confusions (needs scipy)."""
    entry.update(recipe_scores({c: np.asarray(m, np.int64) for c, m in entry["confusion"].items()}))


def train(args: argparse.Namespace) -> int:
    import yaml

    with open(os.path.join(REPO, "raydseg", "configs", "default.yaml")) as f:
        default = yaml.safe_load(f)
    base = {**default["teacher"], "target": "label"}
    if not base["weights"] and default["features"]["backbone"] == base["backbone"]:  # raydseg.train.teacher's rule
        base["weights"] = default["features"]["weights"]
    base.update(TINY if args.tiny else {})
    base.update(pairs(args.set))
    variants = dict(v.partition("=")[::2] for v in args.variant) or {"default": ""}
    data = torch.load(os.path.join(args.data, "data.pt"), weights_only=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    summary: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "data_run": data["run"], "seed": args.seed, "variants": {}}
    os.makedirs(args.out, exist_ok=True)
    for name, keys in variants.items():
        recipe = {**base, **pairs([kv for kv in keys.split(",") if kv])}
        if recipe["weights"] and os.path.isfile(os.path.join(args.data, recipe["weights"])):  # a file carried in DIR
            recipe["weights"] = os.path.join(args.data, recipe["weights"])
        entry = train_variant(data, recipe, device, args.workers, args.seed)
        try:
            add_scores(entry)
        except ImportError:  # no scipy on the device machine: `score` maps them here
            pass
        summary["variants"][name] = entry
        summary["imported_not_on_device"] = ",".join(m for m in NOT_ON_DEVICE if m in sys.modules)
        with open(os.path.join(args.out, "teacher_gpu.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(name, {k: round(v, 2) for k, v in entry.items() if isinstance(v, float)}, flush=True)
    if summary["imported_not_on_device"]:
        raise RuntimeError(f"teacher_gpu imported {summary['imported_not_on_device']}: the device machine has none")
    return 0


def score(args: argparse.Namespace) -> int:
    path = os.path.join(args.out, "teacher_gpu.json")
    with open(path) as f:
        summary = json.load(f)
    for name, entry in summary["variants"].items():
        add_scores(entry)
        print(name, {f"{c}_miou": round(entry[f"{c}_miou"], 1) for c in CONDITIONS})
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--run", required=True, help="a pipeline run directory with ingest and cluster outputs")
    a.add_argument("--out", required=True)
    a.add_argument("--eval-images", type=int, default=32)
    a.add_argument("--seed", type=int, default=0, help="the eval splits' seed (the run's seed)")
    b = sub.add_parser("train")
    b.add_argument("--data", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--variant", action="append", default=[], help="NAME=key=value,key=value")
    b.add_argument("--set", action="append", default=[], help="key=value for every variant")
    b.add_argument("--device", default="cuda")
    b.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tiny", action="store_true")
    c = sub.add_parser("score")
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return {"pack": pack, "train": train, "score": score}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
