"""DINO pretraining: the loss against a hand computation, centering, schedules, the weight-normalised head,
multi-crop, a few CPU steps through the shared engine, the exported backbone in timm / the project's loader, the
step code without Ray, and one tiny `pretrain` stage run on Ray Train (smoke config)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raydseg.models.dino_head import DINOHead, MultiCropWrapper, build_dino_model
from raydseg.models.ema import EMA
from raydseg.train.dino import (GRAYSCALE_P, JITTER, JITTER_P, SOLARIZE_P, DINOLoss, DinoStep, MultiCrop,
                                cancel_last_layer_gradients, clip_gradients, colour_ops, cosine_schedule, crop_names,
                                device_photometric, multicrop_batch, param_groups, sinkhorn_knopp,
                                teacher_temp_schedule)
from raydseg.models.segmenter import normalize
from raydseg.train.engine import train_one_step

REPO = Path(__file__).resolve().parent.parent


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dino_loss_equals_hand_computed_cross_entropy_over_other_views():
    """B=2, K=3, 2 global + 1 local crop: mean over the pairs (t0,s1), (t0,s2), (t1,s0), (t1,s2) of the batch mean
    of -sum_k q log p, with q = softmax((t - c) / 0.04), p = softmax(s / 0.1)."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3 * 2, 3)).astype(np.float32)
    t = rng.normal(size=(2 * 2, 3)).astype(np.float32)
    center = np.array([[0.3, -0.2, 0.1]], np.float32)
    loss_fn = DINOLoss(3, n_crops=3, teacher_temps=[0.04], student_temp=0.1)
    loss_fn.center.copy_(torch.from_numpy(center))
    got = float(loss_fn(torch.from_numpy(s), torch.from_numpy(t), step=0))

    q = _softmax((t.astype(np.float64) - center) / 0.04).reshape(2, 2, 3)  # (global view, batch, K)
    logp = np.log(_softmax(s.astype(np.float64) / 0.1)).reshape(3, 2, 3)
    terms = [(-q[i] * logp[j]).sum(-1).mean() for i in range(2) for j in range(3) if j != i]
    assert len(terms) == 4
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_dino_loss_center_is_an_ema_of_the_teacher_batch_mean():
    loss_fn = DINOLoss(4, n_crops=2, teacher_temps=[0.04], center_momentum=0.9)
    t1, t2 = torch.randn(6, 4), torch.randn(6, 4)
    loss_fn(torch.randn(6, 4), t1, 0)
    assert torch.allclose(loss_fn.center, 0.1 * t1.mean(0, keepdim=True), atol=1e-6)
    loss_fn(torch.randn(6, 4), t2, 0)
    assert torch.allclose(loss_fn.center, 0.9 * 0.1 * t1.mean(0, keepdim=True) + 0.1 * t2.mean(0, keepdim=True),
                          atol=1e-6)


def test_sinkhorn_centering_spreads_a_collapsed_batch_over_the_prototypes():
    """Every image's logits favour prototype 0 (with a little image-dependent noise): the EMA centre of one batch
    leaves prototype 0 on top for all of them, while Sinkhorn-Knopp gives each image a distribution (rows sum to 1)
    and gives the prototypes nearly equal shares of the batch."""
    torch.manual_seed(0)
    t = torch.randn(64, 8) * 0.1
    t[:, 0] += 2.0
    q = sinkhorn_knopp(t, 0.1, iterations=20)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    shares = q.sum(0) / 64
    assert float(shares.max() / shares.min()) < 1.05  # uniform share 1/8 each (up to 20 iterations)
    assert int(torch.bincount(q.argmax(1), minlength=8).min()) >= 4  # each prototype is some images' top
    ema = DINOLoss(8, n_crops=2, teacher_temps=[0.1])
    ema(torch.randn(64, 8), t, 0)  # centre = 0.1 x batch mean: prototype 0 stays on top everywhere
    assert bool((((t - ema.center) / 0.1).argmax(1) == 0).all())
    sk = DINOLoss(8, n_crops=2, teacher_temps=[0.1], centering="sinkhorn")
    s = torch.randn(64, 8)  # 2 crops x 32 images, as the teacher rows
    expected = torch.stack([-(sinkhorn_knopp(t, 0.1).chunk(2)[i] * torch.log_softmax(s.chunk(2)[1 - i] / 0.1, -1))
                            .sum(-1).mean() for i in range(2)]).mean()
    torch.testing.assert_close(sk(s, t, 0), expected)


