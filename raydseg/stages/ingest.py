"""Stage `ingest`: read a Frame source shard by shard on Ray Data, validate, write Frame part files.

Each shard (a sequence / drive / scene / parquet file) becomes `frames/part-SSSSS-CCC.parquet` chunks of
`data.frames_per_part` frames; a shard marker in `_shards/` is written after its chunks, so a rerun resumes
with the unfinished shards only. Bad frames go to the rejects with their reason; the stage goes on. The
synthetic source also writes its Cityscapes-layout evaluation splits to `eval/<condition>/`.
"""
from __future__ import annotations

import importlib
import json
from typing import Any

import numpy as np

from raydseg import stage_requests, storage
from raydseg.config import Config, config_from_dict
from raydseg.data.schema import frames_to_table, split_valid
from raydseg.errors import InputError
from raydseg.parts import single_operator_pipeline
from raydseg.pipeline import StageContext, StageResult

NAME = "ingest"
INPUTS: tuple[str, ...] = ()
CONFIG_SECTIONS = ("data", "synthetic")
SOURCES = ("synthetic", "kitti", "nuscenes", "waymo")


def source_module(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown data.source '{name}' (one of: {', '.join(SOURCES)})")
    return importlib.import_module(f"raydseg.data.sources.{name}")


def list_shards(cfg: Config) -> list[dict]:
    mod = source_module(cfg.data.source)
    if cfg.data.source == "synthetic":
        return mod.list_shards(cfg.synthetic, cfg.run.seed)
    return mod.list_shards(cfg)


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


def _shard_marker(out_dir: str, index: int) -> str:
    return storage.join(out_dir, "_shards", f"{index:05d}.json")


def ingest_shard(index: int, shard: dict, cfg: Config, out_dir: str) -> dict[str, Any]:
    """Read, validate and write one shard as Frame part files; returns its stats (also stored as its marker)."""
    rows, rejects = read_shard(shard, cfg)
    rows = rows[::max(cfg.data.frame_stride, 1)] if cfg.data.source == "synthetic" else rows
    good, bad = split_valid(rows)
    per = max(cfg.data.frames_per_part, 1)
    parts = []
    for c in range(0, len(good), per):
        name = f"part-{index:05d}-{c // per:03d}.parquet"
        storage.write_table(frames_to_table(good[c:c + per]), storage.join(out_dir, "frames", name))
        parts.append(name)
    stats = {"shard": index, "frames": len(good), "images": sum(len(r["cameras"]) for r in good),
             "points": int(sum(len(r["points"]) for r in good)), "parts": parts, "rejects": rejects + bad}
    storage.write_json(_shard_marker(out_dir, index), stats)
    return stats


def _dedupe(out_dir: str, stats: list[dict]) -> list[dict]:
    """Drop frames whose frame_id already appeared earlier (reads only the id column; rewrites only affected parts)."""
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


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg = ctx.cfg
    shards = list_shards(cfg)
    if cfg.data.max_frames and cfg.data.source == "synthetic":
        per_seq = max(cfg.synthetic.frames_per_sequence // max(cfg.data.frame_stride, 1), 1)
        shards = shards[: max(1, -(-cfg.data.max_frames // per_seq))]
    todo = [(i, s) for i, s in enumerate(shards) if not storage.exists(_shard_marker(ctx.out_dir, i))]
    cfg_dict, out_dir = cfg.to_dict(), ctx.out_dir

    def work(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        local_cfg = config_from_dict(cfg_dict)
        done = [ingest_shard(int(i), json.loads(s), local_cfg, out_dir) for i, s in zip(batch["index"], batch["shard"])]
        return {"index": np.array([d["shard"] for d in done])}

    if todo:
        with single_operator_pipeline():
            ds = ray.data.from_items([{"index": i, "shard": json.dumps(s)} for i, s in todo],
                                     override_num_blocks=len(todo))
            ds.map_batches(work, batch_size=1, **stage_requests.ingest(cfg).ray_options()).materialize()
    stats = [storage.read_json(_shard_marker(out_dir, i)) for i in range(len(shards))]
    rejects = [r for s in stats for r in s["rejects"]] + _dedupe(out_dir, stats)
    counts = {"shards": len(shards), "shards_resumed": len(shards) - len(todo),
              "frames": sum(s["frames"] for s in stats), "images": sum(s.get("images", 0) for s in stats),
              "points": sum(s["points"] for s in stats), "parts": sum(len(s["parts"]) for s in stats)}
    print(f"[ingest] selected {counts['frames']} frames, {counts['images']} camera images (data.frame_stride "
          f"{cfg.data.frame_stride}, cameras {', '.join(cfg.data.cameras) or 'all'}, {len(rejects)} rejects)")
    if counts["frames"] == 0:
        where = f"data.root {cfg.data.root}" if cfg.data.root else f"data.source {cfg.data.source}"
        raise InputError(f"{where}: no valid frames in {len(shards)} shards ({len(rejects)} rejects, first: "
                         f"{rejects[0]['reason'] if rejects else 'none'})")
    if cfg.data.source == "synthetic":
        counts["eval_images"] = write_synthetic_eval(cfg, out_dir)
    return StageResult(counts=counts, rejects=rejects)


def write_synthetic_eval(cfg: Config, out_dir: str) -> int:
    """Render the day/night/fog evaluation splits (Cityscapes layout) as parallel Ray tasks."""
    import ray

    from raydseg.data.sources import synthetic

    @ray.remote
    def one(condition: str) -> int:
        return synthetic.write_eval_split(storage.join(out_dir, "eval", condition), condition, cfg.synthetic,
                                          cfg.run.seed)

    task = one.options(**stage_requests.ingest(cfg).ray_options())  # no custom resource locally
    return int(sum(ray.get([task.remote(c) for c in cfg.synthetic.eval_conditions])))
