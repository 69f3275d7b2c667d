"""Content-keyed stage outputs: every run whose config gives a stage the same key shares that stage's output.

A stage's output lives in `<output_root>/_store/<stage>/<key>/`. The key hashes the config sections the stage
reads, the seed and its inputs' keys, so it follows from the config alone and variants of a config share every
upstream output they have in common. A run folder `<output_root>/<run>/` maps readable names to keys: `run.json`
(stage -> store folder) and, on a local root, a link `<run>/<stage>` to that folder, so that paths such as
`outputs/default/teacher/model` keep working (`resolve` follows `run.json` where there are no links: s3://).
A changed config never deletes an output: it gets new keys next to the old ones. `gc` removes what no run maps.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import sys
import time
from types import ModuleType
from typing import Callable

from raydseg import storage
from raydseg.config import Config
from raydseg.errors import UserError

STORE = "_store"  # run names cannot start with "_" (config.RunName), so the store never collides with a run
RUN_FILE = "run.json"


def stage_keys(cfg: Config, stages: dict[str, ModuleType]) -> dict[str, dict]:
    """{stage: {hash, config_hash, inputs}} for `stages` in pipeline order (each stage's INPUTS come before it).
    A stage's optional OUTPUT_VERSION (int, bumped when the same config starts to give different outputs) joins
    its key when nonzero, so stores made by the older code are not reused; its downstream keys change with it."""
    keys: dict[str, dict] = {}
    for name, stage in stages.items():
        inputs = {i: keys[i]["hash"] for i in stage.INPUTS}
        config_hash = cfg.section_hash(*stage.CONFIG_SECTIONS) + f"-seed{cfg.run.seed}"
        version = getattr(stage, "OUTPUT_VERSION", 0)
        config_hash += f"-v{version}" if version else ""
        digest = hashlib.sha256(f"{config_hash}|{sorted(inputs.items())}".encode()).hexdigest()[:16]
        keys[name] = {"hash": digest, "config_hash": config_hash, "inputs": inputs}
    return keys


def store_rel(stage: str, key: str) -> str:
    """A stage output's folder relative to the output root (what run.json records)."""
    return posixpath.join(STORE, stage, key)


def write_run(run_dir: str, rel: dict[str, str]) -> None:
    """Record the run's stage -> store folder (`store_rel`) map in `<run_dir>/run.json` before any stage runs (so
    that `gc`, even while this run is going on, keeps its outputs)."""
    storage.write_json(storage.join(run_dir, RUN_FILE), {"stages": rel})


def link(run_dir: str, stage: str, target: str) -> None:
    """On a local root, point `<run_dir>/<stage>` at the stage's store folder `target` (a relative link, so that
    the whole output root can move); nothing on s3:// or before the store folder exists."""
    if storage.is_s3(run_dir) or not os.path.isdir(target):
        return
    path, rel = os.path.join(run_dir, stage), os.path.relpath(target, run_dir)
    if os.path.islink(path) and os.readlink(path) == rel:
        return
    tmp = f"{path}.tmp-link"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(rel, tmp)
    os.replace(tmp, path)  # atomic, also over an older link


def adopt_legacy(output_root: str, run_name: str, stage: str, log: Callable[[str], None]) -> None:
    """A stage folder `<run>/<stage>/` of the layout before the store (a real folder, local roots only) moves into
    the store under the key its manifest records, so that a finished or interrupted output is reused, not lost."""
    path = os.path.join(output_root, run_name, stage)
    if storage.is_s3(output_root) or os.path.islink(path) or not os.path.isdir(path):
        return
    recorded = next((storage.read_json(os.path.join(path, f)) for f in ("_manifest.json", "_started.json")
                     if os.path.exists(os.path.join(path, f))), {})
    key = recorded.get("hash") or f"unkeyed-{int(time.time())}"
    target = os.path.join(output_root, STORE, stage, key)
    if os.path.exists(target):
        target = f"{target}.moved-{int(time.time())}"  # never overwrite: gc lists it as unreferenced
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(path, target)
    log(f"[{stage}] moved the earlier output {path} into the store: {target}")


def resolve(path: str) -> str:
    """`path` itself when it exists, else the same path through the nearest run folder's run.json
    (`s3://b/runs/default/teacher/model` -> `s3://b/runs/_store/teacher/<key>/model`)."""
    if storage.exists(path):
        return path
    sep = "/" if storage.is_s3(path) else os.sep
    head, tail = path.rstrip(sep), []
    while True:
        head, name = head.rsplit(sep, 1) if sep in head else ("", head)
        tail.insert(0, name)
        if not head or head.endswith(":/"):  # the top of a local path or of s3://bucket
            break
        run_file = storage.join(head, RUN_FILE)
        if storage.exists(run_file):
            stages = storage.read_json(run_file)["stages"]
            if tail[0] in stages:
                root = head.rsplit(sep, 1)[0] if sep in head else "."
                return storage.join(root, stages[tail[0]], *tail[1:])
    return path


def runs(output_root: str) -> dict[str, dict[str, str]]:
    """{run name: {stage: store folder}} of every run folder under `output_root`."""
    out = {}
    for name in storage.listdir(output_root):
        run_file = storage.join(output_root, name, RUN_FILE)
        if name != STORE and storage.exists(run_file):
            out[name] = storage.read_json(run_file)["stages"]
    return out


def unreferenced(output_root: str) -> list[str]:
    """Store folders (relative to `output_root`) that no run folder maps, in name order."""
    used = {rel for stages in runs(output_root).values() for rel in stages.values()}
    store = storage.join(output_root, STORE)
    return [store_rel(s, k) for s in storage.listdir(store) for k in storage.listdir(storage.join(store, s))
            if store_rel(s, k) not in used]


def gc(output_root: str, yes: bool, log: Callable[[str], None] = print, confirm: Callable[[str], bool] | None = None
       ) -> list[str]:
    """List the store folders no run references with their sizes, then remove them when `yes` or confirmed;
    returns the removed ones (relative to `output_root`)."""
    if not storage.isdir(output_root):
        raise UserError(f"{output_root}: no such output root")
    stale = unreferenced(output_root)
    if not stale:
        log(f"nothing to remove: every output under {output_root} belongs to a run ({len(runs(output_root))} runs)")
        return []
    sizes = {rel: storage.tree_size(storage.join(output_root, rel)) for rel in stale}
    for rel in stale:
        log(f"  {sizes[rel] / 2**20:9.1f} MiB  {rel}")
    total = f"{len(stale)} outputs, {sum(sizes.values()) / 2**20:.1f} MiB"
    if not (yes or (confirm is not None and confirm(f"remove {total}? [y/N] "))):
        log(f"kept {total} (pass --yes to remove them)")
        return []
    for rel in stale:
        storage.rmtree(storage.join(output_root, rel))
    log(f"removed {total}")
    return stale


def main(argv: list[str] | None = None) -> int:
    """`raydseg gc [--output-root R] [--yes]`: remove stage outputs that no run folder references."""
    import argparse

    p = argparse.ArgumentParser(prog="raydseg gc", description=main.__doc__)
    p.add_argument("--output-root", default=None, help="default: run.output_root of the packaged default config")
    p.add_argument("--yes", action="store_true", help="remove without asking")
    args = p.parse_args(argv)
    from raydseg.config import load_config

    root = args.output_root or load_config().run.output_root
    ask = (lambda q: input(q).strip().lower() in ("y", "yes")) if sys.stdin.isatty() else None
    gc(root if storage.is_s3(root) else os.path.abspath(root), args.yes, confirm=ask)
    return 0
