"""A trained model out of the project: `raydseg export` (ONNX / TorchScript, dynamic size), `raydseg predict` of the
exported file through onnxruntime, and `raydseg serve` (Ray Serve, batched HTTP) on loopback."""
from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from raydseg.cli import main as cli
from raydseg.data.schema import decode_image, encode_png
from raydseg.models.infer import predict_image
from raydseg.models.io import load_model, save_model
from raydseg.models.segmenter import build_segmenter

from conftest import RAY_ENV, free_port

TINY = {"backbone": "vit_tiny_patch16_224", "n_cls": 6, "drop_path": 0.0, "dropout": 0.0}
SIZES = [(64, 96), (50, 70), (96, 64)]  # patch multiples and not, landscape and portrait


def _images() -> list[np.ndarray]:
    """Smooth random colour fields (the model's labels vary over them), one per size."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:
        coarse = rng.integers(0, 255, size=(4, 6, 3)).astype(np.float32)
        big = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(h, w),
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        out.append(big.numpy().clip(0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("model"))
    save_model(build_segmenter(TINY), TINY, d)
    return d


@pytest.fixture(scope="module")
def image_norm_model_dir(tmp_path_factory):
    """A model that standardises each image itself (`input_norm: image`): its reductions are in the export too."""
    torch.manual_seed(0)
    d, cfg = str(tmp_path_factory.mktemp("model_image_norm")), {**TINY, "input_norm": "image"}
    save_model(build_segmenter(cfg), cfg, d)
    return d


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i, im in enumerate(_images()):
        (d / f"im{i}.png").write_bytes(encode_png(im))
    return str(d)


def _labels(out_dir: str) -> list[np.ndarray]:
    return [decode_image(open(os.path.join(out_dir, "labels", f"im{i}.png"), "rb").read()) for i in range(len(SIZES))]


@pytest.mark.parametrize("fmt,norm", [("onnx", "dataset"), ("torchscript", "dataset"), ("onnx", "image")])
def test_exported_model_predicts_the_same_labels_as_pytorch_at_any_size(fmt, norm, request, images_dir, tmp_path):
    model_dir = request.getfixturevalue("model_dir" if norm == "dataset" else "image_norm_model_dir")
    out = str(tmp_path / f"model.{fmt}")
    assert cli(["export", "--model", model_dir, "--format", fmt, "--out", out]) == 0
    assert cli(["predict", "--model", model_dir, "--images", images_dir, "--out", str(tmp_path / "torch")]) == 0
    assert cli(["predict", "--model", out, "--images", images_dir, "--out", str(tmp_path / fmt)]) == 0
    ref, got = _labels(str(tmp_path / "torch")), _labels(str(tmp_path / fmt))
    for r, g, hw in zip(ref, got, SIZES):
        assert g.shape == hw
        assert len(np.unique(r)) > 1, "a constant prediction would make the comparison meaningless"
        assert (r == g).mean() >= 0.999
    # batched calls at a size the export never saw
    exported, model = load_model(out), load_model(model_dir)
    x = torch.randn(3, 3, 40, 72)
    with torch.no_grad():
        assert (exported(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.999
    assert exported.model_cfg["n_cls"] == TINY["n_cls"]


def test_export_and_predict_refuse_bad_paths_in_one_line(model_dir, images_dir, tmp_path, capsys):
    assert cli(["export", "--model", model_dir, "--format", "onnx", "--out", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: {tmp_path / 'm.pt'} does not end with .onnx (format onnx)"
    missing = str(tmp_path / "none.onnx")
    assert cli(["predict", "--model", missing, "--images", images_dir, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --model: no such file: {missing}"
    assert cli(["serve", "--model", model_dir, "--replicas", "0"]) == 2  # before Ray starts
    assert capsys.readouterr().err.strip() == "error: --replicas: must be at least 1, got 0"
    assert cli(["serve", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no model.pt in {tmp_path} (expected a model dir or runs:/<run_id>)"


def _post(url: str, body: bytes) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture
def serve_cluster(monkeypatch):
    """A local Ray cluster of its own whose workers have raydseg.serve.SERVE_ENV (as `raydseg serve` starts it)."""
    import ray

    from raydseg.serve import SERVE_ENV

    ray.shutdown()
    for k, v in SERVE_ENV.items():
        monkeypatch.setenv(k, v)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env=RAY_ENV)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_label_pngs_in_batches_and_survives_a_malformed_body(model_dir, serve_cluster):
    from ray import serve

    from raydseg.serve import start

    url = start(model_dir, port=free_port(), replicas=1)
    try:
        model = load_model(model_dir)
        images = _images() * 4  # 12 requests, sent at once: they arrive in batches
        with cf.ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(lambda im: _post(url, encode_png(im)), images))
        batch_sizes = []
        for im, (status, body, headers) in zip(images, answers):
            assert status == 200, body
            assert headers["Content-Type"] == "image/png"
            assert (decode_image(body) == predict_image(model, im)).mean() >= 0.999  # batched: float sums may differ
            batch_sizes.append(int(headers["X-Batch-Size"]))
        assert max(batch_sizes) > 1, batch_sizes

        status, body, _ = _post(url, b"not an image")
        assert status == 400
        assert body.decode().startswith("the body is not a PNG or JPEG image (UnidentifiedImageError")
        assert _post(url, b"")[:2] == (400, b"empty body: POST an encoded PNG or JPEG image")
        status, body, _ = _post(url, encode_png(images[1]))  # still serving
        assert status == 200
        assert (decode_image(body) == predict_image(model, images[1])).mean() >= 0.999
    finally:
        serve.shutdown()
