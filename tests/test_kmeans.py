"""Distributed k-means: planted clusters, agreement with faiss, actor-count invariance, empty clusters, lost actors."""
from __future__ import annotations

import numpy as np
import pytest

from raydseg.clustering.kmeans import kmeans_distributed, kmeans_local, kmeans_pp, preprocess, split_parts


def planted(n: int = 3000, k: int = 6, d: int = 16, sep: float = 4.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(k, size=n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y, centers


def test_planted_clusters_recovered_reference_path():
    from sklearn.metrics import adjusted_rand_score

    x, y, _ = planted()
    res = kmeans_local(x, 6, n_iter=20, n_restarts=2, seed=3, n_shards=2)
    assert adjusted_rand_score(y, res.labels) > 0.99
    assert res.labels.shape == (len(x),) and res.centroids.shape == (6, 16) and res.centroids.dtype == np.float32
    assert res.counts.sum() == len(x) and (res.counts > 0).all()
    assert len(res.inertia_history) == 20 and res.inertia == pytest.approx(res.inertia_history[-1])
    assert min(res.restart_inertia) == pytest.approx(res.inertia)
    # inertia never increases along Lloyd iterations
    assert np.all(np.diff(res.inertia_history) <= 1e-6 * res.inertia_history[0])


def assert_same_centroids(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 rounding: cluster sums are float32 within 4096-row chunks, and the chunks follow the
    shard boundaries, so another sharding rounds differently (a few ulps of the largest coordinate)."""
    np.testing.assert_allclose(a, b, rtol=0, atol=16 * np.finfo(np.float32).eps * np.abs(b).max())


def test_local_result_independent_of_shard_count():
    x, _, _ = planted(seed=1)
    ref = kmeans_local(x, 6, n_iter=10, seed=5, n_shards=1)
    for s in (2, 3):
        r = kmeans_local(x, 6, n_iter=10, seed=5, n_shards=s)
        assert_same_centroids(r.centroids, ref.centroids)
        np.testing.assert_array_equal(r.labels, ref.labels)


def test_empty_clusters_are_split_never_returned():
    x, y, centers = planted(n=2000, k=4, seed=2)
    # two of six initial centroids lie far from every point: empty after the first assignment
    init = np.vstack([centers, np.full((2, x.shape[1]), 500.0)])
    res = kmeans_local(x, 6, n_iter=5, init=init)
    assert res.n_splits >= 2
    assert (res.counts > 0).all() and len(np.unique(res.labels)) == 6
    # adversarial duplicated data: 7 distinct rows repeated many times, k = 7 -> every distinct row its own cluster
    rng = np.random.default_rng(0)
    base = rng.normal(size=(7, 8)).astype(np.float32)
    dup = base[rng.integers(7, size=700)]
    res = kmeans_local(dup, 7, n_iter=10, seed=0, n_restarts=2)
    assert (res.counts > 0).all() and res.inertia == pytest.approx(0.0, abs=1e-6)
    # fewer distinct rows than k: a clear error, never an empty cluster
    with pytest.raises(ValueError, match="fewer than k=8 distinct rows"):
        kmeans_local(dup, 8, n_iter=5)


def test_kmeans_pp_spreads_seeds():
    x, y, _ = planted(n=1200, k=5, sep=10.0)
    c = kmeans_pp(x, 5, np.random.default_rng(0))
    hit = {int(y[np.argmin(((x - ci) ** 2).sum(1))]) for ci in c}
    assert len(hit) == 5  # one seed in every well-separated planted cluster


def test_pca_whitening_optional():
    x, _, _ = planted(n=500, d=32)
    assert preprocess(x) is not None and np.array_equal(preprocess(x), x)
    y = preprocess(x, pca_dim=8, whiten=True)
    assert y.shape == (500, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


@pytest.mark.ray
def test_distributed_matches_faiss_and_is_actor_count_invariant(ray_local):
    import faiss
    from sklearn.metrics import adjusted_rand_score

    x, y, _ = planted(n=3000, k=6, d=16, sep=3.0, seed=4)
    runs = {a: kmeans_distributed(x, 6, n_actors=a, n_iter=15, n_restarts=2, seed=7, num_cpus=0.5) for a in (1, 2, 3)}
    for a in (2, 3):
        assert_same_centroids(runs[a].centroids, runs[1].centroids)
        np.testing.assert_array_equal(runs[a].labels, runs[1].labels)
        assert runs[a].inertia == pytest.approx(runs[1].inertia, rel=1e-6)
    assert adjusted_rand_score(y, runs[2].labels) > 0.99
    assert len(runs[3].shard_peak_rss_gb) == 3 and all(0 < g < 4 for g in runs[3].shard_peak_rss_gb)
    km = faiss.Kmeans(16, 6, niter=15, seed=7, nredo=10)  # random init: restarts to reach the optimum
    km.train(x)
    d, _ = km.index.search(x, 1)
    assert runs[2].inertia == pytest.approx(float(d.sum()), rel=0.01)
    # and the distributed path equals the pure-numpy reference
    ref = kmeans_local(x, 6, n_iter=15, n_restarts=2, seed=7, n_shards=1, use_faiss=False)
    np.testing.assert_array_equal(runs[1].labels, ref.labels)
    np.testing.assert_allclose(runs[1].centroids, ref.centroids, atol=1e-5)


def _shard_pids() -> set[int]:
    """Pids of the k-means shard actors' processes of this test process's own Ray cluster (its descendants: another
    test's cluster may run shards at the same time); Ray titles them `ray::Shard...`."""
    import psutil

    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::Shard"):
                pids.add(p.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids


def _sigkill_one_shard_actor(earlier: set[int]) -> int:
    """SIGKILL one live shard actor of the running k-means, not one of the `earlier` pids (an earlier run's actors,
    whose processes may outlive it on a loaded machine). Returns the pid."""
    import os
    import signal

    pids = sorted(_shard_pids() - earlier)
    if not pids:
        raise AssertionError("no ray::Shard process of this test's running k-means found")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


@pytest.mark.ray
def test_killed_actor_is_recreated_and_result_unchanged(ray_local):
    x, _, _ = planted(n=2000, k=5, seed=6)
    ref = kmeans_distributed(x, 5, n_actors=2, n_iter=8, seed=1, num_cpus=0.5)
    killed, earlier = [], _shard_pids()

    def kill_mid_run(restart, it, inertia):
        if it == 3 and not killed:
            killed.append(_sigkill_one_shard_actor(earlier))

    res = kmeans_distributed(x, 5, n_actors=2, n_iter=8, seed=1, num_cpus=0.5, on_iteration=kill_mid_run)
    assert killed and res.n_actor_restarts == 1
    np.testing.assert_allclose(res.centroids, ref.centroids, atol=1e-6)
    np.testing.assert_array_equal(res.labels, ref.labels)
    assert res.inertia_history == pytest.approx(ref.inertia_history, rel=1e-9)


def _write_parts(x: np.ndarray, sizes: list[int], root) -> list[tuple[str, int]]:
    """x split into features-layout parquet files of `sizes` rows (0 allowed): [(path, rows)]."""
    import pyarrow as pa

    from raydseg import storage

    files, start = [], 0
    for i, m in enumerate(sizes):
        rows = x[start:start + m]
        t = pa.table({"frame_id": [f"f{i}"] * m, "camera": ["cam"] * m, "segment_id": pa.array(range(m), pa.uint16()),
                      "descriptor": pa.array(list(rows), pa.list_(pa.float32()))})
        path = str(root / f"part-{i:05d}.parquet")
        storage.write_table(t, path)
        files.append((path, storage.parquet_rows(path)))
        start += m
    assert start == len(x)
    return files


def test_split_parts_balances_rows_and_never_makes_an_empty_shard():
    assert split_parts([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert split_parts([0, 5, 0, 5], 2) == [(0, 2), (2, 4)]
    assert split_parts([100], 3) == [(0, 1)]
    assert split_parts([1, 1, 98], 2) == [(0, 2), (2, 3)]  # 2 | 98 is nearer an even split than 100 | 0
    assert split_parts([5, 0, 0], 3) == [(0, 1)]
    assert split_parts([3, 3, 3, 3, 3, 3], 3) == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.ray
def test_actors_read_their_own_parquet_parts_with_the_in_memory_result(ray_local, tmp_path):
    """kmeans_distributed over parquet files (each actor reads its files; uneven and empty parts; PCA fitted on the
    seeding sample and applied by the shards) gives the in-memory result, and a SIGKILLed actor rereads its files."""
    x, y, _ = planted(n=2400, k=5, d=16, sep=3.0, seed=8)
    files = _write_parts(x, [700, 0, 300, 900, 500], tmp_path)
    ref = kmeans_distributed(x, 5, n_actors=1, n_iter=10, n_restarts=2, seed=2, num_cpus=0.5, pca_dim=8,
                             seed_sample=1000, nearest=3)
    killed, earlier = [], _shard_pids()

    def kill_mid_run(restart, it, inertia):
        if restart == 1 and it == 2 and not killed:
            killed.append(_sigkill_one_shard_actor(earlier))

    res = kmeans_distributed(files, 5, n_actors=3, n_iter=10, n_restarts=2, seed=2, num_cpus=0.5, pca_dim=8,
                         seed_sample=1000, nearest=3, on_iteration=kill_mid_run)
    assert killed and res.n_actor_restarts == 1 and len(res.shard_peak_rss_gb) == 3
    assert res.centroids.shape == (5, 8)
    assert_same_centroids(res.centroids, ref.centroids)
    np.testing.assert_array_equal(res.labels, ref.labels)
    assert [list(a) for a in res.nearest] == [list(a) for a in ref.nearest]
    # the montage picks are each cluster's nearest members, nearest first
    xp = preprocess(x, pca_dim=8, seed=2, sample=1000)
    for j, idx in enumerate(res.nearest):
        d2 = ((xp[res.labels == j] - res.centroids[j]) ** 2).sum(1)
        assert (res.labels[idx] == j).all() and len(idx) == 3
        np.testing.assert_allclose(np.sort(((xp[idx] - res.centroids[j]) ** 2).sum(1)), np.sort(d2)[:3], rtol=1e-4)
    with pytest.raises(ValueError, match="k-means needs at least k=5 rows, got 3"):
        kmeans_distributed(_write_parts(x[:3], [3], tmp_path / "small"), 5)


class _FakeGpuFaiss:
    """faiss with GPU support as seen from Python (StandardGpuResources, GpuIndexFlatL2, get_num_gpus), backed by
    the CPU index, counting what it builds: the GPU branch of Shard runs without a GPU."""

    def __init__(self):
        import faiss

        self.faiss, self.resources_made, self.indexes_made = faiss, 0, 0

    def get_num_gpus(self) -> int:
        return 1

    def StandardGpuResources(self):  # noqa: N802 - faiss's name
        self.resources_made += 1
        return object()

    def GpuIndexFlatL2(self, res, d):  # noqa: N802 - faiss's name
        self.indexes_made += 1
        return self.faiss.IndexFlatL2(d)

    def IndexFlatL2(self, d):  # noqa: N802 - faiss's name
        return self.faiss.IndexFlatL2(d)


def test_gpu_shard_keeps_one_faiss_resources_and_index_across_lloyd_iterations(monkeypatch):
    """A whole k-means (restarts x iterations of assign calls) builds one StandardGpuResources and one GPU index per
    shard, and gives the numpy reference's result."""
    import sys

    fake = _FakeGpuFaiss()
    monkeypatch.setitem(sys.modules, "faiss", fake)
    x, _, _ = planted(n=2000, k=5, d=8, seed=5)
    res = kmeans_local(x, 5, n_iter=8, n_restarts=3, seed=2, n_shards=2, use_faiss=True, use_gpu=True)
    assert (fake.resources_made, fake.indexes_made) == (2, 2)  # one per shard, not one per call (>= 2 x 24)
    ref = kmeans_local(x, 5, n_iter=8, n_restarts=3, seed=2, n_shards=2, use_faiss=False)
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.centroids, ref.centroids, atol=1e-4)


def test_cpu_shard_index_is_reset_not_rebuilt_and_follows_the_dimension():
    from raydseg.clustering.kmeans import Shard

    x, _, centers = planted(n=500, k=4, d=8, seed=6)
    shard = Shard(x, 0, use_faiss=True)
    ref = Shard(x, 0, use_faiss=False)
    first = shard.assign(centers)
    index = shard._index
    moved = centers + 0.5
    labels, dists = shard.assign(moved)
    assert shard._index is index and index.ntotal == 4  # refilled with exactly the new centroids
    np.testing.assert_array_equal(labels, ref.assign(moved)[0])
    np.testing.assert_allclose(dists, ref.assign(moved)[1], rtol=1e-4, atol=1e-3)
    assert not np.array_equal(first[1], dists)
    wide = Shard(np.hstack([x, x]), 0, use_faiss=True)
    wide._index = index  # an index of another dimension is replaced, not reused
    wide.assign(np.hstack([centers, centers]))
    assert wide._index is not index and wide._index.d == 16


@pytest.mark.gpu
def test_faiss_gpu_kmeans_matches_cpu_kmeans():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support (faiss-cpu)")
    x, _, _ = planted(n=20000, k=12, d=64, seed=8)
    gpu = kmeans_local(x, 12, n_iter=15, n_restarts=2, seed=1, n_shards=2, use_faiss=True, use_gpu=True)
    cpu = kmeans_local(x, 12, n_iter=15, n_restarts=2, seed=1, n_shards=2, use_faiss=True)
    assert (gpu.labels == cpu.labels).mean() > 0.999
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-4)
