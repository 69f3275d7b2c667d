"""ViT backbones from timm, with weights from the timm hub, a local file or s3://, in timm or DINO layout.

Never unpickles: checkpoints are read with safetensors or `torch.load(weights_only=True)`, and a file that needs
arbitrary unpickling is refused with `UnsafeCheckpointError`. DINO checkpoints (facebookresearch/dino: plain
backbone state_dicts, or training checkpoints with `teacher` / `student` wrappers and `module.` / `backbone.`
prefixes) are converted to timm's layout; a `pos_embed` of another grid size is resampled.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Sequence

import torch
from torch import nn


HUB = "hub"  # weights value: timm's pretrained tag of the backbone name (the only path that downloads)
RANDOM = "random"  # weights value: random init, stated (unlike "", a teacher with it does not inherit features.weights)
PACKAGED_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")  # package data


def is_random_init(weights: str) -> bool:
    """Whether a weights value means random init ("" or "random"): no file, no download."""
    return weights in ("", RANDOM)


def resolve_weights_path(path: str) -> str:
    """The weights file `path` names: as given when it exists, is absolute or s3://; else a shipped checkpoint by
    its name (`weights/<file>` or `<file>`, under raydseg/weights), so that the default config's
    `weights/vit_tiny_mae_synthetic.safetensors` works from any directory and from a wheel install."""
    if not path or path.startswith("s3://") or os.path.isabs(path) or os.path.exists(path):
        return path
    parts = path.replace("\\", "/").split("/")
    shipped = os.path.join(PACKAGED_WEIGHTS, *(parts[1:] if parts[0] == "weights" else parts))
    return shipped if os.path.isfile(shipped) else path


class UnsafeCheckpointError(ValueError):
    """The weights file holds a pickled payload that is not a plain tensor state_dict."""


WRAPPER_KEYS = ("teacher", "student", "state_dict", "model", "module", "backbone")
PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def _local_file(path: str) -> str:
    """The local file holding the weights `path` names (an s3:// object is downloaded once)."""
    path = resolve_weights_path(path)
    if path.startswith("s3://"):  # storage needs pyarrow, which a machine with torch alone (the device) lacks
        from raydseg import storage

        local = storage.local_copy(path)
    else:
        local = os.path.abspath(path)
    if not os.path.exists(local):
        raise FileNotFoundError(f"weights file {path} does not exist")
    return local


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a .safetensors weights file ({} for other formats), read from its header alone: the
    header's 8-byte little-endian length, then its JSON. An s3:// file is read with two ranged reads, not downloaded
    (the driver reads it for the teacher's model config; the workers download it)."""
    path = resolve_weights_path(path)
    s3 = path.startswith("s3://")
    local = "" if s3 else _local_file(path)  # a missing local file is an error in any format
    if not path.endswith(".safetensors"):
        return {}
    if s3:
        from raydseg import storage

        header = storage.read_range(path, 8, struct.unpack("<Q", storage.read_range(path, 0, 8))[0])
    else:
        with open(local, "rb") as f:
            header = f.read(struct.unpack("<Q", f.read(8))[0])
    return json.loads(header).get("__metadata__") or {}


def file_input_stats(path: str) -> tuple[list[float], list[float]]:
    """The RGB mean / std (0..1 scale) the network in a weights file was trained on: its safetensors metadata's
    `mean` / `std` (JSON lists, as `input_stats_metadata` writes them), else ImageNet's (DINO's, MAE's, and this
    project's pretraining before the metadata existed). Not timm's default for the architecture: that describes
    timm's own hub weights (e.g. 0.5 / 0.5 for vit_tiny_patch16_224), not a file's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    meta = safetensors_metadata(path)
    if "mean" in meta and "std" in meta:
        return [float(v) for v in json.loads(meta["mean"])], [float(v) for v in json.loads(meta["std"])]
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def weights_input_stats(weights: str, name: str) -> dict[str, list[float]]:
    """{"mean", "std"} that model `name` started from `weights` expects, for a model config: a weights file's
    (`file_input_stats`), or for the hub timm's for that tag (what `create_backbone` loads; read without a download);
    {} for random init, which keeps the model config's own."""
    if is_random_init(weights):
        return {}
    if weights == HUB:
        from timm.models import get_pretrained_cfg

        tag = get_pretrained_cfg(name)
        return {"mean": list(tag.mean), "std": list(tag.std)} if tag else {}
    return dict(zip(("mean", "std"), file_input_stats(weights)))


def input_stats(model: nn.Module) -> tuple[list[float], list[float]]:
    """The RGB mean / std (0..1 scale) `model` expects: its timm `pretrained_cfg`'s (ImageNet's when it has none)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), list(cfg.get("std", IMAGENET_DEFAULT_STD))


def set_input_stats(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """`model` with `pretrained_cfg` mean / std set, which everything that normalises its inputs reads."""
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": tuple(mean), "std": tuple(std)}
    return model


def input_stats_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata recording the mean / std `model` was trained with (read back by `file_input_stats`)."""
    mean, std = input_stats(model)
    return {"mean": json.dumps(mean), "std": json.dumps(std)}


def read_checkpoint(path: str) -> dict[str, Any]:
    """The raw mapping stored in a local / s3:// weights file (.safetensors, or torch.save of tensors only)."""
    local = _local_file(path)
    if local.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(local, device="cpu"))
    import argparse

    try:  # DINO training checkpoints carry their argparse.Namespace: allowed, nothing else is
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError / RuntimeError from the restricted unpickler
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint and would need unpickling arbitrary "
            f"objects (torch.load weights_only=True failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Save the weights as a state_dict of tensors or as .safetensors") from e
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"refusing to load {path}: expected a mapping of tensors, got {type(obj).__name__}")
    return obj