def test_teacher_entropy_is_log_k_for_identical_outputs_and_falls_with_sharpening():
    loss_fn = DINOLoss(8, n_crops=2, teacher_temps=[0.04])
    loss_fn(torch.randn(4, 8), torch.zeros(4, 8), 0)
    assert loss_fn.last_teacher_entropy == pytest.approx(math.log(8), rel=1e-6)
    t = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]]).repeat(4, 1)
    loss_fn.center.zero_()
    loss_fn(torch.randn(4, 8), t, 0)
    assert loss_fn.last_teacher_entropy < 0.01  # 1 / 0.04 = 25 nats of margin: one-hot


def test_schedules_hit_their_endpoints():
    lr = cosine_schedule(5e-4, 1e-6, 100, warmup_steps=10)
    assert len(lr) == 100 and lr[0] == 0.0 and lr[10] == pytest.approx(5e-4) and lr[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(lr[:11]) > 0) and np.all(np.diff(lr[10:]) <= 0)
    assert lr.max() == pytest.approx(5e-4)
    wd = cosine_schedule(0.04, 0.4, 50)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4) and np.all(np.diff(wd) >= 0)
    m = cosine_schedule(0.996, 1.0, 30)
    assert m[0] == pytest.approx(0.996) and m[-1] == 1.0
    temps = teacher_temp_schedule(0.04, 0.07, 20, warmup_steps=5)
    assert temps[0] == pytest.approx(0.04) and temps[4] == pytest.approx(0.07) and np.all(temps[4:] == 0.07)
    assert len(cosine_schedule(1.0, 0.0, 3, warmup_steps=5)) == 3  # warmup longer than the run: no crash


def test_head_last_layer_is_weight_normalised_with_a_fixed_unit_magnitude():
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    opt = torch.optim.AdamW(param_groups(head), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(5, 16)).logsumexp(-1).sum().backward()
        opt.step()
    w = head.last_layer.weight  # the effective weight g * v / |v|
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)  # every prototype keeps unit norm
    # bottleneck output is L2-normalised, so |logit| <= 1
    assert head(torch.randn(7, 16)).abs().max() <= 1 + 1e-5
    free = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    # 3-layer MLP: Linear-GELU-Linear-GELU-Linear
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_param_groups_clip_and_frozen_last_layer():
    head = DINOHead(4, 6, hidden_dim=5, bottleneck_dim=3)
    decay, no_decay = param_groups(head)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    head(torch.randn(2, 4)).sum().mul(100).backward()
    norm = clip_gradients(head, 0.5)
    assert norm > 0.5 and all(float(p.grad.norm()) <= 0.5 + 1e-4 for p in head.parameters() if p.grad is not None)
    cancel_last_layer_gradients(head, step=0, freeze_steps=1)
    assert head.last_layer.parametrizations.weight.original1.grad is None
    assert head.mlp[0].weight.grad is not None


def test_multicrop_shapes_dtype_and_batch_keys():
    crop = MultiCrop(global_size=32, local_size=16, n_local=3)
    image = torch.randint(0, 256, (3, 40, 80), dtype=torch.uint8)
    views = crop(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.uint8 for v in views)
    batch = multicrop_batch([np.zeros((40, 80, 3), np.uint8), np.full((50, 60, 3), 200, np.uint8)], crop)
    assert list(batch) == crop_names(3) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    assert batch["global_1"].shape == (2, 3, 32, 32) and batch["local_2"].shape == (2, 3, 16, 16)


def test_multicrop_without_photometric_keeps_colours_and_the_default_changes_them():
    """A flat-colour image: crops, flips and blur leave it exactly as it was; the paper's jitter / grayscale /
    solarisation change the colour of most draws."""
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 40, 90
    torch.manual_seed(0)
    plain = [v for _ in range(10) for v in MultiCrop(32, 16, 2, photometric=False)(image)]
    assert all(v[:, 0, 0].tolist() == [200, 40, 90] and bool((v == v[:, :1, :1]).all()) for v in plain)
    torch.manual_seed(0)
    paper = [v for _ in range(10) for v in MultiCrop(32, 16, 2)(image)]
    changed = sum(v[:, 0, 0].tolist() != [200, 40, 90] for v in paper)
    assert changed >= len(paper) // 2, changed


def test_device_colour_ops_are_torchvisions_color_jitter_with_each_images_own_factors_and_order():
    """Three images, each with its own brightness / contrast / saturation / hue and op order: the batched ops equal
    torchvision's adjust_* applied one image at a time in that order (float images)."""
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    x = torch.rand(3, 3, 12, 16)
    factors = torch.tensor([[1.3, 0.7, 1.15, 0.08], [0.65, 1.35, 0.85, -0.09], [1.0, 1.0, 1.0, 0.0]])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    want = []
    for img, f, o in zip(x, factors, order):
        for k in o.tolist():
            img = ops[k](img, float(f[k]))
        want.append(img)
    got = colour_ops(x, factors, order)
    assert torch.allclose(got, torch.stack(want), atol=1e-5), float((got - torch.stack(want)).abs().max())
    assert torch.allclose(got[2], x[2], atol=1e-5)  # neutral factors change nothing


