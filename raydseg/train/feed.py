"""Deterministic training data: which samples each rank reads at each step, and their augmentation seeds.

The samples of a stage (a `Feed`: rows of parquet parts, or sub-items of rows such as the cameras of a frame) are
visited in an endless stream, a fresh seeded permutation per epoch. The global batch of optimiser step s is stream
positions [s*B, (s+1)*B), B = micro x world x accum; rank r's micro-batch k of that step is the slice starting at
s*B + (k*world + r)*micro. A sample's augmentation draws from `np.random.default_rng([seed, epoch, sample])`.
So what a rank trains on is a pure function of (seed, step, rank): a run resumed at step s reads exactly what an
uninterrupted run reads from step s on, and the same seed gives bit-identical batches.

Each rank reads its own remaining schedule as Ray tasks, one per micro-batch, reading + augmenting the samples on
CPUs (`raydseg.ray_map.map_tasks` with `ordered`: `FEED_IN_FLIGHT` ahead of the step), so decoding stays off the
training process and nothing of it lives on the driver. `local_batches` is the same schedule without Ray (tests,
one process).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

Sample = tuple[int, int]  # (row in its part, sub-item of the row)
FEED_IN_FLIGHT = 16  # micro-batches a rank's feed has submitted ahead of the one its step reads


@dataclass(frozen=True)
class Feed:
    """A training stage's samples and how a batch is made of them (module-level callables: they are pickled).

    paths: parquet parts (storage paths, sorted).
    index_columns: column paths (nested allowed, "cameras.list.element.name") read to list the samples.
    list_samples: a part's index columns (pyarrow.Table) -> its samples [(row, sub), ...], held-out rows left out.
    columns: the columns read to make samples.
    make_batch: (rows: list[{column: value}], subs: list[int], rngs: list[np.random.Generator], **kwargs) ->
        {name: (n, ...) array}, one output row per sample, in order.
    """

    paths: tuple[str, ...]
    index_columns: tuple[str, ...]
    list_samples: Callable[[Any], list[Sample]]
    columns: tuple[str, ...]
    make_batch: Callable[..., dict[str, np.ndarray]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def part_files(folder: str, what: str) -> list[str]:
    """The `part-*.parquet` files directly in `folder`, in name order; FileNotFoundError naming `what` if none."""
    from raydseg import storage
    from raydseg.parts import part_names

    names = part_names(folder)
    if not names:
        raise FileNotFoundError(f"no part-*.parquet {what} files in {folder}")
    return [storage.join(folder, n) for n in names]


def batch_split(batch_size: int, micro_batch_size: int, world: int) -> tuple[int, int]:
    """(micro, accum) with micro x world x accum == batch_size exactly; micro 0 = batch_size // world.
    Raises ValueError when no such split exists (checked at config time: raydseg.config.cross_field_problems)."""
    micro = micro_batch_size or batch_size // world
    if micro < 1 or batch_size % (micro * world):
        raise ValueError(f"global batch {batch_size} is not micro_batch_size ({micro}) x num_workers ({world}) x "
                         f"an integer number of accumulation steps")
    return micro, batch_size // (micro * world)


def _parquet(path: str):
    import pyarrow.parquet as pq

    from raydseg import storage

    fs, p = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(p))


def sample_index(feed: Feed) -> np.ndarray:
    """(N, 3) int64 [part, row, sub] of every training sample, in part / row / sub order (the same on every rank)."""
    out = [(i, row, sub) for i, path in enumerate(feed.paths)
           for row, sub in feed.list_samples(_parquet(path).read(columns=list(feed.index_columns)))]
    if not out:
        raise RuntimeError(f"no training samples in the {len(feed.paths)} parts starting with {feed.paths[:1]}")
    return np.asarray(out, np.int64).reshape(-1, 3)


def rank_schedule(n: int, *, seed: int, start: int, steps: int, micro: int, world: int, accum: int, rank: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(sample, epoch), each ((steps - start) * accum * micro,) int64: what `rank` reads from step `start` on, in
    consumption order (micro-batch k of step s = entries [((s - start) * accum + k) * micro, ... + micro))."""
    B = micro * world * accum
    s = np.arange(start, steps)[:, None, None]
    k = np.arange(accum)[None, :, None]
    j = np.arange(micro)[None, None, :]
    pos = (s * B + (k * world + rank) * micro + j).reshape(-1)
    epoch = pos // n
    sample = np.empty_like(pos)
    for e in np.unique(epoch):
        at = epoch == e
        sample[at] = np.random.default_rng([seed, int(e)]).permutation(n)[pos[at] % n]
    return sample, epoch


