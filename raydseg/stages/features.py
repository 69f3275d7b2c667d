"""Stage `features`: one L2-normalised ViT descriptor per projected segment (Ray actor pool, model loaded once
per actor).

Reads `proposals/segments/part-*` and the camera images of `ingest/frames/part-*`; writes `features/part-*.parquet`
(FEATURES_SCHEMA: frame_id, camera, segment_id, descriptor list<float32>) and `features/stats/part-*` (timing);
with `features.ground_patches` also `features/ground/part-*` (the same schema, segment_id = the ground patch's
1-based token-grid cell, raydseg.features.ground). Segments with fewer than `features.min_pixels` pixels get no
descriptor (they stay unlabelled).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydseg import stage_requests, storage
from raydseg.config import config_from_dict, patch_size
from raydseg.data.frame_lookup import camera_records, frame_index
from raydseg.data.schema import decode_image
from raydseg.features.ground import GROUND_DIR, described_cells, ground_cells
from raydseg.features.table import descriptors_table
from raydseg.pipeline import StageContext, StageResult

NAME = "features"
INPUTS: tuple[str, ...] = ("proposals", "ingest")
CONFIG_SECTIONS = ("features",)
OUTPUT_VERSION = 1  # 1: a weights file's inputs are normalised with its own mean / std (backbone.file_input_stats)

STATS_SCHEMA = pa.schema([("seconds", pa.float64()), ("images", pa.int64()), ("segments", pa.int64()),
                          ("ground_patches", pa.int64())])


class FeatureExtractor:
    """Actor-pool callable: builds the backbone once, then maps proposals/segments parts to descriptor tables."""

    def __init__(self, cfg_dict: dict, frames_dir: str, index: dict[str, str], seed: int = 0):
        import torch

        from raydseg.features.backbone import create_backbone

        self.cfg = config_from_dict({"features": cfg_dict}).features
        torch.set_num_threads(max(1, self.cfg.torch_threads))
        self.device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else None
        self.model = create_backbone(self.cfg.backbone, self.cfg.weights, seed=seed).to(self.device)
        self.patch = patch_size(self.cfg.backbone)  # the ground cells' grid, as the cluster stage paints it
        self.frames_dir, self.index = frames_dir, index

    def __call__(self, table: pa.Table) -> tuple[dict[str, pa.Table], list[dict]]:
        from raydseg.features.pooling import CROP_DESCRIPTORS, ground_descriptors, segment_descriptors

        t0 = time.perf_counter()
        cams = camera_records(self.frames_dir, self.index, table["frame_id"].to_pylist())
        out: list[tuple[str, str, int, np.ndarray]] = []
        ground_out: list[tuple[str, str, int, np.ndarray]] = []
        rejects, n_images = [], 0
        kw = dict(device=self.device, dtype=self.dtype)
        for row in table.select(["frame_id", "camera", "segment_ids", "seg_id", "seg_n_pixels",
                                 "ground_px"]).to_pylist():
            fid, cam = row["frame_id"], row["camera"]
            rec = cams.get((fid, cam))
            if rec is None:
                rejects.append({"id": f"{fid}/{cam}", "reason": "features: camera image not found in ingest/frames"})
                continue
            ids = np.array([i for i, n in zip(row["seg_id"], row["seg_n_pixels"]) if n >= self.cfg.min_pixels],
                           np.int64)
            seg = decode_image(row["segment_ids"])
            ids = ids[np.isin(ids, seg)] if len(ids) else ids
            cells = np.zeros(0, np.int64)
            if self.cfg.ground_patches and row["ground_px"]:
                cell_img = ground_cells(decode_image(row["ground_px"]), seg, self.patch, self.cfg.image_size)
                cells = described_cells(cell_img, self.cfg.min_pixels)
            n_images += 1
            if len(ids) == 0 and len(cells) == 0:
                continue
            image = decode_image(rec["image"])
            if len(ids):
                if self.cfg.descriptor in CROP_DESCRIPTORS:
                    how = dict(crop_size=self.cfg.crop_size, batch_size=self.cfg.batch_size, pad=self.cfg.crop_pad)
                else:
                    how = dict(size=self.cfg.image_size)
                desc = segment_descriptors(self.model, image, seg, ids, self.cfg.descriptor, **kw, **how)
                out += [(fid, cam, int(i), d) for i, d in zip(ids, desc)]
            if len(cells):
                desc = ground_descriptors(self.model, image, cell_img, cells, size=self.cfg.image_size, **kw)
                ground_out += [(fid, cam, int(i), d) for i, d in zip(cells, desc)]
        stats = pa.Table.from_pylist([{"seconds": time.perf_counter() - t0, "images": n_images,
                                       "segments": len(out), "ground_patches": len(ground_out)}],
                                     schema=STATS_SCHEMA)
        tables = {"": descriptors_table(out), "stats": stats}
        if self.cfg.ground_patches:
            tables[GROUND_DIR] = descriptors_table(ground_out)
        return tables, rejects


def run(ctx: StageContext) -> StageResult:
    from raydseg.parts import map_parts, part_names

    cfg = ctx.cfg.features
    frames_dir = storage.join(ctx.stage_dir("ingest"), "frames")
    t0 = time.perf_counter()
    index = frame_index(frames_dir)
    res = map_parts(storage.join(ctx.stage_dir("proposals"), "segments"), ctx.out_dir, FeatureExtractor,
                    actor_pool=(1, max(1, cfg.num_actors)), **stage_requests.features(ctx.cfg).ray_options(),
                    fn_constructor_kwargs=dict(cfg_dict=ctx.cfg.to_dict()["features"], frames_dir=frames_dir,
                                               index=index, seed=ctx.cfg.run.seed))
    wall = time.perf_counter() - t0
    stats_dir = storage.join(ctx.out_dir, "stats")
    st = pa.concat_tables([storage.read_table(storage.join(stats_dir, n)) for n in part_names(stats_dir)])
    images, segments = int(pc.sum(st["images"]).as_py() or 0), int(pc.sum(st["segments"]).as_py() or 0)
    ground = int(pc.sum(st["ground_patches"]).as_py() or 0)
    busy = float(pc.sum(st["seconds"]).as_py() or 0.0)
    if segments == 0:
        raise RuntimeError(f"features: no segment descriptors ({len(res.rejects)} rejects, first: {res.rejects[:1]})")
    # logged by the pipeline as features/<name>; wall-clock includes actor start-up and the model build
    metrics = {"images_per_s": images / wall, "segments_per_s": segments / wall,
               "actor_images_per_s": images / max(busy, 1e-9), "actor_segments_per_s": segments / max(busy, 1e-9),
               "segments_per_image": segments / max(images, 1)}
    counts = {"images": images, "segments": segments, "parts": res.counts.get("parts", 0),
              "parts_resumed": res.counts.get("parts_resumed", 0), "ground_patches": ground}
    return StageResult(counts=counts, metrics=metrics, rejects=res.rejects)
