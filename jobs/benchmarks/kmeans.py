"""Benchmark: distributed k-means (1 and 2 Ray actors) vs single-process faiss.Kmeans vs scikit-learn KMeans,
the stage's path over parquet parts (actors read their own parts) with its driver's peak memory, plus CPU
feature-extraction throughput of the default backbone.

`python jobs/benchmarks/kmeans.py --out FILE.json [--n 1000000 --d 384 --k 30 --iters 20]`
Baseline for the ratios: faiss.Kmeans (single process); for the driver's memory, the (N, D) float32 matrix
(`dist_driver_over_matrix_ratio`, goal <= 0.5). Keys carry their units (_s seconds, _gb GiB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 L2-normalised rows around k random centres (like ViT descriptors)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d)).astype(np.float32)
    x = c[rng.integers(k, size=n)] + 0.8 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def inertia_of(x: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    return float(index.search(x, 1)[0].astype(np.float64).sum())


def features_throughput(n_images: int = 4, descriptor: str = "crop_cls") -> dict[str, float]:
    import torch

    from raydseg.config import FeaturesConfig
    from raydseg.features.backbone import create_backbone
    from raydseg.features.pooling import segment_descriptors

    cfg = FeaturesConfig()
    torch.set_num_threads(1)
    model = create_backbone(cfg.backbone)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(320, 640, 3), dtype=np.uint8)
    seg = np.zeros((320, 640), np.uint16)
    for s in range(1, 41):  # 40 segments per image
        r, c = rng.integers(0, 280), rng.integers(0, 600)
        seg[r:r + 40, c:c + 40] = s
    ids = np.unique(seg[seg > 0])
    kw = dict(crop_size=cfg.crop_size, batch_size=cfg.batch_size) if descriptor == "crop_cls" else {}
    segment_descriptors(model, img, seg, ids, descriptor, **kw)  # warm-up
    t = time.perf_counter()
    for _ in range(n_images):
        segment_descriptors(model, img, seg, ids, descriptor, **kw)
    dt = time.perf_counter() - t
    return {f"features_{descriptor}_images_per_s": n_images / dt,
            f"features_{descriptor}_segments_per_s": n_images * len(ids) / dt}


def write_parts(x: np.ndarray, out_dir: str, n_parts: int) -> None:
    """x (N, D) as `n_parts` features-layout parquet files (frame_id, camera, segment_id, descriptor)."""
    import pyarrow as pa

    from raydseg import storage
    from raydseg.clustering.kmeans import split_offsets

    for i, (a, b) in enumerate(split_offsets(len(x), n_parts)):
        rows = np.ascontiguousarray(x[a:b]).ravel()
        offsets = pa.array(np.arange(0, len(rows) + 1, x.shape[1], dtype=np.int32))
        t = pa.table({"frame_id": [f"f{i}"] * (b - a), "camera": ["cam"] * (b - a),
                      "segment_id": pa.array(np.arange(b - a) % 65536, pa.uint16()),
                      "descriptor": pa.ListArray.from_arrays(offsets, pa.array(rows))})
        storage.write_table(t, os.path.join(out_dir, f"part-{i:05d}.parquet"))


def driver_only(parts_dir: str, k: int, iters: int) -> None:
    """The measured process: a Ray driver that runs only the stage's k-means over parquet (2 actors); prints
    its own peak RSS (GiB), the inertia and the seconds as JSON."""
    import ray

    from raydseg import storage
    from raydseg.clustering.kmeans import kmeans_distributed
    from raydseg.parts import part_names
    from raydseg.procstats import peak_rss_gb

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    files = [(p, storage.parquet_rows(p)) for p in (os.path.join(parts_dir, n) for n in part_names(parts_dir))]
    t = time.perf_counter()
    r = kmeans_distributed(files, k, n_actors=2, n_iter=iters, n_restarts=1, seed=0, num_cpus=1)
    seconds = time.perf_counter() - t
    ray.shutdown()
    print(json.dumps({"peak_rss_gb": peak_rss_gb(),
                      "inertia": r.inertia, "seconds": seconds, "actor_peak_rss_gb": max(r.shard_peak_rss_gb)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--driver-only", metavar="PARTS_DIR", help=argparse.SUPPRESS)  # the measured child process
    a = ap.parse_args()
    if a.driver_only:
        return driver_only(a.driver_only, a.k, a.iters)

    import faiss
    import ray

    from raydseg.clustering.kmeans import kmeans_distributed
    from raydseg.procstats import child_figures, peak_rss_gb, write_figures

    x = blobs(a.n, a.d, a.k)
    out: dict[str, float] = {"n": a.n, "d": a.d, "k": a.k, "iters": a.iters}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for n_act, key in ((1, "dist_1_actor"), (2, "dist_2_actors")):
        t = time.perf_counter()
        r = kmeans_distributed(x, a.k, n_actors=n_act, n_iter=a.iters, n_restarts=1, seed=0, num_cpus=1)
        out[f"{key}_s"] = time.perf_counter() - t
        out["dist_inertia"] = r.inertia
        out[f"{key}_actor_peak_rss_gb"] = max(r.shard_peak_rss_gb)  # the largest actor process
    t = time.perf_counter()
    km = faiss.Kmeans(a.d, a.k, niter=a.iters, seed=0, max_points_per_centroid=a.n)
    km.train(x)
    out["faiss_s"] = time.perf_counter() - t
    out["faiss_inertia"] = inertia_of(x, km.centroids)
    if not a.skip_sklearn:
        from sklearn.cluster import KMeans

        t = time.perf_counter()
        sk = KMeans(a.k, n_init=1, max_iter=a.iters, tol=0, random_state=0, algorithm="lloyd").fit(x)
        out["sklearn_s"] = time.perf_counter() - t
        out["sklearn_inertia"] = float(sk.inertia_)
    ray.shutdown()
    with tempfile.TemporaryDirectory() as parts_dir:
        write_parts(x, parts_dir, n_parts=32)
        pq_run = child_figures([__file__, "--out", "-", "--driver-only", parts_dir, "--k", str(a.k), "--iters",
                                str(a.iters)])
    out["matrix_gb"] = x.nbytes / 2**30
    out["dist_driver_peak_rss_gb"] = pq_run["peak_rss_gb"]
    out["dist_driver_over_matrix_ratio"] = pq_run["peak_rss_gb"] / out["matrix_gb"]
    out["dist_parquet_2_actors_s"] = pq_run["seconds"]
    out["dist_parquet_actor_peak_rss_gb"] = pq_run["actor_peak_rss_gb"]
    out["dist_parquet_inertia_rel_diff"] = abs(pq_run["inertia"] - out["dist_inertia"]) / out["dist_inertia"]
    out["peak_rss_gb"] = peak_rss_gb()  # this process: all rows + the baselines
    out["shard_gb_2_actors"] = x.nbytes / 2 / 2**30  # the rows each of the 2 actors holds
    out["dist_1_over_faiss_ratio"] = out["dist_1_actor_s"] / out["faiss_s"]
    out["dist_2_over_faiss_ratio"] = out["dist_2_actors_s"] / out["faiss_s"]
    out.update(features_throughput(descriptor="crop_cls"))
    out.update(features_throughput(descriptor="mask_pool"))
    write_figures(out, a.out)


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
