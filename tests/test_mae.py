"""Masked-autoencoder pretraining (`pretrain.objective: mae`): the patch order, the masking, the loss on masked
patches only, the un-blurred crops, a few steps without Ray that lower the loss and export a timm backbone, the
crop_mean descriptor, the shipped recipe config and the shipped-weights path."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from raydseg.features.backbone import create_backbone
from raydseg.models.mae import MaskedAutoencoder, patchify, sincos_2d

NAME = "vit_tiny_patch16_224"


def _mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(create_backbone(NAME, depth=2).train(), **kw)


def test_patchify_orders_patches_by_row_then_column_and_pixels_row_col_channel():
    x = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 768)
    # patch 4 = grid row 1, column 1: rows 16..31, columns 16..31
    np.testing.assert_array_equal(p[1, 4].numpy(), x[1, :, 16:32, 16:32].permute(1, 2, 0).reshape(-1).numpy())


def test_sincos_position_embedding_values():
    e = sincos_2d(8, 2, 3)  # first half rows, second half columns; each half sin then cos
    assert e.shape == (6, 8)
    np.testing.assert_allclose(e[0].numpy(), [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # position (0, 0)
    np.testing.assert_allclose(e[5, 4].item(), np.sin(2.0), atol=1e-6)  # column 2, frequency 1
    np.testing.assert_allclose(e[5, 0].item(), np.sin(1.0), atol=1e-6)  # row 1


def test_encoder_sees_cls_and_a_quarter_of_the_patches_and_the_loss_counts_masked_patches_only():
    m = _mae(mask_ratio=0.75, norm_pix=False)
    seen = []
    m.backbone.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        m.decoder_pred.weight.zero_()
        m.decoder_pred.bias.zero_()  # predicts 0 everywhere: the loss is the masked targets' mean square
    x = torch.randn(3, 3, 64, 64)
    loss, mask = m(x)
    assert seen == [1 + 4]  # [CLS] + 16 patches x 0.25
    assert mask.shape == (3, 16) and (mask.sum(1) == 12).all()
    target = (patchify(x, 16) ** 2).mean(-1)
    assert loss.item() == pytest.approx(((target * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert loss.item() != pytest.approx(target.mean().item(), rel=1e-3)  # the visible patches are left out


def test_the_masked_autoencoder_trains_under_bf16_autocast_as_on_a_gpu_with_amp():
    """`amp: gpu` (the pretrain default) runs the step under bf16 autocast: the decoder's input must take the
    encoder's dtype (it raised "scatter(): Expected self.dtype to be equal to src.dtype" before)."""
    m = _mae(mask_ratio=0.75, norm_pix=True)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    full, _ = m(x)
    torch.manual_seed(1)  # the same mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, mask = m(x)
    loss.backward()
    assert loss.dtype == torch.float32 and mask.sum().item() == 2 * 3
    assert loss.item() == pytest.approx(full.item(), rel=0.05)  # bf16 rounding only
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_the_mae_step_reconstructs_mae_views_global_crops_of_each_image():
    """views 2: both global crops as one batch of 2B; views 1: global_0 only (B distinct images per B samples)."""
    from raydseg.train.mae import MaeStep

    seen = []
    m = _mae(mask_ratio=0.75, norm_pix=True)
    m.backbone.patch_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    g0, g1 = (torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8) for _ in range(2))
    for views in (2, 1):
        MaeStep(views=views)(m, {"global_0": g0, "global_1": g1, "local_0": g1[:, :, :16, :16]}, 0)
    assert [x.shape[0] for x in seen] == [6, 3]
    assert torch.equal(seen[1], seen[0][:3])  # views 1 is the first crop of each image, normalised alike


def test_norm_pix_targets_are_each_patch_standardised():
    m = _mae(mask_ratio=0.5, norm_pix=True)
    with torch.no_grad():
        m.decoder_pred.weight.zero_()
        m.decoder_pred.bias.zero_()
    x = torch.randn(2, 3, 32, 32) * 5 + 3  # any scale and offset
    loss, _ = m(x)
    assert loss.item() == pytest.approx(767 / 768, rel=1e-5)  # standardised with the unbiased variance, as MAE


