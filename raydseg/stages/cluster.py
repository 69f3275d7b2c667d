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
from raydseg.clustering.diagnostics import montage_png, purity_metrics
from raydseg.clustering.pseudolabels import class_of_cluster, paint_labels
from raydseg.data.frame_lookup import camera_records, frame_index
from raydseg.data.schema import decode_image, encode_png
from raydseg.pipeline import StageContext, StageResult

NAME = "cluster"
INPUTS: tuple[str, ...] = ("features", "proposals", "ingest")
CONFIG_SECTIONS = ("cluster",)

ASSIGN_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("segment_id", pa.uint16()),
                           ("pseudo_class", pa.uint8())])
PSEUDOLABELS_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("image", pa.binary()),
                                 ("label", pa.binary()), ("segment_ids", pa.binary()), ("gt_semantic", pa.binary())])


def read_descriptors(features_dir: str) -> tuple[list[str], list[pa.Table], np.ndarray]:
    """(part names, per-part key tables (frame_id, camera, segment_id), descriptors (N, D) float32 in part order)."""
    from raydseg.parts import part_names

    names, keys, mats = [], [], []
    for name in part_names(features_dir):
        t = storage.read_table(storage.join(features_dir, name))
        if t.num_rows == 0:
            continue
        flat = np.asarray(t["descriptor"].combine_chunks().flatten(), np.float32)
        mats.append(flat.reshape(t.num_rows, -1))
        keys.append(t.select(["frame_id", "camera", "segment_id"]))
        names.append(name)
    if not mats:
        raise RuntimeError(f"cluster: no descriptors under {features_dir}")
    return names, keys, np.concatenate(mats)


def paint_part(table: pa.Table, assign_dir: str, frames_dir: str, index: dict[str, str],
               ground_class: bool) -> tuple[dict[str, pa.Table], list[dict]]:
    """proposals/segments part -> pseudolabels part (one row per frame x camera)."""
    cams = camera_records(frames_dir, index, table["frame_id"].to_pylist())
    lookup: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for part in sorted({index[f] for f in set(table["frame_id"].to_pylist()) if f in index}):
        path = storage.join(assign_dir, part)
        if not storage.exists(path):
            continue
        for r in storage.read_table(path).to_pylist():
            ids, cls = lookup.setdefault((r["frame_id"], r["camera"]), ([], []))
            ids.append(r["segment_id"])
            cls.append(r["pseudo_class"])
    rows, rejects = [], []
    for row in table.select(["frame_id", "camera", "segment_ids", "ground_px"]).to_pylist():
        key = (row["frame_id"], row["camera"])
        cam = cams.get(key)
        if cam is None:
            rejects.append({"id": "/".join(key), "reason": "cluster: camera image not found in ingest/frames"})
            continue
        seg = decode_image(row["segment_ids"])
        ground = decode_image(row["ground_px"]) if row["ground_px"] else None
        ids, cls = lookup.get(key, ([], []))
        label = paint_labels(seg, np.array(ids, np.int64), np.array(cls, np.int64), ground, ground_class)
        rows.append({"frame_id": key[0], "camera": key[1], "image": cam["image"], "label": encode_png(label),
                     "segment_ids": row["segment_ids"], "gt_semantic": cam.get("gt_semantic")})
    return {"pseudolabels": pa.Table.from_pylist(rows, schema=PSEUDOLABELS_SCHEMA)}, rejects


def _kmeans_actor_args(req: stage_requests.WorkerRequest) -> dict:
    """`kmeans_distributed`'s num_cpus / num_gpus / resources of one shard actor."""
    return {"num_cpus": req.cpus, "num_gpus": req.gpus, "resources": req.custom}


def run(ctx: StageContext) -> StageResult:
    import mlflow

    from raydseg.clustering.kmeans import kmeans_distributed, preprocess
    from raydseg.parts import map_parts

    cfg = ctx.cfg.cluster
    names, keys, x = read_descriptors(ctx.stage_dir("features"))
    xp = preprocess(x, cfg.pca_dim, cfg.whiten, seed=ctx.cfg.run.seed, sample=cfg.seed_sample)
    res = kmeans_distributed(xp, cfg.k, n_actors=max(1, min(cfg.n_actors, len(xp))), n_iter=cfg.n_iter,
                             n_restarts=cfg.n_restarts, seed=ctx.cfg.run.seed, use_faiss=cfg.use_faiss,
                             seed_sample=cfg.seed_sample, tol=cfg.tol,
                             **_kmeans_actor_args(stage_requests.kmeans(ctx.cfg)))
    buf = io.BytesIO()
    np.save(buf, res.centroids)
    storage.write_bytes(storage.join(ctx.out_dir, "centroids.npy"), buf.getvalue())
    classes = class_of_cluster(res.labels, cfg.ground_class)
    assign_dir = storage.join(ctx.out_dir, "assignments")
    start = 0
    for name, k in zip(names, keys):
        part_cls = classes[start:start + k.num_rows]
        start += k.num_rows
        storage.write_table(k.append_column("pseudo_class", pa.array(part_cls.astype(np.uint8), pa.uint8())),
                            storage.join(assign_dir, name))
    frames_dir = storage.join(ctx.stage_dir("ingest"), "frames")
    index = frame_index(frames_dir)
    fn = functools.partial(paint_part, assign_dir=assign_dir, frames_dir=frames_dir, index=index,
                           ground_class=cfg.ground_class)
    parts = map_parts(storage.join(ctx.stage_dir("proposals"), "segments"), ctx.out_dir, fn,
                      **stage_requests.pseudolabels(ctx.cfg).ray_options())
    if mlflow.active_run() is not None:
        for step, v in enumerate(res.inertia_history):  # best restart
            mlflow.log_metric("cluster/inertia", v, step=step)
        for j, n in enumerate(res.counts):
            mlflow.log_metric("cluster/cluster_size", float(n), step=int(class_of_cluster(j, cfg.ground_class)))
        for r, v in enumerate(res.restart_inertia):
            mlflow.log_metric("cluster/restart_inertia", v, step=r)
        if cfg.montage_per_cluster > 0:
            png = montage_png(xp, res, pa.concat_tables(keys), frames_dir, storage.join(ctx.stage_dir("proposals"),
                              "segments"), index, cfg.montage_per_cluster, cfg.montage_px, cfg.ground_class)
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "cluster_montage.png"), "wb") as f:
                    f.write(png)
                mlflow.log_artifact(f.name)
    sizes = res.counts.astype(np.float64)
    metrics = {"inertia": res.inertia, "mean_sq_dist": res.inertia / len(xp), "kmeans_s": res.seconds,
               "size_min": float(sizes.min()), "size_max": float(sizes.max()), "n_splits": float(res.n_splits),
               "n_pseudo_classes": float(cfg.k + int(cfg.ground_class)),
               "shard_peak_rss_gb": max(res.shard_peak_rss_gb, default=0.0),
               **purity_metrics(storage.join(ctx.out_dir, "pseudolabels"), pa.concat_tables(keys), classes,
                                ctx.cfg.run.seed)}
    counts = {"segments": int(len(xp)), "clusters": int(cfg.k),
              "label_images": parts.counts.get("rows_out_pseudolabels", 0),
              "actor_restarts": int(res.n_actor_restarts)}
    return StageResult(counts=counts, metrics=metrics, rejects=parts.rejects)
