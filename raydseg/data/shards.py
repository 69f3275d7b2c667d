"""Source shards -> Frame part files: the source registry, one shard read (a broken shard is a reject), its valid
frames written as `frames/part-SSSSS-CCC.parquet` chunks, and frames with a repeated frame_id dropped across parts.

A shard is a source's unit of reading (a sequence / drive / scene / parquet file); `raydseg.stages.ingest` maps
`write_shard` over the shards on Ray.
"""
from __future__ import annotations

import importlib
import json
from typing import Any

import numpy as np

from raydseg import storage
from raydseg.config import Config
from raydseg.data.schema import frames_to_table, split_valid

SOURCES = ("synthetic", "kitti", "nuscenes", "waymo")


def source_module(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown data.source '{name}' (one of: {', '.join(SOURCES)})")
    return importlib.import_module(f"raydseg.data.sources.{name}")


def list_shards(cfg: Config) -> list[dict]:
    """The source's shards; for the synthetic source, only as many sequences as `data.max_frames` needs."""
    mod = source_module(cfg.data.source)
    if cfg.data.source != "synthetic":
        return mod.list_shards(cfg)
    shards = mod.list_shards(cfg.synthetic, cfg.run.seed)
    if cfg.data.max_frames:
        per_seq = max(cfg.synthetic.frames_per_sequence // max(cfg.data.frame_stride, 1), 1)
        shards = shards[: max(1, -(-cfg.data.max_frames // per_seq))]
    return shards


def read_shard(shard: dict, cfg: Config) -> tuple[list[dict], list[dict]]:
    """(frame rows, rejects) of one shard; an exception while reading rejects the whole shard, with its reason."""
    mod = source_module(cfg.data.source)
    try:
        if cfg.data.source == "synthetic":
            return mod.generate_sequence(shard, cfg.synthetic), []
        return mod.read_shard(shard, cfg)
    except Exception as e:  # noqa: BLE001 - a broken shard is a reject, not the end of the job
        return [], [{"id": f"shard:{json.dumps(shard, sort_keys=True, default=str)[:200]}",
                     "reason": f"shard unreadable: {type(e).__name__}: {e}"}]


def write_shard(index: int, shard: dict, cfg: Config, out_dir: str) -> dict[str, Any]:
    """Read, validate and write shard `index` as `<out_dir>/frames/part-<index>-<chunk>.parquet` chunks of
    `data.frames_per_part` frames; returns its stats {shard, frames, images, points, parts, rejects}."""
    rows, rejects = read_shard(shard, cfg)
    rows = rows[::max(cfg.data.frame_stride, 1)] if cfg.data.source == "synthetic" else rows
    good, bad = split_valid(rows)
    per = max(cfg.data.frames_per_part, 1)
    parts = []
    for c in range(0, len(good), per):
        name = f"part-{index:05d}-{c // per:03d}.parquet"
        storage.write_table(frames_to_table(good[c:c + per]), storage.join(out_dir, "frames", name))
        parts.append(name)
    return {"shard": index, "frames": len(good), "images": sum(len(r["cameras"]) for r in good),
            "points": int(sum(len(r["points"]) for r in good)), "parts": parts, "rejects": rejects + bad}


def drop_duplicate_frames(out_dir: str, stats: list[dict]) -> list[dict]:
    """Drop frames whose frame_id already appeared in an earlier shard or part, in shard order (reads only the id
    column; rewrites only the affected parts); updates the shards' `frames` / `images` in `stats` and returns the
    rejects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seen: set[str] = set()
    rejects = []
    for s in sorted(stats, key=lambda s: s["shard"]):
        for name in s["parts"]:
            path = storage.join(out_dir, "frames", name)
            keep = []
            for frame_id in storage.read_table(path, columns=["frame_id"]).column("frame_id").to_pylist():
                keep.append(frame_id not in seen)
                if keep[-1]:
                    seen.add(frame_id)
                else:
                    rejects.append({"id": frame_id, "reason": "duplicate frame_id"})
            if not all(keep):
                s["frames"] -= keep.count(False)
                table = storage.read_table(path)
                n_cams = pc.list_value_length(table.column("cameras")).to_numpy(zero_copy_only=False)
                s["images"] = s.get("images", 0) - int(n_cams[~np.array(keep)].sum())
                storage.write_table(table.filter(pa.array(keep)), path)
    return rejects
