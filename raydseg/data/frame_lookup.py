"""Lookups in the ingest stage's frames (`ingest/frames/part-*.parquet`): which part holds a frame, and the camera
records of given frames, reading only the columns needed. Used by the stages that need camera images (features,
cluster)."""
from __future__ import annotations

from raydseg import storage
from raydseg.parts import part_names


def frame_index(frames_dir: str) -> dict[str, str]:
    """frame_id -> ingest part name (reads only the frame_id column of every part)."""
    index = {}
    for name in part_names(frames_dir):
        for fid in storage.read_table(storage.join(frames_dir, name), columns=["frame_id"])["frame_id"].to_pylist():
            index[fid] = name
    return index


def camera_records(frames_dir: str, index: dict[str, str], frame_ids: list[str]) -> dict[tuple[str, str], dict]:
    """(frame_id, camera) -> camera struct (name, image bytes, gt_semantic...) for the given frames."""
    out = {}
    wanted = set(frame_ids)
    for part in sorted({index[f] for f in wanted if f in index}):
        t = storage.read_table(storage.join(frames_dir, part), columns=["frame_id", "cameras"])
        for fid, cams in zip(t["frame_id"].to_pylist(), t["cameras"].to_pylist()):
            if fid in wanted:
                for cam in cams:
                    out[(fid, cam["name"])] = cam
    return out
