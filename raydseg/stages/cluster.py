"""Stage `cluster`: distributed k-means over all segment descriptors, then pseudo-label images.

Reads `features/part-*`, `proposals/segments/part-*` and `ingest/frames/part-*`; writes `cluster/centroids.npy`
(k x D float32), `cluster/assignments/part-*` (frame_id, camera, segment_id, pseudo_class) and
`cluster/pseudolabels/part-*` (PSEUDOLABELS_SCHEMA: one row per frame x camera with the camera image, the uint8
pseudo-label PNG (255 = ignore), the segment-id PNG and the ground truth when the frame has it). Logs the inertia
per iteration (metric `cluster/inertia`, step = iteration), cluster sizes (`cluster/cluster_size`, step = class)
and a montage of segment crops per cluster (artifact `cluster_montage.png`) to MLflow.
"""
from __future__ import annotations

import functools
import io
import os
import tempfile

import numpy as np
import pyarrow as pa

from raydseg import stage_requests, storage
from raydseg.clustering.assignments import NO_SEGMENTS, keys_at, read_assignments, write_assignments
from raydseg.clustering.diagnostics import montage_png, purity_metrics
from raydseg.clustering.pseudolabels import class_of_cluster, paint_labels
from raydseg.config import ground_pseudo_classes, painted_classes, patch_size, sky_pseudo_class
from raydseg.data.frame_lookup import camera_records, frame_index
from raydseg.data.schema import decode_image, encode_png
from raydseg.features.ground import GROUND_DIR, ground_cells
from raydseg.parts import part_names
from raydseg.pipeline import StageContext, StageResult

NAME = "cluster"
INPUTS: tuple[str, ...] = ("features", "proposals", "ingest")
CONFIG_SECTIONS = ("cluster",)

PSEUDOLABELS_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("image", pa.binary()),
                                 ("label", pa.binary()), ("segment_ids", pa.binary()), ("gt_semantic", pa.binary())])


def paint_part(table: pa.Table, assign_dir: str, frames_dir: str, index: dict[str, str], n_ground: int,
               sky_class: int | None = None, ground_assign_dir: str = "", patch: int | None = None,
               image_size: int = 0) -> tuple[dict[str, pa.Table], list[dict]]:
    """proposals/segments part -> pseudolabels part (one row per frame x camera). n_ground: ground pseudo-classes
    (`config.ground_pseudo_classes`); with `ground_assign_dir` (the ground patches' classes) each ground pixel takes
    its patch's class, the patches on the token grid of `patch` px at `image_size` (features.image_size)."""
    frame_ids = table["frame_id"].to_pylist()
    cams = camera_records(frames_dir, index, frame_ids)
    parts = [index[f] for f in set(frame_ids) if f in index]
    lookup = read_assignments(assign_dir, parts)
    ground_lookup = read_assignments(ground_assign_dir, parts) if ground_assign_dir else {}
    rows, rejects = [], []
    for row in table.select(["frame_id", "camera", "segment_ids", "ground_px"]).to_pylist():
        key = (row["frame_id"], row["camera"])
        cam = cams.get(key)
        if cam is None:
            rejects.append({"id": "/".join(key), "reason": "cluster: camera image not found in ingest/frames"})
            continue
        seg = decode_image(row["segment_ids"])
        ground = decode_image(row["ground_px"]) if row["ground_px"] else None
        ids, cls = lookup.get(key, NO_SEGMENTS)
        paint: int | np.ndarray | None = 0 if n_ground else None
        if ground_assign_dir and ground is not None:
            paint = paint_labels(ground_cells(ground, seg, patch, image_size), *ground_lookup.get(key, NO_SEGMENTS))
        label = paint_labels(seg, ids, cls, ground, paint, sky_class)
        rows.append({"frame_id": key[0], "camera": key[1], "image": cam["image"], "label": encode_png(label),
                     "segment_ids": row["segment_ids"], "gt_semantic": cam.get("gt_semantic")})
    return {"pseudolabels": pa.Table.from_pylist(rows, schema=PSEUDOLABELS_SCHEMA)}, rejects


def _feature_files(feat_dir: str) -> list[tuple[str, int]]:
    """The descriptor parts of a features folder with their row counts, in part order."""
    return [(p, storage.parquet_rows(p)) for p in (storage.join(feat_dir, n) for n in part_names(feat_dir))]


def _kmeans_actor_args(req: stage_requests.WorkerRequest) -> dict:
    """`kmeans_distributed`'s num_cpus / num_gpus / resources of one shard actor."""
    return {"num_cpus": req.cpus, "num_gpus": req.gpus, "resources": req.custom}


