"""`raydseg serve --model M [--port P] [--replicas N] [--gpus G]`: a Ray Serve deployment of a trained model.

`POST /predict` with an encoded PNG or JPEG image as the body answers the label PNG (uint8 pseudo-classes) at the
image's size. Concurrent requests are batched (`serve.batch`); images of one size share a forward. A body that is
not an image answers 400 with the reason, and the replica goes on serving. The response header `X-Batch-Size`
says how many requests shared the batch.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from raydseg.errors import InputError

ROUTE = "/predict"
MAX_BATCH_SIZE = 8
BATCH_WAIT_S = 0.05
# Serve's proxy must start within its readiness check (Ray's default 5 s, three tries): on a loaded 2-core machine
# a fresh worker importing Serve takes longer, and the proxy is killed and restarted in a loop
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


class BadRequest(ValueError):
    """A request body the server cannot segment; the message is the reason sent back with status 400."""


def decode_request(body: bytes) -> np.ndarray:
    """Request body -> (H, W, 3) uint8 RGB image, or BadRequest naming what is wrong."""
    from raydseg.data.schema import as_rgb, decode_image

    if not body:
        raise BadRequest("empty body: POST an encoded PNG or JPEG image")
    try:
        image = decode_image(body)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a body that is not an image
        raise BadRequest(f"the body is not a PNG or JPEG image ({type(e).__name__}: {e})") from None
    if image.dtype != np.uint8:
        raise BadRequest(f"expected an 8-bit image, got {image.dtype}")
    return as_rgb(image)


def predict_batch(model: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """(H, W, 3) uint8 images -> (H, W) int64 labels, one forward per group of equal-sized images."""
    from raydseg.models.infer import model_inputs, predict_logits

    out: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    for idx in by_shape.values():
        labels = predict_logits(model, model_inputs(model, np.stack([images[i] for i in idx]))).argmax(1).cpu().numpy()
        for i, lab in zip(idx, labels):
            out[i] = lab
    return out  # type: ignore[return-value]


def segmenter_deployment(replicas: int = 1, gpus: float = 0.0, max_batch_size: int = MAX_BATCH_SIZE) -> Any:
    """The Ray Serve deployment class (built here so that `import raydseg.serve` does not need Ray Serve)."""
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_gpus": gpus, "num_cpus": 1})
    class Segmenter:
        def __init__(self, model: str):
            import torch

            from raydseg.models.io import load_model

            self.model = load_model(model).to("cuda" if gpus and torch.cuda.is_available() else "cpu").eval()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=BATCH_WAIT_S)
        async def segment(self, images: list[np.ndarray]) -> list[tuple[bytes, int]]:
            from raydseg.data.schema import encode_png

            labels = predict_batch(self.model, images)
            return [(encode_png(lab.astype(np.uint8)), len(images)) for lab in labels]

        async def __call__(self, request: Any) -> Response:
            if request.url.path.rstrip("/") != ROUTE:
                return Response(f"not found: POST {ROUTE}", status_code=404)
            if request.method != "POST":
                return Response(f"method {request.method} not allowed: POST {ROUTE}", status_code=405)
            try:
                image = decode_request(await request.body())
            except BadRequest as e:
                return Response(str(e), status_code=400, media_type="text/plain")
            png, batch = await self.segment(image)
            return Response(png, media_type="image/png", headers={"X-Batch-Size": str(batch)})

    return Segmenter


def start(model: str, port: int = 8000, replicas: int = 1, gpus: float = 0.0, host: str = "127.0.0.1",
          max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """Deploy `model` on the connected Ray cluster (Serve started on host:port) and return the predict URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(segmenter_deployment(replicas, gpus, max_batch_size).bind(model), name="raydseg", route_prefix="/")
    return f"http://{host}:{port}{ROUTE}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydseg serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model dir (local or s3://), MLflow run (runs:/<id>) or .onnx file")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve beyond this machine")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    args = p.parse_args(argv)
    if args.replicas < 1:
        raise InputError(f"--replicas: must be at least 1, got {args.replicas}")
    if args.gpus < 0:
        raise InputError(f"--gpus: must be >= 0, got {args.gpus}")
    from raydseg.models.io import load_model

    load_model(args.model)  # a bad --model fails here, in one line, before Ray starts
    import ray

    for k, v in SERVE_ENV.items():  # a local cluster's workers inherit them
        os.environ.setdefault(k, v)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, configure_logging=False)
    url = start(args.model, args.port, args.replicas, args.gpus, args.host)
    print(f"serving {args.model} at {url} (Ctrl-C stops)", flush=True)
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
