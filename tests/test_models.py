"""Segmenter, losses, save/load (dir and MLflow run) and inference (resize, sliding window)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydseg.models.infer import _windows, predict_image, predict_logits
from raydseg.models.io import load_model, log_model_artifact, save_model
from raydseg.models.losses import ce_loss
from raydseg.models.segmenter import build_segmenter, count_flops_per_image, resolve_model_cfg, standardize_image

TINY = {"backbone": "vit_tiny_patch16_224", "n_cls": 5, "drop_path": 0.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmenter(TINY).eval()


@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_segmenter_outputs_full_resolution_logits_for_any_size(decoder):
    m = build_segmenter({**TINY, "decoder": decoder}).eval()
    for h, w in [(64, 64), (50, 83), (224, 320)]:  # non-multiples of the patch and sizes != 224 (pos-embed interp.)
        assert m(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)


def test_mask_transformer_layers_and_class_embeddings_follow_config():
    m = build_segmenter({**TINY, "n_layers": 2})
    assert len(m.decoder.blocks) == 2 and m.decoder.cls_emb.shape == (1, 5, 192)
    with pytest.raises(ValueError, match="unknown model config keys"):
        resolve_model_cfg({"n_classes": 3})


def test_all_ignored_pixels_give_zero_loss_and_zero_gradient(model):
    m = build_segmenter(TINY).train()
    loss = ce_loss(m(torch.randn(2, 3, 32, 32)), torch.full((2, 32, 32), 255))
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_ignored_pixels_do_not_change_the_loss():
    logits = torch.randn(1, 4, 8, 8)
    target = torch.randint(0, 4, (1, 8, 8))
    target[:, :4] = 255
    other = logits.clone()
    other[:, :, :4] = torch.randn(1, 4, 4, 8) * 10
    assert torch.allclose(ce_loss(logits, target), ce_loss(other, target))
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(ce_loss(logits, target), ref)


def test_class_balanced_loss_weighs_every_class_alike_at_power_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.long)  # class 0 (the ground) fills 90 % of the labelled pixels
    target[:, :2] = 3
    target[:, 2:4, :5] = 255
    per_px = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    class_means = torch.stack([per_px[target == c].mean() for c in (0, 3)])
    assert torch.allclose(ce_loss(logits, target, balance=1.0), class_means.mean())  # each class counts once
    assert torch.allclose(ce_loss(logits, target, balance=0.0), ce_loss(logits, target))
    half = ce_loss(logits, target, balance=0.5)  # between the plain mean and the class-balanced mean
    lo, hi = sorted([ce_loss(logits, target).item(), class_means.mean().item()])
    assert lo <= half.item() <= hi
    assert ce_loss(logits, torch.full_like(target, 255), balance=0.5).item() == 0.0


def test_per_image_input_norm_predicts_a_dark_tinted_low_contrast_copy_like_the_original(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 64)
    dim = 0.3 * x + torch.tensor([-1.0, -0.5, 0.2]).view(1, 3, 1, 1)  # darker, less contrast, a colour cast
    z = standardize_image(dim)
    assert torch.allclose(z.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(z.pow(2).mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-2)
    per_image = build_segmenter({**TINY, "input_norm": "image"}).eval()
    assert torch.allclose(per_image(dim), per_image(x), atol=1e-2)
    dataset = build_segmenter(TINY).eval()
    assert not torch.allclose(dataset(dim), dataset(x), atol=0.1)
    save_model(per_image, {**TINY, "input_norm": "image"}, str(tmp_path / "m"))  # a saved model keeps its input norm
    assert torch.equal(load_model(str(tmp_path / "m"))(dim), per_image(dim))
    with pytest.raises(ValueError, match=r"^unknown input_norm 'channel' \(dataset \| image\)$"):
        build_segmenter({**TINY, "input_norm": "channel"})


def test_save_load_roundtrip_gives_identical_predictions(model, tmp_path):
    save_model(model, TINY, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    x = torch.randn(1, 3, 48, 64)
    assert not loaded.training
    assert torch.equal(model(x), loaded(x))


def test_load_model_from_mlflow_run(model, tmp_path, mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment(f"models-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    save_model(model, TINY, str(tmp_path / "m"))
    log_model_artifact(str(tmp_path / "m"), run_id, client)
    mlflow.set_tracking_uri(mlflow_server)
    x = torch.randn(1, 3, 32, 48)
    for ref in (f"runs:/{run_id}", run_id):
        assert torch.equal(load_model(ref)(x), model(x))


def test_windows_cover_every_pixel_and_stay_inside():
    for length, window, stride in [(100, 32, 16), (64, 64, 32), (70, 32, 30), (20, 32, 16)]:
        starts = _windows(length, window, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + window] = True
            assert s + min(window, length) <= length
        assert covered.all()


def test_sliding_window_equals_whole_image_when_window_covers_it(model):
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    whole = predict_image(model, image)
    assert whole.shape == (40, 56) and whole.dtype == np.int64
    assert np.array_equal(predict_image(model, image, window=64), whole)
    tiled = predict_image(model, image, window=32, stride=16)
    assert tiled.shape == (40, 56) and tiled.max() < 5
    resized = predict_image(model, image, size=32, window=32, stride=16)
    assert resized.shape == (40, 56)


def test_sliding_window_averages_probabilities_of_overlapping_windows():
    class Const(torch.nn.Module):  # logits depend on the window's position only through its mean
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)[:, :, None, None].expand(
                -1, -1, x.shape[2], x.shape[3])

    x = torch.full((1, 3, 8, 16), -1.0)
    x[..., 8:] = 1.0
    out = predict_logits(Const(), x, window=8, stride=4).exp()  # windows at x = 0, 4, 8 (means -1, 0, 1)
    s = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(out.sum(1), torch.ones(1, 8, 16), atol=1e-5)
    assert torch.allclose(out[0, 0, 0, 0], 1 - s) and torch.allclose(out[0, 0, 0, 15], s)
    assert torch.allclose(out[0, 0, 0, 5], (1 - s + 0.5) / 2)  # covered by the windows at 0 and 4


def test_flops_estimate_scales_with_pixels(model):
    ratio = count_flops_per_image(model, 448, 448) / count_flops_per_image(model, 224, 224)
    assert 4.0 < ratio < 16.0  # linear layers scale with tokens (x4), attention with tokens^2 (x16)
