"""The features stage's output table: one row per described segment (Ray-free, so that k-means and evaluation read
it without importing the stage)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

DESCRIPTOR_COLUMN = "descriptor"  # list<float32> (D,) per row, L2-normalised
FEATURES_SCHEMA = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("segment_id", pa.uint16()),
                             (DESCRIPTOR_COLUMN, pa.list_(pa.float32()))])


def descriptors_table(rows: list[tuple[str, str, int, np.ndarray]]) -> pa.Table:
    """[(frame_id, camera, segment_id, descriptor (D,) float32)] -> FEATURES_SCHEMA table."""
    d = np.stack([r[3] for r in rows]).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    dim = d.shape[1] if rows else 0
    desc = pa.ListArray.from_arrays(pa.array(np.arange(len(rows) + 1, dtype=np.int32) * dim),
                                    pa.array(d.reshape(-1), pa.float32()))
    cols = [pa.array([r[0] for r in rows], pa.string()), pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.uint16()), desc]
    return pa.Table.from_arrays(cols, schema=FEATURES_SCHEMA)
