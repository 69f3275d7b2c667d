"""Part-wise Ray Data map: every input part file becomes output part files of the same name, written atomically.

A part (`part-*.parquet`, a few sweeps) is the unit of parallelism and of resume: parts whose outputs all
exist are skipped, so a rerun after a crash redoes only the unfinished parts. Part names stay aligned across
stages (part-00003 of every stage holds the same frames). `DoneMarkers` is the one resume scheme: `map_parts` marks
parts in `_parts/`, the ingest stage marks source shards in `_shards/`.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from raydseg import storage

PartFn = Callable[[pa.Table], tuple[dict[str, pa.Table], list[dict]]]


@dataclass
class PartsResult:
    """Totals over all parts: rows written per output key, input rows read, rejects, parts skipped/done."""

    counts: dict[str, int] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)


def part_names(in_dir: str) -> list[str]:
    return [n for n in storage.listdir(in_dir) if n.startswith("part-") and n.endswith(".parquet")]


@contextlib.contextmanager
def single_operator_pipeline() -> Iterator[None]:
    """Let a one-operator Ray Data pipeline (items -> map_batches) use every CPU it may.

    Ray Data reserves a share of the cluster per operator, so on a small cluster (2 CPUs) a map ran one task at
    a time (figures: docs/results.md, "Engineering measurements"). Our stage pipelines have a single operator,
    so there is nothing to reserve for. Create *and* run the dataset inside the block (set around either step
    alone, the setting was not applied). The driver's previous setting is restored after.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = before


@dataclass(frozen=True)
class DoneMarkers:
    """Resume markers of one stage folder: `<out_dir>/<folder>/<unit>.json` holds a unit's stats and is written after
    all of the unit's outputs, so a unit counts as done only once its marker exists and a rerun redoes the others."""

    out_dir: str
    folder: str = "_parts"

    def path(self, unit: str) -> str:
        return storage.join(self.out_dir, self.folder, unit + ".json")

    def done(self, unit: str) -> bool:
        return storage.exists(self.path(unit))

    def todo(self, units: list[str]) -> list[str]:
        """The units without a marker, in order."""
        return [u for u in units if not self.done(u)]

    def mark(self, unit: str, stats: dict[str, Any]) -> None:
        """Call last, after every output of `unit` is written."""
        storage.write_json(self.path(unit), stats)

    def read(self, unit: str) -> dict[str, Any]:
        return storage.read_json(self.path(unit))


def _out_path(out_dir: str, key: str, name: str) -> str:
    return storage.join(out_dir, key, name) if key else storage.join(out_dir, name)


def _process(fn: PartFn, in_dir: str, out_dir: str, name: str) -> dict[str, Any]:
    table = storage.read_table(storage.join(in_dir, name))
    outputs, rejects = fn(table)
    for key, out in outputs.items():
        storage.write_table(out, _out_path(out_dir, key, name))
    stats = {"part": name, "rows_in": table.num_rows, "rows_out": {k: t.num_rows for k, t in outputs.items()},
             "rejects": rejects}
    DoneMarkers(out_dir).mark(name, stats)  # last: the part counts as done only now
    return stats


class _ActorWrapper:
    """Actor-pool callable: builds the user's class once per actor, then maps parts through it."""

    def __init__(self, cls: type, kwargs: dict, in_dir: str, out_dir: str):
        self.fn = cls(**kwargs)
        self.in_dir, self.out_dir = in_dir, out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [_process(self.fn, self.in_dir, self.out_dir, str(n)) for n in batch["part"]]
        return {"part": np.array([s["part"] for s in stats])}


def map_parts(in_dir: str, out_dir: str, fn: PartFn | type, *, num_cpus: float = 1, num_gpus: float = 0,
              actor_pool: tuple[int, int] | None = None, fn_constructor_kwargs: dict | None = None,
              resources: dict[str, float] | None = None) -> PartsResult:
    """Run `fn(table) -> ({key: table}, rejects)` over every part of `in_dir` with Ray Data.

    A function runs as Ray tasks; a class runs in an actor pool (`actor_pool=(min, max)`, default (1, 2)) so that
    expensive state (a model) is built once per actor. Outputs go to `<out_dir>/<key>/<part>`; a JSON marker in
    `<out_dir>/_parts/` is written after all outputs of a part, and marked parts are skipped on a rerun.
    """
    import ray

    names = part_names(in_dir)
    markers = DoneMarkers(out_dir)
    todo = markers.todo(names)
    if todo:
        with single_operator_pipeline():
            ds = ray.data.from_items([{"part": n} for n in todo], override_num_blocks=len(todo))
            common: dict[str, Any] = dict(batch_size=1, num_cpus=num_cpus, num_gpus=num_gpus or None)
            if resources:
                common["resources"] = resources
            if inspect.isclass(fn):
                lo, hi = actor_pool or (1, 2)
                ds = ds.map_batches(_ActorWrapper, fn_constructor_kwargs=dict(
                    cls=fn, kwargs=fn_constructor_kwargs or {}, in_dir=in_dir, out_dir=out_dir),
                    compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=max(lo, min(hi, len(todo)))), **common)
            else:
                def run_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                    return {"part": np.array([_process(fn, in_dir, out_dir, str(n))["part"] for n in batch["part"]])}
                ds = ds.map_batches(run_part, **common)
            ds.materialize()
    result = PartsResult()
    for name in names:
        stats = markers.read(name)
        result.counts["rows_in"] = result.counts.get("rows_in", 0) + stats["rows_in"]
        for key, n in stats["rows_out"].items():
            k = f"rows_out{'_' + key if key else ''}"
            result.counts[k] = result.counts.get(k, 0) + n
        result.rejects.extend(stats["rejects"])
    result.counts["parts"] = len(names)
    result.counts["parts_resumed"] = len(names) - len(todo)
    return result