class ByteLRU:
    """A per-process LRU map that keeps its values while their sizes sum to at most `budget` bytes (the newest entry
    always stays): the training feed's parts, the pretrain feed's decoded images."""

    def __init__(self, budget: int):
        self.budget, self.nbytes = budget, 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any, make: Callable[[], tuple[Any, int]]) -> Any:
        """The value of `key`; on a miss `make()` -> (value, its size in bytes), and the oldest entries leave."""
        if key not in self._items:
            self._items[key] = item = make()
            self.nbytes += item[1]
            while len(self._items) > 1 and self.nbytes > self.budget:
                self.nbytes -= self._items.popitem(last=False)[1][1]
        self._items.move_to_end(key)
        return self._items[key][0]

    def keys(self) -> list:
        """The keys, oldest first."""
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


# The samples of a step come from random parts, so a cache of a few parts re-reads a part for nearly every sample;
# up to PART_CACHE_BYTES of them stay (jobs/benchmarks/feed_cache.py).
PART_CACHE_BYTES = 256 << 20
_PARTS = ByteLRU(PART_CACHE_BYTES)  # {path|columns: the columns as Python lists}, sized by their arrow bytes


def _table_lists(path: str, columns: tuple[str, ...]) -> tuple[dict[str, list], int]:
    table = _parquet(path).read(columns=list(columns))
    return table.to_pydict(), table.nbytes


def _rows(path: str, columns: tuple[str, ...]) -> dict[str, list]:
    """The `columns` of part `path` as Python lists, from the cache when there."""
    return _PARTS.get(f"{path}|{','.join(columns)}", lambda: _table_lists(path, columns))


def read_samples(batch: dict[str, np.ndarray], feed: Feed, seed: int) -> dict[str, np.ndarray]:
    """One micro-batch's schedule, columns {part, row, sub, sample, epoch} -> feed.make_batch's arrays."""
    rows, subs, rngs = [], [], []
    for part, row, sub, sample, epoch in zip(batch["part"], batch["row"], batch["sub"], batch["sample"],
                                             batch["epoch"]):
        cols = _rows(feed.paths[int(part)], feed.columns)
        rows.append({c: cols[c][int(row)] for c in feed.columns})
        subs.append(int(sub))
        rngs.append(np.random.default_rng([seed, int(epoch), int(sample)]))
    return feed.make_batch(rows, subs, rngs, **feed.kwargs)


def _schedule_columns(feed: Feed, index: np.ndarray, seed: int, **kw: int) -> dict[str, np.ndarray]:
    sample, epoch = rank_schedule(len(index), seed=seed, **kw)
    return {"part": index[sample, 0], "row": index[sample, 1], "sub": index[sample, 2], "sample": sample,
            "epoch": epoch}


def rank_batches(feed: Feed, *, seed: int, start: int, steps: int, micro: int, world: int, accum: int, rank: int,
                 device: Any, task_cpus: float) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches (torch tensors on `device`) from step `start` to `steps`, made in Ray tasks."""
    import ray
    import torch

    from raydseg.ray_map import map_tasks

    cols = _schedule_columns(feed, sample_index(feed), seed, start=start, steps=steps, micro=micro, world=world,
                             accum=accum, rank=rank)
    feed_ref = ray.put(feed)  # serialised once, not once per micro-batch
    calls = (({k: v[i:i + micro] for k, v in cols.items()}, feed_ref, seed)
             for i in range(0, len(cols["part"]), micro))
    for arrays in map_tasks(read_samples, calls, {"num_cpus": task_cpus}, FEED_IN_FLIGHT, ordered=True):
        # the object store's arrays are read-only: copied once, into tensors the step may write
        yield {k: torch.from_numpy(np.require(v, requirements="W")).to(device) for k, v in arrays.items()}


def local_batches(feed: Feed, *, seed: int, start: int, steps: int, micro: int, world: int = 1, accum: int = 1,
                  rank: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`rank_batches` without Ray: the same schedule and samples, as numpy micro-batches, read in this process."""
    cols = _schedule_columns(feed, sample_index(feed), seed, start=start, steps=steps, micro=micro, world=world,
                             accum=accum, rank=rank)
    for i in range(0, len(cols["part"]), micro):
        yield read_samples({k: v[i:i + micro] for k, v in cols.items()}, feed=feed, seed=seed)
