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
from raydseg.config import painted_classes, sky_pseudo_class
from raydseg.data.frame_lookup import camera_records, frame_index
from raydseg.data.schema import decode_image, encode_png
from raydseg.parts import part_names
from raydseg.pipeline import StageContext, StageResult

NAME = "cluster"
INPUTS: tuple[str, ...] = ("features", "proposals", "ingest")
CONFIG_SECTIONS = ("cluster",)

PSEUDOLABELS_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("image", pa.binary()),
                                 ("label", pa.binary()), ("segment_ids", pa.binary()), ("gt_semantic", pa.binary())])


def paint_part(table: pa.Table, assign_dir: str, frames_dir: str, index: dict[str, str],
               ground_class: bool, sky_class: int | None = None) -> tuple[dict[str, pa.Table], list[dict]]:
    """proposals/segments part -> pseudolabels part (one row per frame x camera)."""
    frame_ids = table["frame_id"].to_pylist()
    cams = camera_records(frames_dir, index, frame_ids)
    lookup = read_assignments(assign_dir, [index[f] for f in set(frame_ids) if f in index])
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
        label = paint_labels(seg, ids, cls, ground, ground_class, sky_class)
        rows.append({"frame_id": key[0], "camera": key[1], "image": cam["image"], "label": encode_png(label),
                     "segment_ids": row["segment_ids"], "gt_semantic": cam.get("gt_semantic")})
    return {"pseudolabels": pa.Table.from_pylist(rows, schema=PSEUDOLABELS_SCHEMA)}, rejects


def _kmeans_actor_args(req: stage_requests.WorkerRequest) -> dict:
    """`kmeans_distributed`'s num_cpus / num_gpus / resources of one shard actor."""
    return {"num_cpus": req.cpus, "num_gpus": req.gpus, "resources": req.custom}


def run(ctx: StageContext) -> StageResult:
    import mlflow

    from raydseg.clustering.kmeans import kmeans_distributed
    from raydseg.parts import map_parts

    cfg = ctx.cfg.cluster
    feat_dir = ctx.stage_dir("features")
    files = [(p, storage.parquet_rows(p)) for p in (storage.join(feat_dir, n) for n in part_names(feat_dir))]
    n = sum(r for _, r in files)
    if n == 0:
        raise RuntimeError(f"cluster: no descriptors under {feat_dir}")
    res = kmeans_distributed(files, cfg.k, n_actors=max(1, min(cfg.n_actors, n)), n_iter=cfg.n_iter,
                         n_restarts=cfg.n_restarts, seed=ctx.cfg.run.seed, use_faiss=cfg.use_faiss,
                         pca_dim=cfg.pca_dim, whiten=cfg.whiten, seed_sample=cfg.seed_sample, tol=cfg.tol,
                         nearest=cfg.montage_per_cluster, **_kmeans_actor_args(stage_requests.kmeans(ctx.cfg)))
    buf = io.BytesIO()
    np.save(buf, res.centroids)
    storage.write_bytes(storage.join(ctx.out_dir, "centroids.npy"), buf.getvalue())
    assign_dir = storage.join(ctx.out_dir, "assignments")
    write_assignments(files, class_of_cluster(res.labels, cfg.ground_class), assign_dir)
    frames_dir = storage.join(ctx.stage_dir("ingest"), "frames")
    seg_dir = storage.join(ctx.stage_dir("proposals"), "segments")
    index = frame_index(frames_dir)
    fn = functools.partial(paint_part, assign_dir=assign_dir, frames_dir=frames_dir, index=index,
                           ground_class=cfg.ground_class, sky_class=sky_pseudo_class(ctx.cfg))
    parts = map_parts(seg_dir, ctx.out_dir, fn, **stage_requests.pseudolabels(ctx.cfg).ray_options())
    if mlflow.active_run() is not None:
        for step, v in enumerate(res.inertia_history):  # best restart
            mlflow.log_metric("cluster/inertia", v, step=step)
        for j, c in enumerate(res.counts):
            mlflow.log_metric("cluster/cluster_size", float(c), step=int(class_of_cluster(j, cfg.ground_class)))
        for r, v in enumerate(res.restart_inertia):
            mlflow.log_metric("cluster/restart_inertia", v, step=r)
        if res.nearest:
            keys = keys_at(files, np.concatenate(res.nearest))  # one read of the key columns per part
            bounds = np.cumsum([0, *map(len, res.nearest)])
            png = montage_png([keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])], res.counts, frames_dir, seg_dir,
                              index, cfg.montage_px, cfg.ground_class)
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "cluster_montage.png"), "wb") as f:
                    f.write(png)
                mlflow.log_artifact(f.name)
    sizes = res.counts.astype(np.float64)
    metrics = {"inertia": res.inertia, "mean_sq_dist": res.inertia / n, "kmeans_s": res.seconds,
               "size_min": float(sizes.min()), "size_max": float(sizes.max()), "n_splits": float(res.n_splits),
               "n_pseudo_classes": float(painted_classes(ctx.cfg)),
               "shard_peak_rss_gb": max(res.shard_peak_rss_gb, default=0.0),
               **purity_metrics(storage.join(ctx.out_dir, "pseudolabels"), assign_dir, index, ctx.cfg.run.seed)}
    counts = {"segments": int(n), "clusters": int(cfg.k),
              "label_images": parts.counts.get("rows_out_pseudolabels", 0),
              "actor_restarts": int(res.n_actor_restarts)}
    return StageResult(counts=counts, metrics=metrics, rejects=parts.rejects)
