"""The cluster stage's assignment parts (`cluster/assignments/part-*`: frame_id, camera, segment_id, pseudo_class),
written per features part from the k-means labels and read back per frame, so that no step holds every segment's
key at once."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from raydseg import storage

KEY_COLUMNS = ["frame_id", "camera", "segment_id"]  # a segment's key in the features and assignment parts
ASSIGN_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("segment_id", pa.uint16()),
                           ("pseudo_class", pa.uint8())])

Lookup = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (frame_id, camera) -> (segment ids, classes)
NO_SEGMENTS = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # what a Lookup gives an image without segments


def write_assignments(files: Sequence[tuple[str, int]], classes: np.ndarray, assign_dir: str) -> None:
    """One assignment part per non-empty features part [(path, rows)], of the same name: its key columns with
    `classes` (N,) (pseudo-class per row, in file and row order)."""
    start = 0
    for path, rows in files:
        if rows == 0:
            continue
        keys = storage.read_table(path, columns=KEY_COLUMNS)
        cls = pa.array(np.asarray(classes[start:start + rows], np.uint8), pa.uint8())
        storage.write_table(keys.append_column("pseudo_class", cls).cast(ASSIGN_SCHEMA),
                            storage.join(assign_dir, path.rstrip("/").rsplit("/", 1)[-1]))
        start += rows


def read_assignments(assign_dir: str, parts: Sequence[str]) -> Lookup:
    """The assignments of the given part names (missing parts: nothing), per (frame_id, camera)."""
    grouped: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for part in sorted(set(parts)):
        path = storage.join(assign_dir, part)
        if not storage.exists(path):
            continue
        t = storage.read_table(path)
        for f, c, sid, k in zip(*(t[n].to_pylist() for n in ASSIGN_SCHEMA.names)):
            ids, cls = grouped.setdefault((f, c), ([], []))
            ids.append(sid)
            cls.append(k)
    return {key: (np.array(ids, np.int64), np.array(cls, np.int64)) for key, (ids, cls) in grouped.items()}


def keys_at(files: Sequence[tuple[str, int]], idx: np.ndarray) -> list[tuple[str, str, int]]:
    """The (frame_id, camera, segment_id) of global rows `idx` of features parts [(path, rows)], in idx order;
    reads the key columns of the parts that hold them only, once each."""
    idx = np.asarray(idx, np.int64)
    out: dict[int, tuple[str, str, int]] = {}
    start = 0
    for path, rows in files:
        mine = idx[(idx >= start) & (idx < start + rows)]
        if len(mine):
            t = storage.read_table(path, columns=KEY_COLUMNS).take(pa.array(mine - start))
            for i, f, c, s in zip(mine.tolist(), *(t[n].to_pylist() for n in KEY_COLUMNS)):
                out[i] = (f, c, int(s))
        start += rows
    return [out[i] for i in idx.tolist()]
