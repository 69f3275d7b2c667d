"""The deterministic training feed (raydseg.train.feed): which samples each rank reads at each step, the exact global
batch, resume = suffix, per-sample augmentation seeds, the pretrain / pseudo-label feeds, and (on a local Ray) a
rank's feed in Ray tasks giving the same batches."""
from __future__ import annotations

import numpy as np
import pytest

from raydseg.train.feed import batch_split, local_batches, rank_schedule


def test_batch_split_is_exact_or_an_error():
    assert batch_split(8, 0, 2) == (4, 1)
    assert batch_split(8, 2, 2) == (2, 2)
    assert batch_split(16, 2, 4) == (2, 2)
    for batch, micro, world in ((8, 0, 3), (8, 3, 1), (8, 2, 3), (8, 16, 1)):
        with pytest.raises(ValueError) as e:
            batch_split(batch, micro, world)
        got = micro or batch // world
        assert str(e.value) == (f"global batch {batch} is not micro_batch_size ({got}) x num_workers ({world}) x an "
                                f"integer number of accumulation steps")


def test_config_refuses_a_global_batch_the_workers_cannot_split():
    from raydseg.config import load_config
    from raydseg.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(overrides=["teacher.num_workers=3", "student.micro_batch_size=3"])
    assert e.value.problems == [
        "teacher.batch_size: global batch 8 is not micro_batch_size (2) x num_workers (3) x an integer number of "
        "accumulation steps",
        "student.batch_size: global batch 8 is not micro_batch_size (3) x num_workers (1) x an integer number of "
        "accumulation steps"]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_every_step_reads_the_next_global_batch_and_every_epoch_every_sample_once(world, accum):
    n, micro, steps, seed = 13, 2, 20, 7
    B = micro * world * accum
    per_rank = [rank_schedule(n, seed=seed, start=0, steps=steps, micro=micro, world=world, accum=accum, rank=r)
                for r in range(world)]
    # reassemble the global stream: step s, micro k, rank r
    stream, epochs = [], []
    for s in range(steps):
        for k in range(accum):
            for r in range(world):
                i = (s * accum + k) * micro
                stream += per_rank[r][0][i:i + micro].tolist()
                epochs += per_rank[r][1][i:i + micro].tolist()
    assert len(stream) == steps * B
    assert epochs == [p // n for p in range(steps * B)]  # the stream position decides the epoch
    for e in range(steps * B // n):  # each whole epoch is a permutation of all samples
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # a fresh order per epoch
    other = rank_schedule(n, seed=seed + 1, start=0, steps=steps, micro=micro, world=world, accum=accum, rank=0)[0]
    assert not np.array_equal(other, per_rank[0][0])  # the seed decides the order


def test_a_resumed_schedule_is_the_suffix_of_the_uninterrupted_one():
    kw = dict(seed=3, steps=9, micro=2, world=2, accum=2, rank=1)
    full_s, full_e = rank_schedule(11, start=0, **kw)
    for start in (1, 4, 8):
        s, e = rank_schedule(11, start=start, **kw)
        per_step = 2 * 2
        assert np.array_equal(s, full_s[start * per_step:]) and np.array_equal(e, full_e[start * per_step:])


def test_pseudo_label_feed_is_reproducible_per_sample_and_leaves_out_held_out_frames(tmp_path):
    from raydseg.train.data import is_val, train_feed
    from raydseg.train.synthetic import write_blob_parts

    rows = write_blob_parts(str(tmp_path / "pl"), n_images=20, h=48, w=64, n_parts=3, n_cls=4, seed=0)
    cfg = _section(val_fraction=0.3)
    feed = train_feed(str(tmp_path / "pl"), cfg, with_segments=True)
    from raydseg.train.feed import sample_index

    index = sample_index(feed)
    n_train = sum(not is_val(r["frame_id"], 0.3) for r in rows)
    assert 0 < len(index) == n_train < 20
    a = list(local_batches(feed, seed=5, start=0, steps=6, micro=2))
    b = list(local_batches(feed, seed=5, start=0, steps=6, micro=2))
    assert len(a) == 6 and all(x["image"].shape == (2, 32, 32, 3) and x["segments"].shape == (2, 32, 32) for x in a)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)  # same seed: the same bytes
    c = list(local_batches(feed, seed=6, start=0, steps=6, micro=2))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    resumed = list(local_batches(feed, seed=5, start=4, steps=6, micro=2))  # a resume at step 4 reads steps 4, 5
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a[4:], resumed) for k in x)