def test_device_photometric_applies_jitter_grayscale_and_solarisation_at_their_rates():
    """2000 flat-colour images: the fraction left grey, solarised (only with solarize) and jittered matches the
    probabilities within 3 points; the same generator seed gives the same batch."""
    x = torch.zeros(2000, 3, 2, 2)
    x[:, 0], x[:, 1], x[:, 2] = 0.8, 0.2, 0.4
    out = device_photometric(x, solarize=True, generator=torch.Generator().manual_seed(0))
    grey = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(float(grey.float().mean()) - GRAYSCALE_P) < 0.03
    changed = (out != x).flatten(1).any(1) & ~grey
    assert abs(float(changed.float().mean()) - (1 - GRAYSCALE_P) * (1 - (1 - JITTER_P) * (1 - SOLARIZE_P))) < 0.03
    plain = device_photometric(x, solarize=False, generator=torch.Generator().manual_seed(0))
    assert abs(float(((plain != x).flatten(1).any(1)).float().mean()) - (1 - (1 - JITTER_P) * (1 - GRAYSCALE_P))) < 0.03
    assert float(plain[~(plain != x).flatten(1).any(1)].sub(x[0]).abs().max()) == 0.0
    assert torch.equal(out, device_photometric(x, solarize=True, generator=torch.Generator().manual_seed(0)))
    assert JITTER == (0.4, 0.4, 0.2, 0.1)


def test_photometric_device_moves_the_colour_ops_from_the_loader_into_the_step():
    """`pretrain.photometric_device`: the loader's crops of a flat-colour image keep its colour, and the step
    function changes the colour of most images before the models see them; without it the step passes them as
    they are."""
    from raydseg.config import PretrainConfig
    from raydseg.train.pretrain import make_multicrop

    config = {**PretrainConfig().model_dump(), "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2,
              "photometric_device": True}
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 40, 90
    torch.manual_seed(0)
    views = [make_multicrop(config)(image) for _ in range(16)]
    assert all(bool((v == image[:, :1, :1]).all()) for vs in views for v in vs)
    batch = {n: torch.stack([vs[i] for vs in views]) for i, n in enumerate(crop_names(2))}

    class Recorder(torch.nn.Module):
        def forward(self, crops):
            self.seen = crops
            return torch.zeros(sum(len(c) for c in crops), 8)

    def unchanged(on_device: bool) -> float:
        student = Recorder()
        DinoStep(Recorder(), DINOLoss(8, 4, [0.04]), 2, photometric_on_device=on_device)(student, batch, 0)
        plain = [normalize(batch[n]) for n in crop_names(2)]
        return float(np.mean([bool(torch.allclose(a[i], b[i], atol=1e-4)) for a, b in zip(student.seen, plain)
                              for i in range(len(a))]))

    assert unchanged(False) == 1.0
    assert unchanged(True) < 0.5


