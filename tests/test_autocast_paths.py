"""The bf16 autocast paths that run on GPU (features, the train step, evaluation), run here under torch's CPU
autocast so that dtype mistakes surface without a GPU; and, where CUDA exists (`gpu` marker), GPU against CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydseg.features.backbone import create_backbone
from raydseg.features.pooling import crop_cls_descriptors, mask_pool_descriptors
from raydseg.models.infer import predict_image
from raydseg.models.io import load_model, save_model
from raydseg.models.losses import ce_loss, soft_target_loss
from raydseg.models.segmenter import build_segmenter, normalize

TINY = {"backbone": "vit_tiny_patch16_224", "n_cls": 5, "drop_path": 0.0, "dropout": 0.0}
BF16 = torch.bfloat16


def _scene(h: int = 64, w: int = 96):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    seg = np.zeros((h, w), np.uint16)
    seg[5:30, 10:40] = 3
    seg[35:60, 50:90] = 7
    return img, seg, np.array([3, 7])


class _OutputDtypes:
    """Forward hooks recording the output dtype of every nn.Linear (what autocast changes)."""

    def __init__(self, model: torch.nn.Module):
        self.seen: set[torch.dtype] = set()
        self.handles = [m.register_forward_hook(lambda _m, _i, out: self.seen.add(out.dtype))
                        for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("descriptor", ["crop_cls", "mask_pool"])
def test_feature_descriptors_under_bf16_autocast_are_fp32_unit_vectors_close_to_fp32(descriptor):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224").eval()
    img, seg, ids = _scene()
    fn = crop_cls_descriptors if descriptor == "crop_cls" else mask_pool_descriptors
    kw = {"crop_size": 32} if descriptor == "crop_cls" else {}
    ref = fn(model, img, seg, ids, **kw)
    rec = _OutputDtypes(model)
    low = fn(model, img, seg, ids, device="cpu", dtype=BF16, **kw)
    rec.close()
    assert rec.seen == {BF16}  # the ViT's matmuls really ran in bf16
    assert low.dtype == np.float32 and low.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    assert (low * ref).sum(1).min() > 0.99  # cosine to the fp32 descriptor


# ----------------------------------------------------------------------------------------------- train step


def _batch(b: int = 2, size: int = 32, n_cls: int = 5):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 255, (b, size, size, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, n_cls, (b, size, size), generator=g)
    labels[:, :4] = 255  # unlabelled rows, as sparse pseudo-labels have
    return images, labels


@pytest.mark.parametrize("objective", ["teacher", "student"])
def test_train_step_under_bf16_autocast_keeps_fp32_weights_and_gradients(objective):
    """The step of raydseg.train.loop as it runs on GPU (autocast around forward + loss, backward outside the
    parameters' dtype), on CPU: bf16 activations, fp32 loss, fp32 finite gradients, fp32 weights that move."""
    torch.manual_seed(0)
    model = build_segmenter(TINY).train()
    teacher = build_segmenter(TINY).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = _batch()
    x = normalize(images)
    before = [p.detach().clone() for p in model.parameters()]
    rec = _OutputDtypes(model)
    with torch.autocast("cpu", dtype=BF16):
        logits = model(x)
        if objective == "teacher":
            loss = ce_loss(logits, labels)
        else:
            with torch.no_grad():
                probs = teacher(x).float().softmax(1)
            loss = soft_target_loss(logits, probs, temperature=2.0)
    rec.close()
    assert rec.seen == {BF16} and logits.dtype == BF16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():  # the bf16 loss is the fp32 loss up to bf16 rounding
        ref = model.eval()(x)
        ref_loss = ce_loss(ref, labels) if objective == "teacher" else soft_target_loss(ref, probs, 2.0)
        with torch.autocast("cpu", dtype=BF16):
            low = model(x)
            low_loss = ce_loss(low, labels) if objective == "teacher" else soft_target_loss(low, probs, 2.0)
    assert float(low_loss) == pytest.approx(float(ref_loss), rel=0.05)


@pytest.mark.parametrize("amp, cpu_bf16, on_cpu, on_cuda", [
    ("none", True, False, False),
    ("gpu", True, False, True),
    ("auto", True, True, True),
    ("auto", False, False, True),  # a CPU without native bf16 (emulated bf16 is slower than fp32) stays fp32
    ("all", False, True, True),
])
def test_amp_setting_decides_autocast_per_device(monkeypatch, amp, cpu_bf16, on_cpu, on_cuda):
    from raydseg.train import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: cpu_bf16)  # the CPU's instruction set cannot change here
    assert precision.use_bf16(amp, "cpu") is on_cpu and precision.use_bf16(amp, "cuda") is on_cuda
    # the GPU scripts read raw YAML, where the former boolean may still stand
    assert [precision.use_bf16(v, d) for v in (True, False) for d in ("cpu", "cuda")] == [False, True, False, False]
    with pytest.raises(ValueError, match=r"^unknown amp 'on' \(none \| gpu \| auto \| all\)$"):
        precision.use_bf16("on", "cpu")