def test_mae_crops_are_not_blurred_and_dinos_are():
    from raydseg.config import PretrainConfig
    from raydseg.train.pretrain import make_multicrop

    board = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    image = torch.from_numpy(np.stack([board] * 3))
    p = {**PretrainConfig().model_dump(), "global_crop_size": 32, "global_crop_scale_min": 1.0, "local_crops": 0,
         "photometric": False}
    torch.manual_seed(0)
    mae = make_multicrop({**p, "objective": "mae"})(image)
    dino = make_multicrop(p)(image)
    assert set(np.unique(mae[0].numpy())) == {0, 255}  # a full-image crop at the same size, flipped or not
    assert np.ptp(dino[0].numpy()) < 255  # DINO's first global crop is always blurred: less contrast


def test_mae_pretraining_without_ray_lowers_the_loss_and_exports_a_timm_backbone(tmp_path):
    from raydseg.config import PretrainConfig
    from raydseg.train.pretrain import CHECKPOINT, pretrain_local
    from test_pretrain import _blob_probe

    config = {**PretrainConfig().model_dump(), "seed": 0, "out_dir": str(tmp_path), "objective": "mae",
              "global_crop_size": 32, "local_crops": 0, "photometric": False, "drop_path": 0.0, "steps": 20,
              "norm_pix_loss": False, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0,
              "weight_decay": 0.0, "weight_decay_end": 0.0, "log_every": 1, "knn_every": 0, "knn_k": 1,
              "knn_crop_size": 32, "knn_descriptor": "crop_mean"}
    images, probe = _blob_probe()
    torch.set_num_threads(1)
    history = pretrain_local(config, images, probe=probe, log=lambda s: None)
    assert [h["step"] for h in history] == list(range(21))
    losses = [h["loss"] for h in history[1:]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:3])  # 0.56 against 0.77 when written
    assert history[-1]["mask_ratio"] == pytest.approx(0.75)
    assert "knn_acc" in history[0] and "knn_acc" in history[-1] and "teacher_entropy" not in history[-1]
    init = create_backbone(NAME, seed=0)  # the task builds its model right after torch.manual_seed(0)
    trained = create_backbone(NAME, str(tmp_path / CHECKPOINT))
    x = torch.randn(1, 3, 32, 32)
    assert trained(x).shape == (1, 192) and not torch.allclose(trained(x), init(x))


def test_crop_mean_is_the_masked_crops_mean_patch_token():
    from raydseg.features.pooling import masked_crops, normalize_image, segment_descriptors

    m = create_backbone(NAME, depth=2, seed=0)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    seg = np.zeros((48, 64), np.int32)
    seg[4:30, 5:40], seg[30:46, 40:60] = 3, 7
    ids = np.array([3, 7])
    got = segment_descriptors(m, img, seg, ids, "crop_mean", crop_size=32)
    with torch.no_grad():
        tokens = m.forward_features(masked_crops(normalize_image(img, m), seg, ids, 32))[:, 1:].mean(1)
    np.testing.assert_allclose(got, torch.nn.functional.normalize(tokens, dim=1).numpy(), atol=1e-5)
    cls = segment_descriptors(m, img, seg, ids, "crop_cls", crop_size=32)
    assert not np.allclose(got, cls)
    with pytest.raises(ValueError, match=r"^unknown descriptor 'x' \(crop_cls \| crop_mean \| mask_pool\)$"):
        segment_descriptors(m, img, seg, ids, "x")


def test_shipped_mae_recipe_config():
    from raydseg.config import load_config

    cfg = load_config("configs/pretrain_mae.yaml")
    p = cfg.pretrain
    assert (p.enabled, p.objective, p.inputs, p.mae_views, p.local_crops, p.photometric, p.knn_descriptor,
            p.knn_drives) == (True, "mae", "images", 2, 0, False, "crop_mean", 24)
    assert p.lr == pytest.approx(8 * 1.5e-4 * 2 * p.batch_size / 256)  # 8x MAE's rule, two crops per image
    assert p.steps == 8000