def test_image_crop_batches_are_the_same_for_any_number_of_loader_workers():
    """The Ray-free loader: batches depend on (seed, position) only, not on the worker processes; encoded images
    (PNG bytes) give the same crops as the arrays; another seed gives other crops."""
    import io

    from PIL import Image

    from raydseg.config import PretrainConfig
    from raydseg.train.pretrain import local_batches

    config = {**PretrainConfig().model_dump(), "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(5)]
    encoded = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    cpu = torch.device("cpu")
    a = list(local_batches(images, config, 3, 4, cpu, seed=1, workers=0))
    b = list(local_batches(encoded, config, 3, 4, cpu, seed=1, workers=2))
    c = list(local_batches(images, config, 3, 4, cpu, seed=2, workers=0))
    assert len(a) == 4 and list(a[0]) == crop_names(2) and a[0]["global_0"].shape == (3, 3, 32, 32)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(a[0]["global_0"], c[0]["global_0"])


def test_head_batchnorm_makes_near_identical_inputs_give_different_outputs():
    """use_bn: hidden units normalised over the batch, so inputs that differ by 1e-4 of their norm (a random-init
    ViT's [CLS] across images) are spread apart; without it their outputs are nearly the same vector."""
    torch.manual_seed(0)
    x = torch.randn(1, 16).repeat(8, 1) + 1e-4 * torch.randn(8, 16)

    @torch.no_grad()
    def spread(head):
        out = torch.nn.functional.normalize(head.mlp(x), dim=-1)
        return float((out - out.mean(0)).norm(dim=-1).mean())

    plain, bn = DINOHead(16, 32, hidden_dim=64, bottleneck_dim=8), DINOHead(16, 32, hidden_dim=64, bottleneck_dim=8,
                                                                             use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2
    assert spread(plain) < 1e-3 < 0.5 < spread(bn)


def test_multicrop_wrapper_groups_resolutions_and_keeps_order():
    calls = []

    class Backbone(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    model = MultiCropWrapper(Backbone(), torch.nn.Identity())
    crops = [torch.full((2, 3, 8, 8), 1.0), torch.full((2, 3, 8, 8), 2.0), torch.full((2, 3, 4, 4), 3.0)]
    out = model(crops)
    assert calls == [(4, 3, 8, 8), (2, 3, 4, 4)]
    assert out[:, 0].tolist() == [1, 1, 2, 2, 3, 3]


def _tiny_dino(out_dim: int = 64, depth: int = 12):
    return build_dino_model("vit_tiny_patch16_224", drop_path=0.0, out_dim=out_dim, hidden_dim=64, bottleneck_dim=32,
                            depth=depth)


def test_a_few_cpu_steps_lower_the_dino_loss():
    """Fixed batch, teacher = EMA of the student: the student learns to match the teacher's sharpened targets."""
    torch.manual_seed(0)
    student = _tiny_dino(depth=2)
    ema = EMA(student)
    steps = 8
    loss_fn = DINOLoss(64, n_crops=4, teacher_temps=teacher_temp_schedule(0.04, 0.04, steps, 0))
    step_fn = DinoStep(ema.module, loss_fn, n_local=2)
    opt = torch.optim.AdamW(param_groups(student), lr=1e-3, weight_decay=0.04)
    crop = MultiCrop(global_size=32, local_size=16, n_local=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    batch = {k: torch.from_numpy(v) for k, v in multicrop_batch(images, crop).items()}
    losses = []
    for step in range(steps):
        out = train_one_step(student, opt, iter([batch]), step_fn, step,
                             before_update=lambda m, o, s: {"grad_norm": clip_gradients(m, 3.0)})
        ema.update(student, 0.9)
        losses.append(out["loss"])
        assert out["images"] == 4 and 0 <= out["teacher_entropy"] <= math.log(64) + 1e-6
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


def test_backbone_checkpoint_loads_into_timm_and_the_project_loader_with_identical_outputs(tmp_path):
    import timm

    from raydseg.features.backbone import create_backbone
    from raydseg.train.pretrain import save_backbone

    torch.manual_seed(1)
    model = _tiny_dino()
    with torch.no_grad():  # move away from the init so that a silently skipped key would show
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "backbone.safetensors"
    save_backbone(model, str(path), {"backbone": "vit_tiny_patch16_224"})
    x = torch.randn(2, 3, 64, 96)
    model.backbone.eval()
    with torch.no_grad():
        want = model.backbone(x)
        ours = create_backbone("vit_tiny_patch16_224", str(path))
        via_timm = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, dynamic_img_size=True,
                                     pretrained_cfg_overlay=dict(file=str(path))).eval()
        assert torch.equal(ours(x), want)
        assert torch.equal(via_timm(x), want)
    # the Segmenter encoder of the teacher stage loads it through teacher.weights the same way
    from raydseg.models.segmenter import build_segmenter

    seg = build_segmenter({"backbone": "vit_tiny_patch16_224", "n_cls": 3, "drop_path": 0.0}, weights=str(path))
    sd = seg.encoder.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.backbone.state_dict().items())


def test_model_and_step_code_import_without_ray():
    """The GPU machine has torch + timm + numpy only: no Ray, pyarrow, MLflow or pydantic may come in with these
    modules."""
    code = ("import sys; import raydseg.train.engine, raydseg.train.steps, raydseg.train.dino, "
            "raydseg.models.dino_head, raydseg.models.mae, raydseg.train.mae, raydseg.train.pretrain, "
            "raydseg.train.segmentation, raydseg.train.loop; "
            "bad = [m for m in ('ray', 'pyarrow', 'mlflow', 'pydantic') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _blob_probe(n_images: int = 4) -> tuple[list[np.ndarray], dict]:
    """Coloured-blob images (raydseg.train.synthetic) as unlabelled images and as a k-NN probe (blobs = segments)."""
    from raydseg.eval.knn import segment_majority_class
    from raydseg.train.synthetic import blob_example

    rng = np.random.default_rng(0)
    images, probe = [], {"frame_ids": [], "images": [], "segment_ids": [], "seg_image": [], "seg_id": [],
                         "seg_class": []}
    for i in range(n_images):
        image, _, seg, gt = blob_example(rng, 48, 64)
        images.append(image)
        probe["frame_ids"].append(f"f{i}")
        probe["images"].append(torch.from_numpy(image))
        probe["segment_ids"].append(torch.from_numpy(seg.astype(np.int32)))
        for sid, c in segment_majority_class(seg, gt).items():
            probe["seg_image"].append(i)
            probe["seg_id"].append(sid)
            probe["seg_class"].append(c)
    for k in ("seg_image", "seg_id", "seg_class"):
        probe[k] = torch.tensor(probe[k])
    return images, probe


def test_pretrain_local_runs_without_ray_and_exports_a_timm_backbone(tmp_path):
    from raydseg.config import PretrainConfig
    from raydseg.features.backbone import create_backbone
    from raydseg.train.pretrain import CHECKPOINT, pretrain_local

    config = {**PretrainConfig().model_dump(), "seed": 0, "out_dir": str(tmp_path), "out_dim": 64,
              "hidden_dim": 32, "bottleneck_dim": 16, "global_crop_size": 32, "local_crop_size": 16, "local_crops": 2,
              "steps": 3, "batch_size": 2, "warmup_steps": 1, "log_every": 3, "knn_k": 1, "knn_crop_size": 32}
    images, probe = _blob_probe()
    history = pretrain_local(config, images, probe=probe, log=lambda s: None)
    assert [h["step"] for h in history] == [0, 3]
    assert 0.0 <= history[0]["knn_acc"] <= 1.0 and 0.0 <= history[-1]["knn_acc"] <= 1.0
    assert np.isfinite(history[-1]["loss"]) and history[-1]["teacher_entropy"] > 0
    assert history[-1]["weight_decay"] == pytest.approx(0.4)  # the cosine schedule's last value
    backbone = create_backbone("vit_tiny_patch16_224", str(tmp_path / CHECKPOINT))
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_pretrain_stage_is_opt_in():
    from raydseg.config import load_config
    from raydseg.pipeline import STAGE_ORDER, default_stages

    assert STAGE_ORDER.index("ingest") < STAGE_ORDER.index("pretrain") < STAGE_ORDER.index("proposals")
    assert "pretrain" not in default_stages(load_config())
    assert "pretrain" in default_stages(load_config(overrides=["pretrain.enabled=true"]))


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_stage_on_ray_train_writes_a_loadable_backbone_and_logs_metrics(ray_local, tmp_path, monkeypatch):
    """Also: the same pretraining with its worker SIGKILLed at step 3 restarts from its checkpoint and writes the
    same backbone weights, bit for bit."""
    # mlflow.set_tracking_uri of an earlier test also sets MLFLOW_TRACKING_URI, which wins over tracking.uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from raydseg.config import load_config
    from raydseg.features.backbone import create_backbone
    from raydseg.pipeline import run_pipeline

    cfg = load_config(REPO / "configs" / "smoke.yaml",
                      [f"run.output_root={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       "synthetic.n_sequences=1", "synthetic.frames_per_sequence=4"])
    result = run_pipeline(cfg, stages=["ingest", "pretrain"])
    report = {r.name: r for r in result.reports}["pretrain"]
    assert report.status == "ran" and report.counts["steps"] == cfg.pretrain.steps
    path = Path(result.run_root) / "pretrain" / "backbone.safetensors"
    backbone = create_backbone(cfg.pretrain.backbone, str(path))
    assert backbone(torch.randn(1, 3, 32, 48)).shape == (1, backbone.num_features)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = [r for r in client.search_runs(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id)
             if r.data.tags.get("mlflow.runName") == "pretrain"][0]
    loss = [m for m in client.get_metric_history(child.info.run_id, "pretrain/loss") if m.step > 0]  # 0: summary
    assert sorted(m.step for m in loss) == list(range(1, cfg.pretrain.steps + 1))
    assert all(np.isfinite(m.value) for m in loss)
    assert "pretrain/teacher_entropy" in child.data.metrics
    knn = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "pretrain/knn_acc")}
    assert 0 in knn and cfg.pretrain.steps in knn  # before training, and at the end
    assert {a.path for a in client.list_artifacts(child.info.run_id, "backbone")} == {"backbone/backbone.safetensors"}

    from raydseg.train.pretrain import train
    from train_faults import KillAt

    marker = tmp_path / "killed_once"
    killed, _ = train(cfg, str(Path(result.stage_dirs["ingest"]) / "frames"), str(tmp_path / "killed"), name="killed",
                      callbacks=[KillAt(3, 0, str(marker))])
    # restarted from the step-2 checkpoint, or from scratch when Ray Train saw the death before registering it
    assert marker.exists() and killed.metrics["step"] == cfg.pretrain.steps and killed.metrics["start_step"] in (0, 2)
    from safetensors.torch import load_file  # the header's metadata order varies (a Rust hash map): compare tensors

    killed_weights, weights = load_file(tmp_path / "killed" / "backbone.safetensors"), load_file(path)
    assert killed_weights.keys() == weights.keys() and all(torch.equal(killed_weights[k], weights[k]) for k in weights)


def test_ema_builds_an_fp32_frozen_copy_with_a_timm_that_has_no_dtype_argument(monkeypatch):
    """The device machine's timm (1.0.x before `dtype` came to ModelEmaV3) refused EMA(model): the copy is then made
    without it and is still fp32, frozen, and averaged with the given momentum."""
    from timm.utils import model_ema

    original = model_ema.ModelEmaV3.__init__

    def old_init(self, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                 warmup_gamma=1.0, warmup_power=2 / 3, device=None, foreach=True, exclude_buffers=False):
        original(self, model, decay=decay, device=device)

    monkeypatch.setattr(model_ema.ModelEmaV3, "__init__", old_init)
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    ema = EMA(student)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    before = ema.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student, 0.75)
    assert torch.allclose(ema.module.weight, 0.75 * before + 0.25 * student.weight)


def test_the_probes_step_0_backbone_is_the_init_of_both_objectives():
    # the driver scores initial_backbone before the workers train; it must be the network either task starts from
    from raydseg.config import PretrainConfig
    from raydseg.train.pretrain import dino_task, initial_backbone, mae_task

    config = {**PretrainConfig().model_dump(), "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "steps": 3}
    torch.manual_seed(5)
    init = initial_backbone(config).state_dict()
    for task in (dino_task, mae_task):
        torch.manual_seed(5)
        model = task({**config, "objective": task.__name__[:-5]}, torch.device("cpu"), None).model
        start = model.backbone.state_dict()
        assert start.keys() == init.keys() and all(torch.equal(start[k], init[k]) for k in init), task.__name__
    torch.manual_seed(6)
    assert not torch.equal(initial_backbone(config).state_dict()["pos_embed"], init["pos_embed"])


def test_standardised_probe_scores_read_a_small_scale_class_signal_under_a_large_scale_nuisance():
    # 4 dimensions carry the class at scale 0.01, 4 carry noise at scale 10: cosine k-NN sees the noise; each
    # dimension scaled by the train side's std sees the class
    from raydseg.train.pretrain import probe_knn_scores

    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    x = np.concatenate([np.repeat((2 * y[:, None] - 1) * 0.01, 4, axis=1), 10 * rng.normal(size=(n, 4))], 1)
    frames = [f"f{i}" for i in range(n)]
    probe = {"seg_class": torch.tensor(y), "seg_image": torch.arange(n), "frame_ids": frames,
             "sequences": {f: f"drive{i % 20}" for i, f in enumerate(frames)}}
    assert probe_knn_scores(probe, x.astype(np.float32))["knn_acc"] < 0.65
    assert probe_knn_scores(probe, x.astype(np.float32), standardise=True)["knn_acc"] > 0.95


def test_the_stage_probe_of_knn_drives_takes_drives_of_two_worlds_and_needs_the_synthetic_source(tmp_path):
    from raydseg.config import load_config
    from raydseg.errors import ConfigError
    from raydseg.train.pretrain import knn_probe

    cfg = load_config(overrides=["pretrain.knn_drives=2", "run.seed=7", "synthetic.conditions=[night,fog]"])
    probe = knn_probe(cfg, str(tmp_path / "no_ingest"))  # the drive probe reads no ingest frames
    assert sorted(set(probe["sequences"].values())) == ["w7-seq0000_day", "w7-seq0001_day", "w8-seq0000_day",
                                                        "w8-seq0001_day"]  # day drives, as the features stage describes
    assert len(probe["seg_id"]) > 0 and list(tmp_path.iterdir()) == []  # its frames were written to a temp dir
    with pytest.raises(FileNotFoundError, match="no_ingest"):  # knn_drives 0: the ingest's frames
        knn_probe(load_config(overrides=["pretrain.knn_drives=0"]), str(tmp_path / "no_ingest"))
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.source=kitti", f"data.root={tmp_path}", "pretrain.knn_drives=24"])
    assert str(e.value) == ("pretrain.knn_drives: 24 needs data.source synthetic (got kitti); 0 = the probe of "
                            "pretrain.knn_frames ingest frames")


def test_an_exported_backbone_is_byte_identical_whatever_order_its_metadata_came_in(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from raydseg.models.dino_head import build_dino_model
    from raydseg.train.pretrain import save_backbone

    model = build_dino_model("vit_tiny_patch16_224", out_dim=8, hidden_dim=8, bottleneck_dim=8, depth=1)
    meta = {f"key{i}": str(i) for i in range(12)}
    save_backbone(model, str(tmp_path / "a.safetensors"), meta)
    save_backbone(model, str(tmp_path / "b.safetensors"), dict(reversed(meta.items())))
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == meta
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in model.backbone.state_dict().items())
    assert (8 + int.from_bytes(a[:8], "little")) % 8 == 0  # tensor data 8-byte aligned


def test_segment_crops_are_the_masked_tight_crops_of_the_segments_that_are_large_enough():
    """Segment 1 fills its box (the crop is its colour), segment 2 is an L (its box's corner outside the mask is the
    ImageNet mean colour), segment 3 is below min_pixels (no crop)."""
    from raydseg.train.pretrain import segment_crops

    image = np.zeros((20, 30, 3), np.uint8)
    seg = np.zeros((20, 30), np.uint16)
    image[2:10, 2:10], seg[2:10, 2:10] = (200, 10, 10), 1
    image[12:20, 12:20], seg[12:20, 12:16], seg[16:20, 12:20] = (10, 200, 10), 2, 2  # the top-right corner is not 2
    image[0, 25:28], seg[0, 25:28] = (10, 10, 200), 3
    ids, crops = segment_crops(image, seg, 8, min_pixels=4)
    assert ids.tolist() == [1, 2] and crops.shape == (2, 8, 8, 3) and crops.dtype == np.uint8
    assert (crops[0] == (200, 10, 10)).all()
    assert (crops[1, 6:, :] == (10, 200, 10)).all() and (crops[1, :, :3] == (10, 200, 10)).all()
    assert (crops[1, :3, 5:] == (124, 116, 104)).all()  # round(255 x ImageNet mean)
    none_ids, none = segment_crops(image, np.zeros_like(seg), 8, min_pixels=4)
    assert len(none_ids) == 0 and none.shape == (0, 8, 8, 3)


def test_segment_crop_part_crops_every_large_lidar_segment_and_rejects_a_broken_frame_without_stopping():
    """One crop per segment of >= min_pixels of the proposals stage's own segment images, equal to `segment_crops` of
    the camera image; a frame whose points cannot be read is a reject with its reason, and the part goes on."""
    from raydseg.config import load_config
    from raydseg.data.schema import decode_image, frames_to_table
    from raydseg.data.sources import synthetic
    from raydseg.geometry.proposals import frame_outputs
    from raydseg.train.pretrain import SEGMENT_CROPS, as_rgb, segment_crop_part, segment_crops

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    frames = synthetic.generate_sequence(synthetic.list_shards(cfg.synthetic, 3)[0], cfg.synthetic)[:2]
    broken = {**frames[1], "frame_id": "broken", "points": np.asarray(frames[1]["points"], np.float32).ravel()[:-1]}
    out, rejects = segment_crop_part(frames_to_table([frames[0], broken, frames[1]]),
                                     cfg.to_dict()["proposals"], 16, 20, seed=3)
    table = out[SEGMENT_CROPS]
    assert [r["id"] for r in rejects] == ["broken"] and rejects[0]["reason"].startswith("proposals failed: ")
    expected = []
    for frame in frames:
        images = {c["name"]: c["image"] for c in frame["cameras"]}
        for row in frame_outputs(frame, cfg.proposals, 3)[0]:
            ids, crops = segment_crops(as_rgb(images[row["camera"]]), decode_image(row["segment_ids"]), 16, 20)
            sizes = np.bincount(decode_image(row["segment_ids"]).ravel())
            assert (sizes[ids] >= 20).all() and ((sizes >= 20).sum() - (sizes[0] >= 20)) == len(ids)
            expected += [(frame["frame_id"], row["camera"], int(i), c) for i, c in zip(ids, crops)]
    assert len(expected) > 10 and table.num_rows == len(expected)
    for got, (fid, cam, sid, crop) in zip(table.to_pylist(), expected):
        assert (got["frame_id"], got["camera"], got["seg_id"]) == (fid, cam, sid)
        assert np.array_equal(decode_image(got["crop"]), crop)  # PNG: lossless


def test_pretraining_on_segment_crops_needs_the_crops_folder(tmp_path):
    """`inputs: segment_crops` trains on the crops folder, not on the frames: an empty one is named before any work."""
    from raydseg.config import load_config
    from raydseg.train.pretrain import train

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["pretrain.inputs=segment_crops", "pretrain.knn_every=-1"])
    (tmp_path / "crops").mkdir()
    with pytest.raises(FileNotFoundError, match=f"^no part-\\*.parquet segment crop files in {tmp_path / 'crops'}$"):
        train(cfg, str(tmp_path / "frames"), str(tmp_path / "out"), crops_dir=str(tmp_path / "crops"))


@pytest.mark.ray
@pytest.mark.slow
def test_the_pretrain_stage_on_segment_crops_writes_them_part_by_part_and_trains_a_masked_autoencoder_on_them(
        ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import pyarrow.parquet as pq

    from raydseg.config import load_config
    from raydseg.data.schema import decode_image
    from raydseg.features.backbone import create_backbone
    from raydseg.parts import map_parts
    from raydseg.pipeline import run_pipeline
    from raydseg.train.pretrain import SEGMENT_CROPS

    cfg = load_config(REPO / "configs" / "smoke.yaml",
                      [f"run.output_root={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       "synthetic.n_sequences=2", "synthetic.frames_per_sequence=2", "pretrain.objective=mae",
                       "pretrain.local_crops=0", "pretrain.inputs=segment_crops", "pretrain.segment_min_pixels=16"])
    result = run_pipeline(cfg, stages=["ingest", "pretrain"])
    report = {r.name: r for r in result.reports}["pretrain"]
    stage = Path(result.run_root) / "pretrain"
    parts = sorted((stage / SEGMENT_CROPS).glob("part-*.parquet"))
    table = pq.read_table(parts)
    assert len(parts) == 2 and report.counts["segment_crops"] == table.num_rows > 0  # one part per ingest part
    assert decode_image(table["crop"][0].as_py()).shape == (32, 32, 3)  # pretrain.global_crop_size
    assert report.status == "ran" and report.counts["steps"] == cfg.pretrain.steps
    backbone = create_backbone(cfg.pretrain.backbone, str(stage / "backbone.safetensors"))
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, backbone.num_features)
    again = map_parts(str(Path(result.stage_dirs["ingest"]) / "frames"), str(stage), lambda t: 1 / 0)
    assert again.counts["parts_resumed"] == 2  # written once: a rerun does not crop again


def test_pretraining_normalises_its_inputs_as_the_features_stage_reads_its_checkpoint_back(tmp_path):
    """timm's default mean / std for vit_tiny_patch16_224 (0.5) describe its hub weights. A random-init ViT is
    pretrained on ImageNet-normalised inputs (DINO, MAE); the export records them and the features stage's loader
    reads them back, so a crop is normalised the same way in both. A start from a file keeps the file's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from raydseg.config import PretrainConfig
    from raydseg.features.backbone import create_backbone, file_input_stats, input_stats, input_stats_metadata
    from raydseg.features.pooling import normalize_image
    from raydseg.train.loop import NO_MLFLOW
    from raydseg.train.pretrain import CHECKPOINT, dino_task, mae_task, save_safetensors

    imagenet = (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    assert input_stats(create_backbone("vit_tiny_patch16_224")) == ([0.5] * 3, [0.5] * 3)
    config = {**PretrainConfig().model_dump(), "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "steps": 3,
              "knn_every": -1, "prefix": "pretrain/"}
    image = np.full((16, 16, 3), 255, np.uint8)
    for task in (dino_task, mae_task):
        out = tmp_path / task.__name__
        t = task({**config, "objective": task.__name__[:-5], "out_dir": str(out)}, torch.device("cpu"), None)
        assert (t.step_fn.mean, t.step_fn.std) == imagenet, task.__name__
        t.export(NO_MLFLOW, 0.0)
        assert file_input_stats(str(out / CHECKPOINT)) == imagenet
        loaded = create_backbone("vit_tiny_patch16_224", str(out / CHECKPOINT))
        stepped = normalize(torch.from_numpy(image)[None], t.step_fn.mean, t.step_fn.std)[0]
        torch.testing.assert_close(normalize_image(image, loaded), stepped)
        assert normalize_image(image, loaded)[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)
    halves = tmp_path / "halves.safetensors"  # a file trained on 0.5 / 0.5 inputs, as mae_recipe.py's
    random_vit = create_backbone("vit_tiny_patch16_224")
    save_safetensors(random_vit.state_dict(), str(halves), input_stats_metadata(random_vit))
    t = mae_task({**config, "objective": "mae", "weights": str(halves), "out_dir": str(tmp_path)},
                 torch.device("cpu"), None)
    assert (t.step_fn.mean, t.step_fn.std) == ([0.5] * 3, [0.5] * 3)