def run(ctx: StageContext) -> StageResult:
    import mlflow

    from raydseg.clustering.kmeans import kmeans_distributed
    from raydseg.parts import map_parts

    cfg = ctx.cfg.cluster
    n_ground = ground_pseudo_classes(ctx.cfg)
    feat_dir = ctx.stage_dir("features")
    files = _feature_files(feat_dir)
    n = sum(r for _, r in files)
    if n == 0:
        raise RuntimeError(f"cluster: no descriptors under {feat_dir}")
    kmeans = functools.partial(kmeans_distributed, n_iter=cfg.n_iter, n_restarts=cfg.n_restarts,
                               seed=ctx.cfg.run.seed, use_faiss=cfg.use_faiss, pca_dim=cfg.pca_dim, whiten=cfg.whiten,
                               seed_sample=cfg.seed_sample, tol=cfg.tol,
                               **_kmeans_actor_args(stage_requests.kmeans(ctx.cfg)))
    res = kmeans(files, cfg.k, n_actors=max(1, min(cfg.n_actors, n)), nearest=cfg.montage_per_cluster)
    buf = io.BytesIO()
    np.save(buf, res.centroids)
    storage.write_bytes(storage.join(ctx.out_dir, "centroids.npy"), buf.getvalue())
    assign_dir = storage.join(ctx.out_dir, "assignments")
    write_assignments(files, class_of_cluster(res.labels, n_ground), assign_dir)
    ground_assign_dir, ground_metrics = "", {}
    if ctx.cfg.features.ground_patches and cfg.ground_class:  # paint the described ground cells only
        ground_files = _feature_files(storage.join(feat_dir, GROUND_DIR))
        n_patches = sum(r for _, r in ground_files)
        if n_patches < cfg.ground_k:
            raise RuntimeError(f"cluster: {n_patches} ground patches under {feat_dir}/{GROUND_DIR}, fewer than "
                               f"cluster.ground_k={cfg.ground_k}")
        ground_labels = np.zeros(n_patches, np.int64)
        if cfg.ground_k > 1:  # their own k-means: ground pseudo-classes 0..ground_k-1
            ground_res = kmeans(ground_files, cfg.ground_k, n_actors=max(1, min(cfg.n_actors, n_patches)))
            ground_labels = ground_res.labels
            ground_metrics = {"ground_size_min": float(ground_res.counts.min()),
                              "ground_size_max": float(ground_res.counts.max())}
        ground_assign_dir = storage.join(ctx.out_dir, "ground_assignments")
        write_assignments(ground_files, ground_labels, ground_assign_dir)
        ground_metrics["ground_patches"] = float(n_patches)
    frames_dir = storage.join(ctx.stage_dir("ingest"), "frames")
    seg_dir = storage.join(ctx.stage_dir("proposals"), "segments")
    index = frame_index(frames_dir)
    fn = functools.partial(paint_part, assign_dir=assign_dir, frames_dir=frames_dir, index=index, n_ground=n_ground,
                           sky_class=sky_pseudo_class(ctx.cfg), ground_assign_dir=ground_assign_dir,
                           patch=patch_size(ctx.cfg.features.backbone), image_size=ctx.cfg.features.image_size)
    parts = map_parts(seg_dir, ctx.out_dir, fn, **stage_requests.pseudolabels(ctx.cfg).ray_options())
    if mlflow.active_run() is not None:
        for step, v in enumerate(res.inertia_history):  # best restart
            mlflow.log_metric("cluster/inertia", v, step=step)
        for j, c in enumerate(res.counts):
            mlflow.log_metric("cluster/cluster_size", float(c), step=int(class_of_cluster(j, n_ground)))
        for r, v in enumerate(res.restart_inertia):
            mlflow.log_metric("cluster/restart_inertia", v, step=r)
        if res.nearest:
            keys = keys_at(files, np.concatenate(res.nearest))  # one read of the key columns per part
            bounds = np.cumsum([0, *map(len, res.nearest)])
            png = montage_png([keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])], res.counts, frames_dir, seg_dir,
                              index, cfg.montage_px, n_ground)
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "cluster_montage.png"), "wb") as f:
                    f.write(png)
                mlflow.log_artifact(f.name)
    sizes = res.counts.astype(np.float64)
    metrics = {"inertia": res.inertia, "mean_sq_dist": res.inertia / n, "kmeans_s": res.seconds,
               "size_min": float(sizes.min()), "size_max": float(sizes.max()), "n_splits": float(res.n_splits),
               "n_pseudo_classes": float(painted_classes(ctx.cfg)),
               "shard_peak_rss_gb": max(res.shard_peak_rss_gb, default=0.0), **ground_metrics,
               **purity_metrics(storage.join(ctx.out_dir, "pseudolabels"), assign_dir, index, ctx.cfg.run.seed)}
    counts = {"segments": int(n), "clusters": int(cfg.k),
              "label_images": parts.counts.get("rows_out_pseudolabels", 0),
              "actor_restarts": int(res.n_actor_restarts)}
    return StageResult(counts=counts, metrics=metrics, rejects=parts.rejects)