@pytest.mark.ray
def test_ray_tasks_feed_a_rank_the_local_batches_in_order_as_tensors(ray_local, tmp_path):
    """rank_batches on Ray (one task per micro-batch, more micro-batches than FEED_IN_FLIGHT) gives rank 1 of 2 the
    bytes local_batches reads, in order, from the start and from a resume."""
    import torch

    from raydseg.train.data import train_feed
    from raydseg.train.feed import FEED_IN_FLIGHT, rank_batches
    from raydseg.train.synthetic import write_blob_parts

    write_blob_parts(str(tmp_path / "pl"), n_images=20, h=48, w=64, n_parts=3, n_cls=4, seed=0)
    feed = train_feed(str(tmp_path / "pl"), _section(), with_segments=True)
    kw = dict(seed=5, steps=10, micro=2, world=2, accum=2, rank=1)
    want = list(local_batches(feed, start=0, **kw))
    assert len(want) == 20 > FEED_IN_FLIGHT
    for start in (0, 7):
        got = list(rank_batches(feed, start=start, device="cpu", task_cpus=1.0, **kw))
        assert len(got) == len(want) - 2 * start
        assert all(isinstance(g[k], torch.Tensor) and np.array_equal(g[k].numpy(), w[k])
                   for g, w in zip(got, want[2 * start:]) for k in w)


def _camera_part(path: str, n_cams: list[int], seed: int = 0) -> None:
    """A frames part of len(n_cams) frames, frame i with n_cams[i] 80 x 60 random camera images."""
    import pyarrow as pa

    from raydseg import storage
    from raydseg.data.schema import CAMERA_TYPE, encode_png

    rng = np.random.default_rng(seed)
    cams = [[{"name": f"c{j}", "image": encode_png(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)),
              "K": [0.0] * 9, "T_cam_lidar": [0.0] * 16}
             for j in range(n)] for n in n_cams]
    ids = [f"{seed}-{i}" for i in range(len(n_cams))]
    storage.write_table(pa.table({"frame_id": ids, "cameras": pa.array(cams, pa.list_(CAMERA_TYPE))}), path)


def test_pretrain_feed_lists_every_camera_and_crops_reproducibly(tmp_path):
    from raydseg.config import load_config
    from raydseg.train.feed import sample_index
    from raydseg.train.pretrain import pretrain_feed

    _camera_part(str(tmp_path / "frames" / "part-00000.parquet"), [2, 0, 3])  # a frame without cameras: no sample
    p = load_config().pretrain.model_dump()
    feed = pretrain_feed(str(tmp_path / "frames"), p)
    assert sample_index(feed).tolist() == [[0, 0, 0], [0, 0, 1], [0, 2, 0], [0, 2, 1], [0, 2, 2]]
    a = next(local_batches(feed, seed=1, start=0, steps=1, micro=2))
    b = next(local_batches(feed, seed=1, start=0, steps=1, micro=2))
    assert a["global_0"].shape == (2, 3, p["global_crop_size"], p["global_crop_size"])
    assert a["local_0"].shape == (2, 3, p["local_crop_size"], p["local_crop_size"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["global_0"], a["global_1"])  # two different draws of one image


def _section(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"crop_size": 32, "scale_min": 0.3, "scale_max": 1.0, "flip": True, "jitter": 0.2,
                              "degrade": 0.0, "lowlight": 0.0, "val_fraction": 0.2, **kw})


