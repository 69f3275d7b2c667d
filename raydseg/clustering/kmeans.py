"""Distributed k-means (Lloyd) on Ray actors that each hold one shard of the descriptors.

Per iteration the driver broadcasts the centroids; every shard returns per-centroid float64 sums, counts and
squared-error sums; the driver reduces them in a fixed order (shard 0, 1, ...). Seeding is k-means++ on a
deterministic global sample (rows chosen by global row index from the seed), so for a fixed seed the result does
not depend on the number of shards (up to float rounding of the per-shard partial sums). Empty clusters are
re-seeded by splitting the cluster with the most points (among those with a non-zero spread). A dead actor
(RayActorError) is recreated from its shard and the iteration retried.

`kmeans_distributed` of features parquet files is the stage's path: every actor reads its own files, so the driver
never holds the (N, D) matrix, only the seeding sample, the centroids and the (N,) labels. Given an in-memory
matrix, it keeps one object per shard in the object store.

The same algorithm runs without Ray on in-process shards (`kmeans_local`), with numpy distances when
`use_faiss=False`: the pure reference path used by the tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


RESTART_MARGIN = 1e-6  # relative inertia gain a later restart needs to replace the best one so far

Transform = tuple[np.ndarray, np.ndarray]  # (mean (D,), projection (D, d)) of fit_pca: rows -> (x - mean) @ proj


@dataclass
class KMeansResult:
    """centroids (k, D) float32; labels (N,) int64 in global row order; inertia = sum of squared distances."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    counts: np.ndarray  # (k,) int64
    inertia_history: list[float] = field(default_factory=list)  # per iteration of the best restart
    restart_inertia: list[float] = field(default_factory=list)  # final inertia of every restart
    n_splits: int = 0  # empty clusters re-seeded (best restart)
    n_actor_restarts: int = 0  # shard actors Ray restarted after a failure (changed process)
    seconds: float = 0.0
    shard_peak_rss_gb: list[float] = field(default_factory=list)  # peak RSS of each shard's process (GiB)
    nearest: list[np.ndarray] = field(default_factory=list)  # per centroid, global indices of its nearest rows


SUM_CHUNK = 4096  # rows per float32 partial sum in Shard.step


def read_rows(files: Sequence[tuple[str, int]]) -> np.ndarray:
    """Descriptors (n, D) float32 of features parquet files [(path, row count)], in file and row order (only
    DESCRIPTOR_COLUMN), copied file by file into one preallocated matrix: the peak is the matrix plus one file."""
    from raydseg import storage
    from raydseg.features.table import DESCRIPTOR_COLUMN

    out, start = None, 0
    for p, m in files:
        if m == 0:
            continue
        col = storage.read_table(p, columns=[DESCRIPTOR_COLUMN])[DESCRIPTOR_COLUMN].combine_chunks()
        block = np.asarray(col.flatten(), np.float32).reshape(m, -1)
        if out is None:
            out = np.empty((sum(r for _, r in files), block.shape[1]), np.float32)
        out[start:start + m] = block
        start += m
        del col, block
    if out is None:
        raise ValueError(f"k-means: no rows in {list(files)}")
    return out