def test_weights_resolve_to_the_shipped_file_from_any_directory(tmp_path, monkeypatch):
    from raydseg.checks import input_problems
    from raydseg.config import load_config
    from raydseg.features.backbone import PACKAGED_WEIGHTS, resolve_weights_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    shipped = tmp_path / "w" / "mine.safetensors"
    shipped.write_bytes(b"")
    monkeypatch.setattr("raydseg.features.backbone.PACKAGED_WEIGHTS", str(tmp_path / "w"))
    assert resolve_weights_path("weights/mine.safetensors") == str(shipped)
    assert resolve_weights_path("mine.safetensors") == str(shipped)
    assert resolve_weights_path("weights/nope.safetensors") == "weights/nope.safetensors"
    assert resolve_weights_path("s3://b/mine.safetensors") == "s3://b/mine.safetensors"
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.safetensors").write_bytes(b"")
    assert resolve_weights_path("weights/mine.safetensors") == "weights/mine.safetensors"  # a path here wins
    cfg = load_config(overrides=["features.weights=weights/nope.safetensors", f"run.output_root={tmp_path}/o"])
    assert "features.weights: weights/nope.safetensors does not exist" in input_problems(cfg, ["features"])
    assert os.path.isfile(os.path.join(PACKAGED_WEIGHTS, "vit_tiny_mae_synthetic.safetensors"))  # package data


def test_the_default_config_starts_from_the_shipped_checkpoint_from_any_directory(tmp_path, monkeypatch):
    """`make run` needs no download: features.weights (and the teacher, which inherits it) is the committed masked
    autoencoder, a plain timm ViT-Tiny/16 that loads wherever the job runs; random init stays one override away."""
    from raydseg.config import load_config
    from raydseg.features.backbone import RANDOM
    from raydseg.train.teacher import encoder_weights

    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert (cfg.features.weights, cfg.features.descriptor, cfg.teacher.weights) == (
        "weights/vit_tiny_mae_synthetic.safetensors", "crop_mean", "")
    assert encoder_weights(cfg) == cfg.features.weights
    shipped = create_backbone(cfg.features.backbone, cfg.features.weights)
    random = create_backbone(cfg.features.backbone, "", seed=0)
    x = torch.randn(1, 3, 32, 32)
    assert shipped(x).shape == (1, 192) and not torch.allclose(shipped(x), random(x))
    control = load_config(overrides=["features.weights=random"])  # the control: random init for both stages
    assert encoder_weights(control) == RANDOM


def test_teacher_weights_random_keeps_the_teacher_at_random_init_beside_a_checkpoint_for_the_features(tmp_path):
    """`teacher.weights: random` states random init, so the features stage can use the checkpoint while the teacher
    (and the oracle, through the same encoder_weights) starts from random: "" would inherit features.weights."""
    from raydseg.checks import input_problems
    from raydseg.config import load_config
    from raydseg.features.backbone import RANDOM
    from raydseg.models.segmenter import create_encoder
    from raydseg.train.teacher import encoder_weights

    cfg = load_config(overrides=["features.weights=weights/vit_tiny_mae_synthetic.safetensors",
                                 "teacher.weights=random", f"run.output_root={tmp_path}/o"])
    assert encoder_weights(cfg) == RANDOM
    assert input_problems(cfg, ["features", "teacher"]) == []
    x = torch.randn(1, 3, 32, 32)
    stated, blank = (create_backbone(cfg.teacher.backbone, w, seed=0) for w in (RANDOM, ""))
    assert torch.equal(stated(x), blank(x))
    torch.manual_seed(0)
    enc = create_encoder(cfg.teacher.backbone, encoder_weights(cfg)).eval()
    shipped = create_backbone(cfg.features.backbone, cfg.features.weights)
    assert not torch.allclose(enc(x), shipped(x))