def test_the_part_cache_reads_each_part_once_within_its_byte_budget_and_the_batches_do_not_change(tmp_path,
                                                                                                   monkeypatch):
    """The samples of a step come from random parts: parts that fit PART_CACHE_BYTES are read once per process; with
    no budget only the newest part stays and nearly every sample re-reads its part. The bytes are the same."""
    from raydseg.train import feed as F
    from raydseg.train.data import train_feed
    from raydseg.train.synthetic import write_blob_parts

    write_blob_parts(str(tmp_path / "pl"), n_images=24, h=48, w=64, n_parts=6, n_cls=4, seed=0)
    feed = train_feed(str(tmp_path / "pl"), _section(val_fraction=0.0), with_segments=True)
    reads = []
    real = F._parquet
    monkeypatch.setattr(F, "_parquet", lambda path: reads.append(path) or real(path))

    def stream(budget: int) -> list[dict]:
        monkeypatch.setattr(F._PARTS, "budget", budget)
        F._PARTS.clear()
        reads.clear()
        return list(local_batches(feed, seed=3, start=0, steps=12, micro=4))  # 48 samples, two epochs

    cached = stream(256 << 20)
    assert sorted(reads) == sorted(feed.paths * 2)  # each part once for the sample index, once for its rows
    assert len(F._PARTS.keys()) == 6
    uncached = stream(0)
    assert len(reads) > 6 + 30 and len(F._PARTS.keys()) == 1  # 6 parts, 48 samples in random order: most change part
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(cached, uncached) for k in x)


def test_decoded_images_are_cached_per_encoded_image_within_their_byte_budget(monkeypatch):
    """The pretrain feed decodes an image once per process while encoded + decoded sizes fit the budget; beyond it
    the oldest go first, and the newest always stays. The pixels are the decoder's."""
    from raydseg.data.schema import encode_png
    from raydseg.train import pretrain as P

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    blobs = [encode_png(im) for im in images]
    calls = []
    real = P.as_rgb
    monkeypatch.setattr(P, "as_rgb", lambda b: calls.append(b) or real(b))
    monkeypatch.setattr(P, "_DECODED", type(P._DECODED)(P.DECODED_CACHE_BYTES))
    first = [P.decoded_rgb(b) for b in blobs]
    again = [P.decoded_rgb(bytes(bytearray(b))) for b in blobs]  # equal bytes, other objects: still cached
    assert len(calls) == 3 and all(x is y for x, y in zip(first, again))
    assert all(np.array_equal(x, im) for x, im in zip(first, images))
    monkeypatch.setattr(P._DECODED, "budget", 2 * (60 * 80 * 3 + max(map(len, blobs))))  # two images fit
    P._DECODED.clear()
    calls.clear()
    for b in blobs + [blobs[0], blobs[2]]:  # the third evicts the first; the first again evicts the second; a hit
        P.decoded_rgb(b)
    assert calls == [blobs[0], blobs[1], blobs[2], blobs[0]] and P._DECODED.keys() == [blobs[0], blobs[2]]
    assert P.decoded_rgb(images[0]) is images[0]  # arrays pass through, uncached


def test_the_feed_cache_benchmark_reads_each_part_once_and_gives_the_same_batches(tmp_path):
    """jobs/benchmarks/feed_cache.py on three parts: cached, only the sample index reads a part in the timed steps;
    with one part cached they are re-read; the batches are byte-equal."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    for i in range(3):
        _camera_part(str(tmp_path / "frames" / f"part-{i:05d}.parquet"), [1, 1], seed=i)
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "jobs/benchmarks/feed_cache.py", "--frames", str(tmp_path / "frames"),
                        "--out", str(tmp_path / "o.json"), "--steps", "4", "--batch", "2"], cwd=repo,
                       env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "o.json").read_text())
    assert r["parts"] == 3 and r["same_batches"] is True
    assert r["part_reads_cached"] == 3 < r["part_reads_one_part"]  # 8 samples from 3 parts, in random order
    assert r["cached_over_one_part"] > 0 and r["cached_parts_over_one_part"] > 0 and r["cpu_generator_seed_us"] > 0


def test_the_train_feed_benchmark_gives_the_same_batches_from_ray_tasks_and_ray_data(tmp_path):
    """jobs/benchmarks/train_feed.py on three tiny parts: both feeds' timed batches are byte-equal, every rate is
    measured."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    for i in range(3):
        _camera_part(str(tmp_path / "frames" / f"part-{i:05d}.parquet"), [1, 1], seed=i)
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "jobs/benchmarks/train_feed.py", "--frames", str(tmp_path / "frames"),
                        "--out", str(tmp_path / "o.json"), "--steps", "2", "--warm", "1", "--schedule", "20",
                        "--object-store-mb", "100"], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "o.json").read_text())
    assert r["same_batches"] is True and r["timed_steps"] == 2 and r["schedule_steps"] == 20
    assert r["tasks_steps_per_s"] > 0 and r["ray_data_steps_per_s"] > 0 and r["tasks_over_ray_data"] > 0