def to_timm_state_dict(obj: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Convert a checkpoint mapping (timm or DINO layout) to a timm ViT state_dict.

    Unwraps `teacher` (preferred) / `student` / `state_dict` / `model`; strips `module.` and `backbone.` /
    `encoder.` prefixes; drops DINO projection heads (`head.*` when the checkpoint had a `backbone.` part) and
    `fc_norm` / `head` entries the model does not have; resamples `pos_embed` to the model's grid (when given).
    """
    while True:
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    had_backbone = any(k.startswith(("backbone.", "module.backbone.")) for k in tensors)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        name = k
        if had_backbone and not name.removeprefix("module.").startswith("backbone."):
            continue  # DINO training checkpoint: the projection head lives outside `backbone.`
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        out[name] = v
    if model is not None:
        own = model.state_dict()
        out = {k: v for k, v in out.items() if k in own or not k.startswith(("head.", "fc_norm."))}
        if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
            out["pos_embed"] = resample_pos_embed(out["pos_embed"], own["pos_embed"].shape,
                                                  getattr(model, "num_prefix_tokens", 1))
    return out


def resample_pos_embed(pos: torch.Tensor, target_shape: torch.Size, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of a (1, P + h*w, D) position embedding to (1, P + H*W, D) (square grids)."""
    from timm.layers import resample_abs_pos_embed

    n_new = target_shape[1] - num_prefix_tokens
    side = int(round(n_new ** 0.5))
    if side * side != n_new:
        raise ValueError(f"cannot resample pos_embed to a non-square grid of {n_new} tokens")
    return resample_abs_pos_embed(pos, new_size=[side, side], num_prefix_tokens=num_prefix_tokens)


def load_state_dict(weights: str, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A clean timm-layout state_dict from a local / s3:// file (for Segmenter encoders too)."""
    return to_timm_state_dict(read_checkpoint(weights), model)


def create_backbone(name: str, weights: str = "", seed: int | None = None, **kw: Any) -> nn.Module:
    """timm model `name` without a classifier head (num_classes=0), eval mode.

    weights: "" or "random" random init; "hub" timm's pretrained tag of `name` (downloads: only when asked explicitly);
    otherwise a local path or s3:// URL (timm or DINO layout). Missing keys other than the head are an error.
    `dynamic_img_size=True` by default so that whole images of any patch-multiple size can be fed.
    A file's weights bring the input mean / std they were trained with (`file_input_stats`, set as `pretrained_cfg`);
    random init and the hub keep timm's for `name`.
    seed: random init from this torch seed (the global RNG is left as it was), so that every actor of a stage and
    every rerun builds the same model; None = the caller's RNG state.
    """
    import timm

    kw.setdefault("num_classes", 0)
    kw.setdefault("dynamic_img_size", True)
    if weights == HUB:
        model = timm.create_model(name, pretrained=True, **kw)
        return model.eval()
    if seed is None:
        model = timm.create_model(name, pretrained=False, **kw)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kw)
    if not is_random_init(weights):
        sd = load_state_dict(weights, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not m.startswith(("head.", "fc_norm."))]
        if missing or unexpected:
            raise ValueError(f"weights {weights} do not fit {name}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        set_input_stats(model, *file_input_stats(weights))
    return model.eval()
