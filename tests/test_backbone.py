"""Backbone weights (timm and DINO layouts, refusal of pickled payloads) and the two segment descriptors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from raydseg.features.backbone import UnsafeCheckpointError, create_backbone, load_state_dict, set_input_stats
from raydseg.features.pooling import crop_cls_descriptors, mask_pool_descriptors, masked_crops, normalize_image

NAME = "vit_tiny_patch16_224"


def _scene():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(64, 96, 3), dtype=np.uint8)
    seg = np.zeros((64, 96), np.uint16)
    seg[5:30, 10:40] = 3
    seg[35:60, 50:90] = 7
    return img, seg, np.array([3, 7])


def test_timm_and_dino_layouts_give_same_features(tmp_path):
    torch.manual_seed(0)
    src = create_backbone(NAME)
    sd = src.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    dino = {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
            "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()},
            "epoch": 100}
    dino["teacher"]["head.mlp.0.weight"] = torch.zeros(8, 192)  # DINO projection head: dropped
    torch.save(dino, tmp_path / "dino.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    img, seg, ids = _scene()
    set_input_stats(src, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # a file without metadata: ImageNet's
    ref = crop_cls_descriptors(src, img, seg, ids, crop_size=32)
    for f in ("timm.pth", "dino.pth", "w.safetensors"):
        m = create_backbone(NAME, str(tmp_path / f))
        out = crop_cls_descriptors(m, img, seg, ids, crop_size=32)
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f)
    assert not np.allclose(crop_cls_descriptors(create_backbone(NAME), img, seg, ids, crop_size=32), ref)
    clean = load_state_dict(str(tmp_path / "dino.pth"), src)
    assert set(clean) == set(sd) and torch.equal(clean["pos_embed"], sd["pos_embed"])


def test_pos_embed_resampled(tmp_path):
    sd = create_backbone(NAME, img_size=112).state_dict()  # 7x7 grid
    torch.save({"model": sd}, tmp_path / "small.pth")
    m = create_backbone(NAME, str(tmp_path / "small.pth"))  # 14x14 grid
    assert m.pos_embed.shape == (1, 197, 192)
    torch.testing.assert_close(m.pos_embed[:, 0], sd["pos_embed"][:, 0])


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_payload_refused(tmp_path):
    torch.save({"state": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth.*unpickling"):
        create_backbone(NAME, str(tmp_path / "evil.pth"))


def test_masked_crops_zero_outside_after_normalisation():
    img, seg, ids = _scene()
    x = normalize_image(img)
    crops = masked_crops(x, seg, ids, crop_size=25, pad=2)  # box of segment 3 is 25x30, +2 px of zeroed context
    assert crops.shape == (2, 3, 25, 25)
    assert torch.all(crops[0, :, 0, :] == 0) and torch.all(crops[0, :, :, 0] == 0)  # padding outside the mask
    assert torch.all(crops[0, :, 12, 12] != 0)


def test_descriptor_shapes_and_norms():
    m = create_backbone(NAME)
    img, seg, ids = _scene()
    a = crop_cls_descriptors(m, img, seg, ids, crop_size=32)
    b = mask_pool_descriptors(m, img, seg, ids)
    for d in (a, b):
        assert d.shape == (2, 192) and d.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(b[0], b[1])
    # a segment's mask-pooled descriptor only depends on the patches it covers
    img2 = img.copy()
    img2[35:64, 48:96] = 0  # change only the region of segment 7 (patch-aligned rows/cols >= 32/48)
    b2 = mask_pool_descriptors(m, img2, seg, ids)
    assert not np.allclose(b2[1], b[1])


def test_random_init_is_reproducible_per_seed_and_leaves_global_rng_alone():
    """Every feature actor and every rerun must build the same random-init model, or descriptors change."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = create_backbone("vit_tiny_patch16_224", seed=3)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    b = create_backbone("vit_tiny_patch16_224", seed=3)
    c = create_backbone("vit_tiny_patch16_224", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["patch_embed.proj.weight"], sc["patch_embed.proj.weight"])


def test_ground_cells_follow_the_token_grid_and_take_the_token_under_them():
    """A ground pixel's cell is the token its pixel lands on after the whole-image resize (here 50x70 -> 48x64 at
    patch 16: a 3x4 grid); a cell's descriptor is that token, i.e. the mask-pooled descriptor of exactly the cell."""
    from raydseg.clustering.pseudolabels import paint_labels
    from raydseg.features.ground import described_cells, ground_cells
    from raydseg.features.pooling import ground_descriptors

    ground = np.zeros((50, 70), bool)
    ground[40:, :] = True  # the bottom rows: cell row 2
    ground[45:, 60:] = False
    cells = ground_cells(ground.astype(np.uint8), np.zeros(ground.shape, np.uint16), 16)
    assert cells[:40].max() == 0 and set(np.unique(cells[ground])) == {9, 10, 11, 12} and not cells[~ground].any()
    assert cells[49, 0] == 9 and cells[40, 69] == 12 and cells[40, 52] == 11  # col 52 * 4 // 70 = 2
    counts = {int(i): int((cells == i).sum()) for i in (9, 10, 11, 12)}
    assert counts == {9: 180, 10: 170, 11: 180, 12: 120}
    np.testing.assert_array_equal(described_cells(cells, 150), [9, 10, 11])
    painted = paint_labels(cells, np.array([9, 10, 11]), np.array([1, 0, 1]))  # as the cluster stage paints cells
    assert painted[49, 0] == 1 and painted[49, 20] == 0 and painted[40, 69] == 255 and painted[0, 0] == 255

    m = create_backbone(NAME)
    img, _, _ = _scene()  # 64x96: an exact 4x6 grid
    g = np.zeros((64, 96), np.uint8)
    g[40:, :] = 1
    g[:16, :] = 2  # sky is not ground
    seg = np.zeros((64, 96), np.uint16)
    seg[40:48, :] = 5  # ground pixels under a segment are not the ground's
    cells = ground_cells(g, seg, 16)
    ids = described_cells(cells, 16)
    np.testing.assert_array_equal(ids, np.arange(19, 25))
    d = ground_descriptors(m, img, cells, ids)
    assert d.shape == (6, 192)
    np.testing.assert_allclose(d, mask_pool_descriptors(m, img, cells, ids), atol=1e-5)
    assert ground_descriptors(m, img, cells, ids[:0]).shape == (0, 192)