def test_cpu_bf16_detection_matches_the_kernel_cpu_flags():
    """`amp: auto` trains in bf16 exactly where /proc/cpuinfo lists AVX512-BF16 or AMX tiles."""
    import pathlib

    from raydseg.train.precision import cpu_has_bf16

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert cpu_has_bf16() is bool(flags & {"avx512_bf16", "amx_tile"})


def test_cpu_bf16_benchmark_times_both_precisions_and_they_train_alike(tmp_path):
    """jobs/benchmarks/cpu_bf16.py at toy sizes: a row per stage with both timings, and after the same steps on the
    same batches the bf16 loss is the fp32 loss up to bf16 rounding."""
    import json
    import subprocess
    import sys

    small = [f"{s}.{k}={v}" for s in ("teacher", "student") for k, v in (("crop_size", 32), ("batch_size", 2))]
    p = subprocess.run([sys.executable, "jobs/benchmarks/cpu_bf16.py", "--out", str(tmp_path / "b.json"),
                        "--threads", "1", "--steps", "2", "--warmup", "1", "--repeats", "1",
                        *[a for s in small for a in ("--set", s)]], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["baseline"] == "fp32" and [(r["stage"], r["threads"], r["crop_px"]) for r in out["rows"]] == [
        ("teacher", 1, 32), ("student", 1, 32)]
    for r in out["rows"]:
        assert r["fp32_s_per_step"] > 0 and r["ratio_bf16_vs_fp32"] == r["bf16_s_per_step"] / r["fp32_s_per_step"]
        assert r["bf16_loss"] == pytest.approx(r["fp32_loss"], rel=0.05)


# ----------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    cfg = {**TINY, "decoder": "linear"}
    save_model(build_segmenter(cfg), cfg, str(d))
    return str(d)


def test_predictor_cpu_path_is_unchanged_full_precision(model_dir, tmp_path):
    """Without a GPU the actor predicts on CPU, in fp32, exactly as `predict_image` on the loaded model does."""
    from raydseg.eval.inference import Predictor

    img, _, _ = _scene(48, 64)
    for num_gpus in (0.0, 1.0):  # asking for a GPU where CUDA is absent still runs on CPU
        if num_gpus and torch.cuda.is_available():
            continue
        p = Predictor({"m": model_dir}, {"m": str(tmp_path)}, window=32, stride=16, num_gpus=num_gpus)
        assert p.device == "cpu" and next(p.models['m'].parameters()).device.type == "cpu"
        assert "autocast_dtype" not in p.kwargs
        ref = predict_image(load_model(model_dir), img, window=32, stride=16)
        np.testing.assert_array_equal(p.predict(p.models['m'], img, **p.kwargs), ref)


def test_predictor_bf16_autocast_path_runs_on_cpu(model_dir, tmp_path):
    """The GPU path's autocast (forced on CPU): bf16 forwards, float32 window averaging, int64 classes that agree
    with fp32 on nearly every pixel."""
    from raydseg.eval.inference import Predictor

    img, _, _ = _scene(48, 64)
    p = Predictor({"m": model_dir}, {"m": str(tmp_path)}, window=32, stride=16, device="cpu", amp=True)
    assert p.kwargs["autocast_dtype"] == BF16
    rec = _OutputDtypes(p.models['m'])
    low = p.predict(p.models['m'], img, **p.kwargs)
    rec.close()
    assert rec.seen == {BF16}
    ref = predict_image(load_model(model_dir), img, window=32, stride=16)
    assert low.dtype == np.int64 and low.shape == ref.shape == (48, 64)
    assert (low == ref).mean() > 0.9


@pytest.mark.gpu
def test_gpu_and_cpu_evaluate_predictions_agree(model_dir, tmp_path):
    """On a GPU actor the model lives on CUDA and predicts under bf16 autocast; the classes match the CPU's."""
    from raydseg.eval.inference import Predictor

    img, _, _ = _scene(96, 128)
    gpu = Predictor({"m": model_dir}, {"m": str(tmp_path)}, window=64, stride=32, num_gpus=1)
    cpu = Predictor({"m": model_dir}, {"m": str(tmp_path)}, window=64, stride=32, num_gpus=0)
    assert gpu.device == "cuda" and next(gpu.models['m'].parameters()).is_cuda and gpu.kwargs["autocast_dtype"] == BF16
    a = gpu.predict(gpu.models['m'], img, **gpu.kwargs)
    b = cpu.predict(cpu.models['m'], img, **cpu.kwargs)
    assert (a == b).mean() > 0.98