class Shard:
    """One shard of rows: assignment (faiss IndexFlatL2, GPU index when asked and available, or numpy) and
    per-centroid statistics. `x`: (n, D) float32 rows with global indices offset .. offset + n - 1, or the features
    parquet files [(path, rows)] that hold them (read by the shard itself). Calls go through `run`, which brings the
    transform (see `apply_preprocess`) with every call, so that a shard rebuilt from its constructor arguments after
    a failure (Ray's actor restart) answers like the one it replaces."""

    def __init__(self, x: np.ndarray | Sequence[tuple[str, int]], offset: int, use_faiss: bool = True,
                 use_gpu: bool = False):
        x = x if isinstance(x, np.ndarray) else read_rows(x)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.transformed = False
        self.offset = int(offset)
        self.use_faiss = use_faiss
        self.use_gpu = use_gpu
        self._gpu_res: Any = None  # one faiss StandardGpuResources per shard (actor), made on first use
        self._index: Any = None  # the faiss index of the centroids, reset and refilled on every assign call

    def size(self) -> int:
        return int(self.x.shape[0])

    def run(self, method: str, transform: Transform | None, *args: Any) -> Any:
        """`method(*args)` on the rows under `transform`: the rows are replaced by `apply_preprocess(rows,
        transform)` on the first call that brings one (a fit has one transform, fitted before its first Lloyd step)."""
        if transform is not None and not self.transformed:
            self.x = apply_preprocess(self.x, transform)
            self.transformed = True
        return getattr(self, method)(*args)

    def rows(self, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows among `global_idx` (sorted global row indices) that this shard holds: (indices, rows (m, D))."""
        g = np.asarray(global_idx, np.int64)
        sel = g[(g >= self.offset) & (g < self.offset + self.size())]
        return sel, self.x[sel - self.offset]

    def on_gpu(self) -> bool:
        """True when assignments run on a faiss GPU index (asked for, faiss has GPU support and sees a GPU)."""
        if not (self.use_faiss and self.use_gpu):
            return False
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

    def centroid_index(self, c: np.ndarray) -> Any:
        """The shard's faiss flat L2 index holding exactly the centroids `c` (k, D) float32.

        The index (and, on GPU, its StandardGpuResources: scratch memory and CUDA streams) is built once per shard
        and reused by every Lloyd iteration and restart: `reset()` then `add(c)`; it is rebuilt only when the
        dimension changes.
        """
        import faiss

        d = int(c.shape[1])
        if self._index is None or self._index.d != d:
            if self.on_gpu():
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._index = faiss.GpuIndexFlatL2(self._gpu_res, d)
            else:
                self._index = faiss.IndexFlatL2(d)
        self._index.reset()
        self._index.add(c)
        return self._index

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every row: (labels (n,) int64, squared distances (n,) float64)."""
        c = np.ascontiguousarray(centroids, dtype=np.float32)
        if self.use_faiss:
            d, i = self.centroid_index(c).search(self.x, 1)
            return i[:, 0].astype(np.int64), np.maximum(d[:, 0], 0).astype(np.float64)
        labels = np.empty(self.size(), np.int64)
        dists = np.empty(self.size(), np.float64)
        cn = (c.astype(np.float64) ** 2).sum(1)
        for s in range(0, self.size(), 8192):  # numpy reference: exact float64 distances, chunked
            xb = self.x[s:s + 8192].astype(np.float64)
            d = (xb ** 2).sum(1)[:, None] - 2 * xb @ c.T.astype(np.float64) + cn[None]
            labels[s:s + 8192] = d.argmin(1)
            dists[s:s + 8192] = np.maximum(d[np.arange(len(xb)), labels[s:s + 8192]], 0)
        return labels, dists

    def step(self, centroids: np.ndarray) -> dict[str, np.ndarray]:
        """One Lloyd statistics pass: sums (k, D) float64, counts (k,) int64, sse (k,) float64 per centroid."""
        k = centroids.shape[0]
        labels, dists = self.assign(centroids)
        counts = np.bincount(labels, minlength=k).astype(np.int64)
        sums = np.zeros((k, self.x.shape[1]), np.float64)
        # per-cluster sums as one-hot (k, chunk) @ rows (chunk, D) products: float32 within a chunk of
        # SUM_CHUNK rows, float64 across chunks (2x faster than sorting the rows by label; relative error ~1e-7)
        onehot = np.zeros((k, SUM_CHUNK), np.float32)
        for a in range(0, self.size(), SUM_CHUNK):
            lab = labels[a:a + SUM_CHUNK]
            cols = np.arange(len(lab))
            onehot[lab, cols] = 1.0
            sums += onehot[:, :len(lab)] @ self.x[a:a + SUM_CHUNK]
            onehot[lab, cols] = 0.0
        sse = np.bincount(labels, weights=dists, minlength=k)
        return {"sums": sums, "counts": counts, "sse": sse}

    def min_sq_dist(self, centroids: np.ndarray) -> np.ndarray:
        return self.assign(centroids)[1]

    def labels(self, centroids: np.ndarray) -> np.ndarray:
        return self.assign(centroids)[0]

    def nearest(self, centroids: np.ndarray, m: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per centroid, its `m` nearest member rows of this shard: [(global indices, squared distances)] x k,
        nearest first (ties by index)."""
        labels, d2 = self.assign(centroids)
        out = []
        for j in range(len(centroids)):
            members = np.nonzero(labels == j)[0]
            pick = members[np.argsort(d2[members], kind="stable")[:m]]
            out.append((pick + self.offset, d2[pick]))
        return out

    def pid(self) -> int:
        """The process holding this shard: a changed pid means Ray restarted the actor."""
        import os

        return os.getpid()

    def peak_rss_gb(self) -> float:
        """Peak resident memory of the process holding this shard (GiB)."""
        from raydseg.procstats import peak_rss_gb

        return peak_rss_gb()


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on rows x (n, D) float -> (k, D) float64 centroids. Raises ValueError when x has fewer
    than k distinct rows."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {n}")
    xx = (x ** 2).sum(1)

    def sq_dist(idx: np.ndarray) -> np.ndarray:
        """(n, len(idx)) squared distances to rows idx in one matmul; rounding noise (duplicates of a row) -> 0."""
        c = x[idx]
        cc = (c ** 2).sum(1)[None]
        d = xx[:, None] - 2.0 * (x @ c.T) + cc
        d[d <= 1e-10 * (xx[:, None] + cc)] = 0.0
        return d

    first = rng.integers(n)
    centers = [x[first]]
    d2 = sq_dist(np.array([first]))[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            raise ValueError(f"k-means: the data (or its seeding sample) has fewer than k={k} distinct rows")
        # 2 + log(k) candidates, keep the one that lowers the potential most (greedy k-means++, as scikit-learn)
        cand = np.searchsorted(np.cumsum(d2), rng.random(2 + int(np.log(k))) * total).clip(0, n - 1)
        nd2 = np.minimum(d2[:, None], sq_dist(cand))
        best = int(np.argmin(nd2.sum(0)))
        centers.append(x[cand[best]])
        d2 = nd2[:, best]
    return np.stack(centers)


def seed_sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Deterministic global sample of row indices (sorted), independent of how the rows are sharded."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def split_offsets(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges of n rows over n_shards shards."""
    bounds = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(n_shards)]


class _Backend:
    """Calls a method on every shard and returns the results in shard order."""

    transform: Transform | None = None  # sent with every call (Shard.run)

    def call(self, method: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    def set_transform(self, transform: Transform | None) -> None:
        self.transform = transform

    def restarts(self) -> int:
        """Shards rebuilt after a failure so far."""
        return 0

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The rows at sorted global indices `idx`, gathered from the shards in index order: (len(idx), D)."""
        parts = self.call("rows", idx)
        order = np.concatenate([p[0] for p in parts])
        return np.concatenate([p[1] for p in parts])[np.argsort(order, kind="stable")]

    def nearest(self, centroids: np.ndarray, m: int) -> list[np.ndarray]:
        """Per centroid, the global indices of its `m` nearest rows over all shards (nearest first, ties by
        index): what the cluster montage shows, without the driver holding the rows."""
        per_shard = self.call("nearest", np.ascontiguousarray(centroids, np.float32), m)
        out = []
        for j in range(len(centroids)):
            idx = np.concatenate([s[j][0] for s in per_shard])
            d2 = np.concatenate([s[j][1] for s in per_shard])
            out.append(idx[np.lexsort((idx, d2))[:m]])
        return out


class LocalBackend(_Backend):
    def __init__(self, shards: list[Shard]):
        self.shards = shards

    def call(self, method: str, *args: Any) -> list[Any]:
        return [s.run(method, self.transform, *args) for s in self.shards]


class RayBackend(_Backend):
    """Shard actors (one per shard). Ray's own retries cover a lost shard: the actor is restarted from its
    constructor arguments (`max_restarts`; an object-store ref of its rows, or its parquet files, which it rereads)
    and the call retried on it (`max_task_retries`); the transform comes with every call (`Shard.run`)."""

    def __init__(self, sources: list[tuple[Any, int]], use_faiss: bool = True,
                 num_gpus: float = 0.0, num_cpus: float = 1.0, resources: dict[str, float] | None = None):
        """sources: per shard, (rows (n, D) float32 or features parquet files [(path, rows)], global index of its
        first row), as `_shard_sources` makes them."""
        import ray

        from raydseg.ray_map import RETRIES

        self.ray = ray
        opts = dict(num_cpus=num_cpus, num_gpus=num_gpus or None, resources=resources or None)
        cls = ray.remote(Shard).options(max_restarts=RETRIES, max_task_retries=RETRIES,
                                        **{k: v for k, v in opts.items() if v is not None})
        # the refs of the rows are kept here for the whole fit: a restarted actor reads its rows from them again
        self.sources = [(ray.put(np.ascontiguousarray(x, np.float32)) if isinstance(x, np.ndarray) else x, off)
                        for x, off in sources]
        self.actors = [cls.remote(src, off, use_faiss, num_gpus > 0) for src, off in self.sources]
        self.pids = ray.get([a.pid.remote() for a in self.actors])
        self._transform_ref = ray.put(None)

    def set_transform(self, transform: Transform | None) -> None:
        super().set_transform(transform)
        self._transform_ref = self.ray.put(transform)

    def call(self, method: str, *args: Any) -> list[Any]:
        args_refs = [self.ray.put(a) for a in args]
        return self.ray.get([a.run.remote(method, self._transform_ref, *args_refs) for a in self.actors])

    def restarts(self) -> int:
        """Shards whose process changed since they started (Ray restarted the actor)."""
        return sum(a != b for a, b in zip(self.pids, self.ray.get([a.pid.remote() for a in self.actors])))

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def _split_empty(centroids: np.ndarray, counts: np.ndarray, sse: np.ndarray, rng: np.random.Generator,
                 eps: float = 1e-3) -> tuple[np.ndarray, int]:
    """Re-seed every empty centroid by splitting the most populated cluster that has a non-zero spread: the two
    halves are its centroid -/+ a small random offset (eps x its RMS radius). Returns (centroids, n_split)."""
    c = centroids.copy()
    counts = counts.astype(np.float64).copy()
    sse = sse.astype(np.float64).copy()
    n_split = 0
    for j in np.nonzero(counts == 0)[0]:
        ok = np.nonzero(sse > 0)[0]
        if len(ok) == 0:
            raise ValueError("k-means: cannot split an empty cluster, every cluster has zero spread "
                             "(the data has fewer distinct rows than k)")
        big = ok[np.argmax(counts[ok])]
        direction = rng.standard_normal(c.shape[1])
        direction /= np.linalg.norm(direction) + 1e-30
        delta = eps * np.sqrt(sse[big] / counts[big]) * direction
        c[j] = c[big] + delta
        c[big] = c[big] - delta
        counts[big] /= 2
        counts[j] = counts[big]
        sse[big] /= 2
        sse[j] = sse[big]
        n_split += 1
    return c, n_split


def _reduce(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum per-shard statistics in shard order (float64)."""
    out = {k: stats[0][k].copy() for k in stats[0]}
    for s in stats[1:]:
        for k in out:
            out[k] = out[k] + s[k]
    return out


def _run(backend: _Backend, n: int, k: int, n_iter: int, n_restarts: int, seed: int, seed_sample: int,
         tol: float, init: np.ndarray | None, on_iteration: Callable[[int, int, float], None] | None,
         max_extra_iter: int) -> KMeansResult:
    t0 = time.perf_counter()
    best: KMeansResult | None = None
    restart_inertia = []
    if init is None:
        sample = backend.rows(seed_sample_indices(n, min(n, max(seed_sample, k)), seed))
    for r in range(n_restarts if init is None else 1):
        rng = np.random.default_rng([seed, r])
        c = np.asarray(init, np.float64).copy() if init is not None else kmeans_pp(sample, k, rng)
        history: list[float] = []
        n_split = 0
        it = 0
        prev = np.inf
        while True:
            stats = _reduce(backend.call("step", c.astype(np.float32)))
            inertia = float(stats["sse"].sum())
            history.append(inertia)
            if on_iteration is not None:
                on_iteration(r, it, inertia)
            empty = stats["counts"] == 0
            done_iters = it + 1 >= n_iter or (tol > 0 and prev - inertia <= tol * max(inertia, 1e-30))
            if done_iters and not empty.any():
                # `c` produced these stats: labels/inertia are consistent with the returned centroids
                break
            if it + 1 >= n_iter + max_extra_iter:
                raise RuntimeError(f"k-means: clusters still empty after {it + 1} iterations")
            prev = inertia
            new = c.copy()
            nz = ~empty
            new[nz] = stats["sums"][nz] / stats["counts"][nz, None]
            if empty.any():
                new, ns = _split_empty(new, stats["counts"], stats["sse"], rng)
                n_split += ns
            c = new
            it += 1
        restart_inertia.append(inertia)
        # a later restart wins only by more than float rounding (RESTART_MARGIN): restarts that reach the same
        # optimum (with other centroid orders) must not be told apart by how the shards summed their rows
        if best is None or inertia < best.inertia * (1 - RESTART_MARGIN):
            best = KMeansResult(centroids=c.astype(np.float32), labels=np.zeros(0, np.int64), inertia=inertia,
                                counts=stats["counts"].astype(np.int64), inertia_history=history, n_splits=n_split)
    assert best is not None
    best.labels = np.concatenate(backend.call("labels", best.centroids))
    best.restart_inertia = restart_inertia
    best.n_actor_restarts = backend.restarts()
    best.seconds = time.perf_counter() - t0
    return best


def kmeans_local(x: np.ndarray, k: int, *, n_iter: int = 20, n_restarts: int = 1, seed: int = 0,
                 n_shards: int = 1, use_faiss: bool = False, use_gpu: bool = False, seed_sample: int = 20_000,
                 tol: float = 0.0,
                 init: np.ndarray | None = None, on_iteration: Callable[[int, int, float], None] | None = None,
                 max_extra_iter: int = 20) -> KMeansResult:
    """In-process k-means of x (N, D) on `n_shards` contiguous shards (numpy distances unless use_faiss).

    Same algorithm and result as `kmeans_distributed`; `n_iter` Lloyd iterations per restart (fewer when the
    relative inertia decrease drops below `tol` > 0), then up to `max_extra_iter` more while a cluster is empty.
    `use_gpu` (with use_faiss): faiss GPU indexes, as the shard actors of `kmeans_distributed(num_gpus > 0)` use.
    """
    shards = [Shard(x[a:b], a, use_faiss=use_faiss, use_gpu=use_gpu) for a, b in split_offsets(len(x), n_shards)]
    return _run(LocalBackend(shards), len(x), k, n_iter, n_restarts, seed, seed_sample, tol, init, on_iteration,
                max_extra_iter)


def split_parts(rows: Sequence[int], n_shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of files with `rows` rows each over at most n_shards shards: each cut falls
    at the file boundary nearest to an even split of the rows; ranges without rows are dropped."""
    ends = np.cumsum(np.asarray(rows, np.int64))
    cuts = set()
    for t in np.linspace(0, ends[-1], n_shards + 1)[1:-1]:
        i = int(np.searchsorted(ends, t))  # the first file that ends at or after t: cut before or after it
        cuts.add(i if t - (ends[i - 1] if i else 0) < ends[i] - t else i + 1)
    bounds = [0, *sorted(cuts - {0, len(rows)}), len(rows)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if ends[b - 1] > (ends[a - 1] if a else 0)]


Source = np.ndarray | Sequence[tuple[str, int]]  # rows (N, D) float32, or features parquet files [(path, rows)]


def _shard_sources(source: Source, n_shards: int) -> tuple[list[tuple[Any, int]], int]:
    """([(a shard's rows or its parquet files, its first global row)], N): contiguous rows of an in-memory
    matrix, or contiguous runs of files (`split_parts`)."""
    if isinstance(source, np.ndarray):
        return [(source[a:b], a) for a, b in split_offsets(len(source), n_shards)], len(source)
    rows = [r for _, r in source]
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    return ([([(p, r) for p, r in source[a:b] if r > 0], int(starts[a])) for a, b in split_parts(rows, n_shards)],
            int(starts[-1]))


def kmeans_distributed(source: Source, k: int, *, n_actors: int = 2, n_iter: int = 20, n_restarts: int = 1,
                       seed: int = 0, use_faiss: bool = True, num_gpus: float = 0.0, num_cpus: float = 1.0,
                       resources: dict[str, float] | None = None, pca_dim: int = 0, whiten: bool = False,
                       seed_sample: int = 20_000, tol: float = 0.0, init: np.ndarray | None = None,
                       on_iteration: Callable[[int, int, float], None] | None = None, max_extra_iter: int = 20,
                       nearest: int = 0) -> KMeansResult:
    """k-means over at most `n_actors` Ray actors, each holding one contiguous shard of `source`: an (N, D)
    float32 matrix (one object-store object per shard), or features parquet files [(path, row count)] in file and
    row order, which each actor reads itself (the stage's path: the driver never holds the matrix).

    `pca_dim` / `whiten`: `preprocess`, fitted on the seeding sample and applied by the shards. `nearest` > 0: also
    each cluster's `nearest` closest rows (KMeansResult.nearest, the montage's picks). `on_iteration(restart,
    iteration, inertia)` is called in the driver after every iteration (MLflow logging, progress).
    """
    sources, n = _shard_sources(source, n_actors)
    if n < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {n}")
    backend = RayBackend(sources, use_faiss=use_faiss, num_gpus=num_gpus, num_cpus=num_cpus, resources=resources)
    try:
        if pca_dim > 0 or whiten:
            backend.set_transform(fit_preprocess(backend.rows(seed_sample_indices(n, seed_sample, seed)),
                                                 pca_dim, whiten))
        result = _run(backend, n, k, n_iter, n_restarts, seed, seed_sample, tol, init, on_iteration, max_extra_iter)
        if nearest > 0:
            result.nearest = backend.nearest(result.centroids, nearest)
        result.shard_peak_rss_gb = backend.call("peak_rss_gb")
        return result
    finally:
        backend.shutdown()


def fit_pca(x: np.ndarray, dim: int, whiten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """PCA of x (n, D): (mean (D,), projection (D, dim)); with `whiten` the projection scales every component to
    unit variance. Apply with `(x - mean) @ proj`."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = vt[:dim].T
    if whiten:
        proj = proj / (s[:dim] / np.sqrt(max(len(x) - 1, 1)) + 1e-8)
    return mean, proj


def fit_preprocess(sample: np.ndarray, pca_dim: int = 0, whiten: bool = False) -> Transform | None:
    """The PCA (pca_dim > 0) / whitening transform fitted on `sample` (n, D), or None when both are off."""
    if pca_dim <= 0 and not whiten:
        return None
    return fit_pca(sample, pca_dim if pca_dim > 0 else sample.shape[1], whiten)


def apply_preprocess(x: np.ndarray, transform: Transform | None) -> np.ndarray:
    """(x - mean) @ proj with L2-normalised rows, float32 (n, d); x unchanged (as float32) for transform None."""
    if transform is None:
        return np.asarray(x, np.float32)
    mean, proj = transform
    y = (np.asarray(x, np.float64) - mean) @ proj
    y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-12
    return y.astype(np.float32)


def preprocess(x: np.ndarray, pca_dim: int = 0, whiten: bool = False, seed: int = 0,
               sample: int = 100_000) -> np.ndarray:
    """Optional PCA (pca_dim > 0) / whitening fitted on a deterministic sample, then L2-normalised rows.
    With pca_dim = 0 and whiten off (paper: "no pre-processing") x is returned unchanged."""
    return apply_preprocess(x, fit_preprocess(x[seed_sample_indices(len(x), sample, seed)], pca_dim, whiten))
