"""Part-wise map on Ray: every input part file becomes output part files of the same name, written atomically.

A part (`part-*.parquet`, a few sweeps) is the unit of parallelism and of resume: parts whose outputs all
exist are skipped, so a rerun after a crash redoes only the unfinished parts. Part names stay aligned across
stages (part-00003 of every stage holds the same frames). `DoneMarkers` is the one resume scheme: `map_parts` marks
parts in `_parts/`, the ingest stage marks source shards in `_shards/`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

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


def map_parts(in_dir: str, out_dir: str, fn: PartFn | type, *, num_cpus: float = 1, num_gpus: float = 0,
              actor_pool: tuple[int, int] | None = None, fn_constructor_kwargs: dict | None = None,
              resources: dict[str, float] | None = None) -> PartsResult:
    """Run `fn(table) -> ({key: table}, rejects)` over every part of `in_dir` on Ray (raydseg.ray_map).

    A function runs as plain Ray tasks, one per part; a class runs in a pool of Ray actors (`actor_pool=(min, max)`,
    default (1, 2)) so that expensive state (a model) is built once per actor. Outputs go to
    `<out_dir>/<key>/<part>`; a JSON marker in `<out_dir>/_parts/` is written after all outputs of a part, and marked
    parts are skipped on a rerun. An exception raised by `fn` ends the map (the parts marked so far are kept); a lost
    worker, actor or node is retried by Ray.
    """
    import ray

    from raydseg.ray_map import map_actors, map_tasks

    names = part_names(in_dir)
    markers = DoneMarkers(out_dir)
    todo = markers.todo(names)
    options: dict[str, Any] = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {}),
                               **({"resources": resources} if resources else {})}
    if todo:
        if inspect.isclass(fn):
            done = map_actors(fn, fn_constructor_kwargs or {}, _process, [(in_dir, out_dir, n) for n in todo],
                              options, actor_pool or (1, 2))
        else:
            fn_ref = ray.put(fn)  # serialised once, not once per part
            done = map_tasks(_process, [(fn_ref, in_dir, out_dir, n) for n in todo], options)
        for _ in done:
            pass  # a part's stats are in its marker, read below with the resumed parts'
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