def test_a_weights_file_brings_the_input_mean_and_std_it_was_trained_with(tmp_path):
    """Its safetensors metadata's `mean` / `std`; ImageNet's for a file without them (DINO's and MAE's own); random
    init keeps timm's default for the architecture. The features stage and the teacher normalise with them."""
    import json

    from safetensors.torch import save_file

    from raydseg.config import load_config
    from raydseg.features.backbone import file_input_stats, input_stats
    from raydseg.train.teacher import model_cfg_from

    sd = {k: v.contiguous() for k, v in create_backbone(NAME, seed=0).state_dict().items()}
    save_file(sd, str(tmp_path / "stamped.safetensors"),
              {"mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([0.4, 0.5, 0.6])})
    save_file(sd, str(tmp_path / "plain.safetensors"))
    torch.save(sd, tmp_path / "plain.pth")
    assert file_input_stats(str(tmp_path / "stamped.safetensors")) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    stamped = create_backbone(NAME, str(tmp_path / "stamped.safetensors"))
    assert input_stats(stamped) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    white = normalize_image(np.full((2, 2, 3), 255, np.uint8), stamped)[:, 0, 0]
    torch.testing.assert_close(white, torch.tensor([0.9 / 0.4, 0.8 / 0.5, 0.7 / 0.6]))
    for f in ("plain.safetensors", "plain.pth"):
        assert input_stats(create_backbone(NAME, str(tmp_path / f))) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert input_stats(create_backbone(NAME)) == ([0.5] * 3, [0.5] * 3)
    teacher = model_cfg_from(load_config(overrides=[f"teacher.weights={tmp_path}/stamped.safetensors"]))
    assert (teacher["mean"], teacher["std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert "mean" not in model_cfg_from(load_config(overrides=["teacher.weights=random"]))


def test_hub_weights_bring_the_input_mean_and_std_of_their_timm_tag():
    """The teacher's Segmenter from `hub` weights normalises as `create_backbone` loads them, with timm's
    `pretrained_cfg` of that tag (AugReg ViT-Tiny: 0.5; DINO ViT-S/16: ImageNet's), read without a download."""
    from raydseg.config import load_config
    from raydseg.train.teacher import model_cfg_from

    def stats(backbone: str) -> tuple[list[float], list[float]]:
        m = model_cfg_from(load_config(overrides=["teacher.weights=hub", f"teacher.backbone={backbone}"]))
        return m["mean"], m["std"]

    assert stats("vit_tiny_patch16_224") == ([0.5] * 3, [0.5] * 3)
    assert stats("vit_small_patch16_224.dino") == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_an_s3_weights_file_brings_its_statistics_from_its_header_without_a_download(tmp_path, monkeypatch,
                                                                                     s3_bucket):
    """The driver reads an s3:// file's mean / std for the teacher's model config with ranged reads of its header
    (moto's S3 server); only loading the weights downloads the file, once, into the cache."""
    import io
    import json
    import os
    import tempfile

    from safetensors.torch import save, save_file

    from raydseg import storage
    from raydseg.config import load_config
    from raydseg.features.backbone import file_input_stats, input_stats
    from raydseg.train.teacher import model_cfg_from

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # storage.local_copy's cache: tmp_path/raydseg-cache
    sd = {k: v.contiguous() for k, v in create_backbone(NAME, seed=0).state_dict().items()}
    stamped, plain = f"s3://{s3_bucket}/w/stamped.safetensors", f"s3://{s3_bucket}/w/plain.pth"
    storage.write_bytes(stamped, save(sd, {"mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([0.4, 0.5, 0.6])}))
    buf = io.BytesIO()
    torch.save(sd, buf)
    storage.write_bytes(plain, buf.getvalue())
    teacher = model_cfg_from(load_config(overrides=[f"teacher.weights={stamped}"]))
    assert (teacher["mean"], teacher["std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert file_input_stats(plain) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # no header: ImageNet's
    assert not (tmp_path / "raydseg-cache").exists()
    assert input_stats(create_backbone(NAME, stamped)) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert len(os.listdir(tmp_path / "raydseg-cache")) == 1
    save_file(sd, str(tmp_path / "local.safetensors"), {"mean": "[1, 2, 3]", "std": "[4, 5, 6]"})
    assert file_input_stats(str(tmp_path / "local.safetensors")) == ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
