"""Stage `ingest`: read a Frame source shard by shard as Ray tasks, validate, write Frame part files.

Each shard (a sequence / drive / scene / parquet file) becomes `frames/part-SSSSS-CCC.parquet` chunks of
`data.frames_per_part` frames (raydseg.data.shards); a shard marker in `_shards/` is written after its chunks, so a
rerun resumes with the unfinished shards only. The markers are `raydseg.parts.DoneMarkers`, as for parts; the unit is
the shard because a shard yields zero or more parts, known only once it is read. Bad frames go to the rejects with
their reason; the stage goes on. The synthetic source also writes its Cityscapes-layout evaluation splits to
`eval/<condition>/`.
"""
from __future__ import annotations

from raydseg import stage_requests, storage
from raydseg.config import Config
from raydseg.data.shards import drop_duplicate_frames, list_shards, write_shard
from raydseg.errors import InputError
from raydseg.parts import DoneMarkers
from raydseg.pipeline import StageContext, StageResult

NAME = "ingest"
INPUTS: tuple[str, ...] = ()
CONFIG_SECTIONS = ("data", "synthetic")


def _markers(out_dir: str) -> DoneMarkers:
    return DoneMarkers(out_dir, "_shards")  # shard i: `_shards/<i:05d>.json`


def ingest_shard(index: int, shard: dict, cfg: Config, out_dir: str) -> dict:
    """Write one shard's Frame parts, then its marker (last: the shard counts as done only now); returns its stats."""
    stats = write_shard(index, shard, cfg, out_dir)
    _markers(out_dir).mark(f"{index:05d}", stats)
    return stats


def run(ctx: StageContext) -> StageResult:
    from raydseg.ray_map import map_tasks

    cfg, out_dir = ctx.cfg, ctx.out_dir
    shards = list_shards(cfg)
    markers = _markers(out_dir)
    todo = [(i, s, cfg, out_dir) for i, s in enumerate(shards) if not markers.done(f"{i:05d}")]
    for _ in map_tasks(ingest_shard, todo, stage_requests.ingest(cfg).ray_options()):
        pass  # a shard's stats are in its marker, read below with the resumed shards'
    stats = [markers.read(f"{i:05d}") for i in range(len(shards))]
    rejects = [r for s in stats for r in s["rejects"]] + drop_duplicate_frames(out_dir, stats)
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
