"""jobs/benchmarks/dino_gpu.py, the DINO run for a lent GPU machine (torch + timm only): every path here on CPU at
toy sizes: DINO variants and a masked autoencoder under bf16 autocast side by side, their histories with the k-NN probe, the fp16 timm-layout backbones that the
project's loader reads, and nothing imported that the device machine lacks."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_pretrain import _blob_probe

REPO = Path(__file__).resolve().parent.parent


def test_dino_gpu_runs_two_variants_and_writes_loadable_fp16_backbones(tmp_path):
    from safetensors.torch import load_file

    from raydseg.features.backbone import create_backbone, input_stats
    from raydseg.train.pretrain import initial_backbone, probe_knn_accuracy

    images, probe = _blob_probe()
    data = tmp_path / "data"
    data.mkdir()
    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    (data / "images.bin").write_bytes(b"".join(blobs))
    np.save(data / "offsets.npy", np.cumsum([0] + [len(b) for b in blobs]))
    torch.save(probe, data / "probe.pt")
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([sys.executable, "jobs/benchmarks/dino_gpu.py", "--tiny", "--device", "cpu", "--data", str(data),
                        "--out", str(out), "--work", str(work), "--variant", "a=steps=3,knn_every=3",
                        "--variant", "b=steps=2,photometric_device=true,centering=sinkhorn",
                        "--variant", "mae=objective=mae,local_crops=0,photometric=false,amp=all,steps=2"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "dino_gpu.json").read_text())
    assert r["imported_not_on_device"] == "" and r["images"] == len(images) and r["crops_images_per_s_per_core"] > 0
    a, b = r["variants"]["a"], r["variants"]["b"]
    assert a["returncode"] == b["returncode"] == 0
    assert a["config"]["steps"] == 3 and a["config"]["knn_every"] == 3 and a["config"]["photometric_device"] is False
    assert b["config"]["photometric_device"] is True and b["config"]["centering"] == "sinkhorn"
    assert [h["step"] for h in a["history"] if "knn_acc" in h] == [0, 3]  # the random init, then the end
    assert np.isfinite(b["history"][-1]["loss"]) and b["history"][-1]["loss"] > 0
    mae = r["variants"]["mae"]  # the masked autoencoder under bf16 autocast, as `amp: gpu` runs it on the device
    assert mae["returncode"] == 0 and mae["config"]["amp"] == "all" and mae["history"][-1]["step"] == 2
    assert mae["history"][-1]["mask_ratio"] == 0.75 and np.isfinite(mae["history"][-1]["loss"])
    torch.manual_seed(0)  # step 0's k-NN is that of the random-init backbone the variant starts from
    init = initial_backbone(a["config"])
    assert a["history"][0]["knn_acc"] == probe_knn_accuracy(init, probe, a["config"]["knn_k"],
                                                            a["config"]["knn_crop_size"])["knn_acc"]
    half = load_file(out / "a.safetensors")
    full = load_file(work / "a" / "backbone.safetensors")
    assert all(v.dtype == torch.float16 and torch.equal(v, full[k].half()) for k, v in half.items())
    backbone = create_backbone("vit_tiny_patch16_224", str(out / "a.safetensors"))
    assert input_stats(backbone) == input_stats(init) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # ImageNet's
    assert torch.equal(backbone.state_dict()["cls_token"], full["cls_token"].half().float())
