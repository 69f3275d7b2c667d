"""Checks of what a config points at, before Ray starts: paths, S3 reachability, timm backbones, weights files.

`check_inputs(cfg, stages)` collects every problem of the stages about to run, one line each naming its key and
path, and raises them together (`InputError`), so a bad path costs seconds instead of the stages before it.
"""
from __future__ import annotations

import uuid

from raydseg import storage
from raydseg.config import Config
from raydseg.errors import InputError


def _probe(key: str, path: str) -> str | None:
    """None when `path` exists; else why not, naming `key` (a missing local path, or S3 that cannot be reached)."""
    try:
        if storage.exists(path):
            return None
    except OSError as e:  # pyarrow: unreachable endpoint, denied, no such bucket
        return f"{key}: cannot read {path} ({str(e).splitlines()[0]})"
    return f"{key}: {path} does not exist"


def _backbone_problem(key: str, name: str, weights: str) -> str | None:
    import timm

    from raydseg.features.backbone import HUB  # imported late, as timm: the backbone module imports torch

    if not timm.is_model(name):
        return f"{key}: '{name}' is not a timm model (e.g. vit_small_patch16_224.dino; see timm.list_models('vit_*'))"
    if weights == HUB and name not in timm.list_pretrained(name):
        return f"{key}: timm has no pretrained weights named '{name}' (weights: hub)"
    return None


def weights_problem(key: str, weights: str) -> str | None:
    """None when the weights value names no file (random init, hub) or a file that exists; else why not."""
    from raydseg.features.backbone import HUB, is_random_init, resolve_weights_path

    if is_random_init(weights) or weights == HUB:
        return None
    return _probe(key, resolve_weights_path(weights))


def _writable_problem(root: str) -> str | None:
    """None when a file can be created under `root` (made if missing); the probe file is removed again."""
    probe = storage.join(root, f".raydseg-write-probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.rmtree(probe)
    except OSError as e:
        return f"run.output_root: cannot write to {root} ({str(e).splitlines()[0]})"
    return None


def source_layout_problem(cfg: Config) -> str | None:
    """None when data.root holds the chosen real source's layout; else what was looked for there."""
    from raydseg.data.shards import source_module

    return source_module(cfg.data.source).layout_problem(cfg)


def input_problems(cfg: Config, stages: list[str]) -> list[str]:
    """Every problem with the paths and names that `stages` will use, one line each ([] = none)."""
    out: list[str | None] = []
    if "ingest" in stages and cfg.data.source != "synthetic":
        problem = _probe("data.root", cfg.data.root)
        out.append(problem or source_layout_problem(cfg))
    for section in ("pretrain", "features", "teacher"):
        if section not in stages:
            continue
        sec = getattr(cfg, section)
        out.append(_backbone_problem(f"{section}.backbone", sec.backbone, sec.weights))
        out.append(weights_problem(f"{section}.weights", sec.weights))
    if "evaluate" in stages and not cfg.eval.sets.strip() and cfg.data.source != "synthetic":
        out.append(f"eval.sets: required for data.source={cfg.data.source} (NAME:FORMAT:PATH,...); "
                   "only the synthetic source brings its own eval splits")
    if "evaluate" in stages and cfg.eval.sets.strip():
        from raydseg.eval.sets import parse_eval_sets

        for s in parse_eval_sets(cfg.eval.sets):
            problem = _probe(f"eval.sets ({s.name})", s.root)
            if problem is None and not storage.listdir(s.root):
                problem = f"eval.sets ({s.name}): {s.root} is empty"
            out.append(problem)
    out.append(_writable_problem(cfg.run.output_root))
    return [p for p in out if p]


def check_inputs(cfg: Config, stages: list[str]) -> None:
    """Raise InputError naming every bad path, backbone or weights file that `stages` would use."""
    problems = input_problems(cfg, stages)
    if problems:
        raise InputError(problems)
