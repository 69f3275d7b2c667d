"""Save / load trained segmentation models: `<dir>/model.pt` (state_dict) + `<dir>/model_config.json`.

`load_model` accepts a directory (local or s3://), an MLflow run (`runs:/<run_id>` or `runs:/<run_id>/model`,
or a bare 32-hex run id) whose artifact `model/` holds the two files, and always loads with weights_only=True.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from typing import Any

import torch
import torch.nn as nn

from raydseg import storage
from raydseg.errors import InputError
from raydseg.models.export import FORMATS as EXPORT_FORMATS, load_exported
from raydseg.models.segmenter import build_segmenter, resolve_model_cfg

WEIGHTS = "model.pt"
CONFIG = "model_config.json"
ARTIFACT = "model"


def save_model(model: nn.Module, model_cfg: dict[str, Any], out_dir: str) -> None:
    """Write the state_dict (fp32, CPU) and the resolved model config to `out_dir` (local or s3://), atomically."""
    model = getattr(model, "module", model)
    state = {k: v.detach().float().cpu() if v.dtype.is_floating_point else v.detach().cpu()
             for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.makedirs(out_dir)
    storage.write_bytes(storage.join(out_dir, WEIGHTS), buf.getvalue())
    storage.write_json(storage.join(out_dir, CONFIG), resolve_model_cfg(model_cfg))


def _mlflow_dir(src: str) -> str | None:
    """Local directory holding the model files of an MLflow run reference, or None when `src` is not one."""
    if re.fullmatch(r"[0-9a-f]{32}", src):
        src = f"runs:/{src}"
    if not (src.startswith("runs:/") or src.startswith("mlflow-artifacts:") or src.startswith("models:/")):
        return None
    import mlflow

    uri = src if src.rstrip("/").count("/") >= 2 else f"{src.rstrip('/')}/{ARTIFACT}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="raydseg-model-"))
    if not os.path.exists(os.path.join(local, WEIGHTS)) and os.path.exists(os.path.join(local, ARTIFACT, WEIGHTS)):
        local = os.path.join(local, ARTIFACT)
    return local


def load_model(src: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by `save_model` (directory or MLflow run) in eval mode; an exported file
    (`raydseg export`: .onnx, .torchscript) loads through `raydseg.models.export.load_exported`."""
    if src.endswith(tuple(EXPORT_FORMATS.values())):
        if not os.path.isfile(src):
            raise InputError(f"--model: no such file: {src}")
        return load_exported(src)
    from raydseg.outputs import resolve

    d = _mlflow_dir(src) or resolve(src)  # a run folder's `<run>/<stage>/model` also on s3://, through run.json
    cfg_path, w_path = storage.join(d, CONFIG), storage.join(d, WEIGHTS)
    if not storage.exists(w_path):
        raise InputError(f"no {WEIGHTS} in {src} (expected a model dir or runs:/<run_id>)")
    model_cfg = storage.read_json(cfg_path)
    model = build_segmenter(model_cfg)
    state = torch.load(io.BytesIO(storage.read_bytes(w_path)), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.model_cfg = resolve_model_cfg(model_cfg)  # type: ignore[attr-defined]
    return model.eval()


def log_model_artifact(model_dir: str, run_id: str, client: Any = None) -> None:
    """Upload the model dir as the MLflow artifact `model/` of `run_id` (loadable by `load_model("runs:/<id>")`)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    local = storage.local_copy(storage.join(model_dir, WEIGHTS))
    cfg = storage.local_copy(storage.join(model_dir, CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        for src, name in ((local, WEIGHTS), (cfg, CONFIG)):
            with open(src, "rb") as f, open(os.path.join(tmp, name), "wb") as g:
                g.write(f.read())
        client.log_artifacts(run_id, tmp, ARTIFACT)
