"""jobs/benchmarks/teacher_gpu.py, the teacher and oracle runs for a lent GPU machine (torch + timm only): on CPU at
toy sizes, on blob images whose dense truth is known: the oracle learns them, the pseudo-label variant holds out the
validation frames and starts from the given encoder weights, the view stream does not depend on the loader's
workers, scores equal the evaluate stage's, and nothing is imported that the device machine lacks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "jobs" / "benchmarks"))

N_CLS = 4


def _blob_data(path: Path) -> dict:
    """data.pt as `teacher_gpu.py pack` writes it, with blob images: 12 training frames, 3 eval images a condition."""
    from teacher_gpu import png
    from teacher_recipe import segment_truth

    from raydseg.train.synthetic import blob_example

    rng = np.random.default_rng(0)
    train = []
    for i in range(12):
        im, lb, seg, gt = blob_example(rng, 64, 96, n_cls=N_CLS)
        train.append({"frame_id": f"f{i:03d}", "image": png(im), "label": png(lb), "gt": png(gt),
                      "segment_gt": png(segment_truth(lb, seg, gt))})
    ev = {c: [(png(im), png(gt)) for im, _, _, gt in (blob_example(np.random.default_rng(99 + 10 * j + i), 64, 96,
                                                                   n_cls=N_CLS) for i in range(3))]
          for j, c in enumerate(("day", "night", "fog"))}
    data = {"run": "blobs", "seed": 0, "n_label": N_CLS, "train": train, "eval": ev}
    path.mkdir(parents=True, exist_ok=True)
    torch.save(data, path / "data.pt")
    return data


def test_teacher_gpu_trains_an_oracle_and_a_pseudo_label_teacher_from_given_weights(tmp_path):
    from safetensors.torch import save_file
    from teacher_gpu import unpng
    from teacher_recipe import recipe_scores

    from raydseg.features.backbone import create_backbone
    from raydseg.train.data import is_val

    data = _blob_data(tmp_path / "data")
    torch.manual_seed(7)
    save_file(create_backbone("vit_tiny_patch16_224").state_dict(), str(tmp_path / "data" / "enc.safetensors"))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "jobs/benchmarks/teacher_gpu.py", "train", "--tiny", "--device", "cpu",
                        "--workers", "2", "--data", str(tmp_path / "data"), "--out", str(out), "--set", "steps=30",
                        "--set", "batch_size=8", "--set", "crop_size=48", "--set", "val_fraction=0.25",
                        "--variant", "oracle=target=gt", "--variant", "teacher=target=label,weights=enc.safetensors",
                        "--variant", "clustering_oracle=target=segment_gt,steps=2"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "teacher_gpu.json").read_text())
    assert r["imported_not_on_device"] == "" and r["device"] == "cpu"
    oracle, teacher, clustering = (r["variants"][k] for k in ("oracle", "teacher", "clustering_oracle"))
    assert oracle["recipe"]["steps"] == 30 and oracle["recipe"]["target"] == "gt"
    assert teacher["recipe"]["weights"] == str(tmp_path / "data" / "enc.safetensors")
    assert oracle["n_train_images"] == 12
    assert teacher["n_train_images"] == sum(not is_val(r["frame_id"], 0.25) for r in data["train"]) < 12
    for c in ("day", "night", "fog"):  # every valid eval pixel counted once, into (n_cls, 19) matrices
        m = np.asarray(oracle["confusion"][c])
        assert m.shape == (19, 19) and m.sum() == sum(unpng(gt).size for _, gt in data["eval"][c])
        assert np.asarray(teacher["confusion"][c]).shape == (N_CLS, 19)
        assert np.asarray(clustering["confusion"][c]).shape == (19, 19)
    assert clustering["n_train_images"] == teacher["n_train_images"] and clustering["recipe"]["steps"] == 2
    # the oracle learns the blobs (the constant predictor of the background scores about 0.2 here) and its
    # loss falls; the scores are the evaluate stage's Hungarian mapping of the confusions
    assert oracle["day_miou"] >= 45 and oracle["loss_last5"] < oracle["loss_first5"]
    assert oracle["day_miou"] == recipe_scores({c: np.asarray(m) for c, m in oracle["confusion"].items()})["day_miou"]


def test_teacher_gpu_views_do_not_depend_on_the_number_of_loader_workers(tmp_path):
    from teacher_gpu import Views, unpng

    data = _blob_data(tmp_path / "data")
    rows = [{"frame_id": r["frame_id"], "image": unpng(r["image"]), "gt": unpng(r["gt"])} for r in data["train"]]
    recipe = {"steps": 3, "batch_size": 4, "crop_size": 32, "scale_min": 0.3, "scale_max": 1.0, "flip": True,
              "jitter": 0.2, "degrade": 0.5, "lowlight": 0.5}
    views = Views(rows, "gt", recipe, seed=3)
    batches = {w: list(torch.utils.data.DataLoader(views, batch_size=4, num_workers=w)) for w in (0, 2)}
    assert len(batches[0]) == 3 and set(batches[0][0]) == {"image", "label", "degraded"}
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(batches[0][0]["image"], batches[0][1]["image"])  # positions draw different views
    other = Views(rows, "gt", recipe, seed=4)[0]["image"]
    assert not torch.equal(views[0]["image"], other)  # and the seed changes them
