"""DINO pretraining at GPU scale without Ray: several recipe variants side by side on one device machine.

`python jobs/benchmarks/dino_gpu.py --data DIR --out OUT --budget-s 300 [--variant NAME=key=value,key=value ...]
[--set key=value ...]`: DIR from `dino_images.py ... --jpeg Q` (images.bin, offsets.npy, probe.pt). Needs torch,
timm, PyYAML and safetensors only (what the device machine has). The `pretrain` section of configs/default.yaml,
then every `--set`, then the variant's own keys, are the recipe; `steps` is sized so that the variants, running at
once, end within the budget: images/s of decode + multi-crop measured on one core here, times the cores each
variant's loader gets. Each variant runs `raydseg.train.pretrain.pretrain_local` (the stage's task, step function,
schedules and k-NN probe) in its own process; OUT/NAME.safetensors is its teacher backbone in fp16 (timm layout,
loadable by `features.weights` / `teacher.weights`), OUT/dino_gpu.json the recipes and their histories.
`--tiny --device cpu` runs the same at toy sizes in seconds (the test suite does this).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dino_images import read_images  # noqa: E402
from gpu_check import NOT_ON_DEVICE  # noqa: E402

from raydseg.train.pretrain import CHECKPOINT, ImageCrops, pretrain_local, save_safetensors  # noqa: E402

TINY = {"backbone": "vit_tiny_patch16_224", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
        "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2, "batch_size": 4, "knn_crop_size": 32}


def parse_value(text: str) -> object:
    """`--set` value text -> bool / int / float / str, as YAML reads a scalar."""
    import yaml

    return yaml.safe_load(text)


def pairs(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = parse_value(value)
    return out


def recipe(args: argparse.Namespace) -> dict[str, object]:
    """The shared recipe: configs/default.yaml's `pretrain` section, the toy sizes with --tiny, then --set."""
    import yaml

    with open(os.path.join(REPO, "raydseg", "configs", "default.yaml")) as f:
        config = yaml.safe_load(f)["pretrain"]
    config.update(TINY if args.tiny else {})
    config.update(pairs(args.set))
    return config


def crops_per_s(images: list[bytes], config: dict[str, object], n: int) -> float:
    """Images/s of decode + multi-crop on one core (this process, one torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = ImageCrops(images, config, seed=0)
    data[0]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        data[i]
    torch.set_num_threads(threads)
    return n / (time.perf_counter() - t0)


def run_one(args: argparse.Namespace) -> int:
    """One variant (a child process): pretrain, write the history and the fp16 backbone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = json.loads(args.one)
    images = read_images(args.data)
    probe = torch.load(os.path.join(args.data, "probe.pt"), weights_only=True)
    name = config.pop("name")
    t0 = time.time()
    history = pretrain_local(config, images, args.device, probe=probe, workers=config.pop("loader_workers"),
                             log=lambda s: print(f"[{name}] {s}", flush=True))
    wall = time.time() - t0
    exported = os.path.join(config["out_dir"], CHECKPOINT)
    with safe_open(exported, "pt") as f:
        metadata = f.metadata()
    save_safetensors({k: v.half() for k, v in load_file(exported).items()},
                     os.path.join(args.out, f"{name}.safetensors"),
                     metadata={**metadata, "source": "raydseg pretrain (jobs/benchmarks/dino_gpu.py)",
                               "dtype": "float16"})
    with open(os.path.join(config["out_dir"], "history.json"), "w") as f:
        json.dump({"wall_s": wall, "history": history,
                   "imported_not_on_device": ",".join(m for m in NOT_ON_DEVICE if m in sys.modules)}, f, default=float)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/dino_gpu", help="fp32 checkpoints and per-variant histories")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall seconds for the variants' training")
    p.add_argument("--variant", action="append", default=[], help="NAME=key=value,key=value (NAME= : the recipe)")
    p.add_argument("--set", action="append", default=[], help="key=value of the pretrain section, every variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args)
    os.makedirs(args.out, exist_ok=True)
    base = recipe(args)
    variants = {}  # name -> its own keys
    for v in args.variant or ["default="]:
        name, _, rest = v.partition("=")
        variants[name] = pairs([kv for kv in rest.split(",") if kv])
    images = read_images(args.data)
    cores = os.cpu_count() or 1
    workers = max(1, (cores - len(variants)) // len(variants))
    rate = min(crops_per_s(images, {**base, **own}, 16 if args.tiny else 64) for own in variants.values())
    per_variant = 0.7 * rate * workers  # loader images/s of one variant, with margin for the GPU and the probe
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None  # the loader workers' batches pass there
    summary: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                  "shm_free_gb": shm.f_bavail * shm.f_frsize / 1e9 if shm else None, "cores": cores,
                                  "loader_workers": workers, "images": len(images), "crops_images_per_s_per_core": rate,
                                  "budget_s": args.budget_s, "variants": {}}
    procs = {}
    configs = {}
    for name, own in variants.items():
        config = {**base, **own}
        steps = int(own.get("steps", max(4, int(args.budget_s * per_variant / config["batch_size"]))))
        config.update(steps=steps, warmup_steps=max(1, steps // 10), freeze_last_layer_steps=max(1, steps // 20),
                      teacher_temp_warmup_steps=max(1, steps * 3 // 10), log_every=max(1, steps // 40),
                      knn_every=max(1, steps // 5))  # the schedules scaled to the steps: DINO's epoch fractions
        config.update({**pairs(args.set), **own})  # keys given explicitly win
        config.update(name=name, seed=0, out_dir=os.path.join(args.work, name), loader_workers=workers)
        configs[name] = config
        os.makedirs(config["out_dir"], exist_ok=True)
        summary["variants"][name] = {"config": dict(config)}
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--data", args.data, "--out",
                                        args.out, "--device", args.device, "--one", json.dumps(config)])
        print(f"started {name}: steps {steps}, batch {config['batch_size']}, {workers} loader workers", flush=True)
    for name, proc in procs.items():
        rc = proc.wait()
        entry = summary["variants"][name]
        entry["returncode"] = rc
        hist = os.path.join(configs[name]["out_dir"], "history.json")
        if rc == 0 and os.path.exists(hist):
            with open(hist) as f:
                entry.update(json.load(f))
        with open(os.path.join(args.out, "dino_gpu.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
    for name, entry in summary["variants"].items():
        h = entry.get("history") or [{}]
        print(name, "rc", entry["returncode"], "knn", [round(r["knn_acc"], 3) for r in h if "knn_acc" in r],
              "loss", round(h[-1].get("loss", float("nan")), 3), "wall", round(entry.get("wall_s", 0)))
    summary["imported_not_on_device"] = ",".join(sorted({m for m in NOT_ON_DEVICE if m in sys.modules} | {
        m for e in summary["variants"].values() for m in e.get("imported_not_on_device", "").split(",") if m}))
    with open(os.path.join(args.out, "dino_gpu.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    if summary["imported_not_on_device"]:
        raise RuntimeError(f"dino_gpu imported {summary['imported_not_on_device']}: the device machine has none")
    return max(p.returncode for p in procs.values())


if __name__ == "__main__":
    sys.exit(main())
