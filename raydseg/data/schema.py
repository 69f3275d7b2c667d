"""The Frame contract (one row per LiDAR sweep with its synchronised cameras) and its validator.

Row form used in Python (`frames_to_table` / `table_to_frames` convert to and from Arrow):
  frame_id str, sequence str, timestamp_us int,
  points (N, 4) float32: x, y, z metres in the LiDAR frame + intensity,
  ring (N,) uint8 | None: beam index when the source knows it,
  gt_label (N,) uint8 | None: Cityscapes trainIds (255 void); gt_instance (N,) int32 | None (0 = none),
  cameras: list of {name, image (PNG/JPEG bytes), width, height, K (3, 3) float64,
                    T_cam_lidar (4, 4) float64, LiDAR -> OpenCV camera (x right, y down, z forward),
                    timestamp_us, gt_semantic (PNG uint8 trainIds) | None, gt_instance (PNG uint16) | None,
                    distortion (5,) float64 k1, k2, p1, p2, k3 (OpenCV's order; zeros = pinhole),
                    rolling_shutter (9,) float64 | None (None = global shutter)}.
K maps to pixel (u, v) = (column, row) with pixel centres at integer coordinates (OpenCV: pixel (0, 0) covers
[-0.5, 0.5)^2). Sources measuring from the image edge convert at ingest: Waymo's c_u, c_v are shifted by -0.5.
The image is as the camera took it; `distortion` is its lens (OpenCV's / Waymo's model on the normalised camera
coordinates, applied before K; raydseg.geometry.distortion), and projections go through it. A writer may leave it
out (stored null), and a Frame written before the field existed has none: both read as zeros (pinhole).
T_cam_lidar holds at the camera's capture time: a source whose vehicle moves between the sweep and the exposure
composes the ego poses into it (nuScenes, Waymo), so the sweep's points land where the camera saw them.
A rolling-shutter camera has no single capture time: its `rolling_shutter` = (v_x, v_y, v_z m/s, w_x, w_y, w_z rad/s,
t0 s, dt_dx s, dt_dy s) is the camera's linear and angular velocity relative to the scene, in the OpenCV camera frame
at T_cam_lidar's time, and the capture time of a point relative to that time, t0 + dt_dx x + dt_dy y, as a function of
its undistorted normalised coordinates (x, y) = (X/Z, Y/Z) (raydseg.geometry.rolling_shutter has the motion model);
projections move each point to where the camera saw it at its time. Null or absent (a Frame written before the field)
= a global shutter: T_cam_lidar alone.
Points are stored as `large_list<float32>` of 4N values plus `n_points`, readable by plain pyarrow.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

CAMERA_TYPE = pa.struct([
    ("name", pa.string()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("K", pa.list_(pa.float64(), 9)),
    ("T_cam_lidar", pa.list_(pa.float64(), 16)),
    ("timestamp_us", pa.int64()),
    ("gt_semantic", pa.binary()),
    ("gt_instance", pa.binary()),
    # 5 values or null (pinhole); absent in Frames written before it. A variable list: pyarrow reads a null
    # fixed-size list inside this struct list back from parquet as "Expected all lists to be of size=5"
    ("distortion", pa.list_(pa.float64())),
    # 9 values or null (global shutter); absent in Frames written before it. A variable list, as distortion
    ("rolling_shutter", pa.list_(pa.float64())),
])

FRAME_SCHEMA = pa.schema([
    ("frame_id", pa.string()),
    ("sequence", pa.string()),
    ("timestamp_us", pa.int64()),
    ("n_points", pa.int64()),
    ("points", pa.large_list(pa.float32())),
    ("ring", pa.large_list(pa.uint8())),
    ("gt_label", pa.large_list(pa.uint8())),
    ("gt_instance", pa.large_list(pa.int32())),
    ("cameras", pa.list_(CAMERA_TYPE)),
])

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])


def _flat(a: Any, dtype: Any) -> list | None:
    return None if a is None else np.asarray(a, dtype=dtype).reshape(-1)


def frames_to_table(rows: list[dict]) -> pa.Table:
    """Frame rows (row form above) -> Arrow table with FRAME_SCHEMA."""
    cols: dict[str, list] = {name: [] for name in FRAME_SCHEMA.names}
    for r in rows:
        pts = np.asarray(r["points"], dtype=np.float32).reshape(-1)
        cols["frame_id"].append(r["frame_id"])
        cols["sequence"].append(r.get("sequence", ""))
        cols["timestamp_us"].append(int(r.get("timestamp_us", 0)))
        cols["n_points"].append(len(pts) // 4 if len(pts) % 4 == 0 else -1)
        cols["points"].append(pts)
        for key, dt in (("ring", np.uint8), ("gt_label", np.uint8), ("gt_instance", np.int32)):
            cols[key].append(_flat(r.get(key), dt))
        cols["cameras"].append([{
            "name": c["name"], "image": c["image"], "width": int(c["width"]), "height": int(c["height"]),
            "K": np.asarray(c["K"], dtype=np.float64).reshape(-1).tolist(),
            "T_cam_lidar": np.asarray(c["T_cam_lidar"], dtype=np.float64).reshape(-1).tolist(),
            "timestamp_us": int(c.get("timestamp_us", r.get("timestamp_us", 0))),
            "gt_semantic": c.get("gt_semantic"), "gt_instance": c.get("gt_instance"),
            "distortion": None if c.get("distortion") is None else _flat(c["distortion"], np.float64).tolist(),
            "rolling_shutter": (None if c.get("rolling_shutter") is None
                                else _flat(c["rolling_shutter"], np.float64).tolist()),
        } for c in r["cameras"]])
    arrays = []
    for fld in FRAME_SCHEMA:
        if fld.name in ("points", "ring", "gt_label", "gt_instance"):
            arrays.append(_large_list(cols[fld.name], fld.type))
        else:
            arrays.append(pa.array(cols[fld.name], type=fld.type))
    return pa.Table.from_arrays(arrays, schema=FRAME_SCHEMA)


def _large_list(values: list[np.ndarray | None], typ: pa.DataType) -> pa.Array:
    """Build a large_list array from numpy arrays without a Python-object round trip."""
    value_type = typ.value_type
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = [v for v in values if v is not None and len(v)]
    data = np.concatenate(flat) if flat else np.zeros(0, dtype=value_type.to_pandas_dtype())
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(data, type=value_type), mask=mask)


def _list_np(col: pa.ChunkedArray | pa.Array, i: int, dtype: Any) -> np.ndarray | None:
    scalar = col[i]
    if not scalar.is_valid:
        return None
    return np.asarray(scalar.values.to_numpy(zero_copy_only=False), dtype=dtype)


def table_to_frames(table: pa.Table) -> list[dict]:
    """Arrow table with FRAME_SCHEMA columns -> Frame rows (numpy arrays, (N, 4) points)."""
    table = table.combine_chunks()
    out = []
    cams = table.column("cameras").to_pylist()
    for i in range(table.num_rows):
        pts = _list_np(table.column("points"), i, np.float32)
        n = int(table.column("n_points")[i].as_py())
        row = {
            "frame_id": table.column("frame_id")[i].as_py(),
            "sequence": table.column("sequence")[i].as_py(),
            "timestamp_us": int(table.column("timestamp_us")[i].as_py()),
            "points": pts.reshape(-1, 4) if pts is not None and len(pts) == 4 * max(n, 0) else pts,
            "ring": _list_np(table.column("ring"), i, np.uint8),
            "gt_label": _list_np(table.column("gt_label"), i, np.uint8),
            "gt_instance": _list_np(table.column("gt_instance"), i, np.int32),
            "cameras": [],
        }
        for c in cams[i] or []:
            c = dict(c)
            c["K"] = np.asarray(c["K"], dtype=np.float64).reshape(3, 3)
            c["T_cam_lidar"] = np.asarray(c["T_cam_lidar"], dtype=np.float64).reshape(4, 4)
            c["distortion"] = camera_distortion(c)
            c["rolling_shutter"] = camera_rolling_shutter(c)
            row["cameras"].append(c)
        out.append(row)
    return out


def camera_distortion(camera: dict) -> np.ndarray:
    """(5,) float64 k1, k2, p1, p2, k3 of a camera record; zeros (pinhole) when it has none."""
    d = camera.get("distortion")
    return np.zeros(5) if d is None else np.asarray(d, dtype=np.float64).reshape(-1)


def camera_rolling_shutter(camera: dict) -> np.ndarray | None:
    """(9,) float64 rolling-shutter record of a camera record (contract above), or None (global shutter) when it has
    none."""
    rs = camera.get("rolling_shutter")
    return None if rs is None else np.asarray(rs, dtype=np.float64).reshape(-1)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8 (colour) or HxW (single channel; 16-bit PNGs stay uint16)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im, dtype=np.uint16) if im.mode != "I" else np.asarray(im).astype(np.uint16)
        if im.mode in ("L", "P"):
            return np.asarray(im)
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A decoded HxW single-channel image as HxWx3 uint8 (the channel repeated); HxWx3 unchanged."""
    return np.repeat(image[:, :, None], 3, axis=2).astype(np.uint8) if image.ndim == 2 else image


def encode_png(array: np.ndarray) -> bytes:
    """HxW uint8/uint16 or HxWx3 uint8 -> PNG bytes (lossless, so labels survive)."""
    from PIL import Image

    array = np.ascontiguousarray(array)
    im = Image.fromarray(array if array.dtype == np.uint16 else array.astype(np.uint8))  # uint16 -> mode I;16
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header without decoding the pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image once all of its data decodes; raises what the decoder raises. A JPEG is
    decoded at 1/8 scale: libjpeg's DCT scaling still entropy-decodes every block, so a truncated or corrupt file fails
    as in a full decode, for the cost of the entropy decoding alone."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        if im.format == "JPEG":
            im.draft(None, (max(size[0] // 8, 1), max(size[1] // 8, 1)))
        im.load()
        return size


def _pinhole_reason(K: np.ndarray) -> str | None:
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        return "K is not a finite 3x3 matrix"
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        return f"K is not a valid pinhole matrix: focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g} must be > 0"
    if abs(K[1, 0]) > 1e-9 or abs(K[2, 0]) > 1e-9 or abs(K[2, 1]) > 1e-9 or abs(K[2, 2] - 1) > 1e-6:
        return "K is not a valid pinhole matrix: expected [[fx, s, cx], [0, fy, cy], [0, 0, 1]]"
    return None


def _rigid_reason(T: np.ndarray, tol: float = 1e-3) -> str | None:
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return "T_cam_lidar is not a finite 4x4 matrix"
    R = T[:3, :3]
    if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-9):
        return "T_cam_lidar is not a rigid transform: last row must be [0, 0, 0, 1]"
    if not np.allclose(R @ R.T, np.eye(3), atol=tol) or abs(np.linalg.det(R) - 1) > tol:
        return "T_cam_lidar is not a rigid transform: rotation part is not orthonormal with det +1"
    return None


def validate_frame(row: dict) -> str | None:
    """The reason this Frame row is unusable, or None when it is valid (row form above)."""
    if not row.get("frame_id"):
        return "missing frame_id"
    pts = row.get("points")
    if pts is None:
        return "no points"
    pts = np.asarray(pts)
    if pts.ndim != 2 or pts.shape[1] != 4:
        return f"points have shape {pts.shape}, expected (N, 4)"
    if len(pts) == 0:
        return "empty sweep: 0 points"
    if not np.all(np.isfinite(pts)):
        return f"points contain NaN/inf ({int((~np.isfinite(pts)).any(axis=1).sum())} points)"
    for key in ("ring", "gt_label", "gt_instance"):
        if row.get(key) is not None and len(row[key]) != len(pts):
            return f"{key} has {len(row[key])} values for {len(pts)} points"
    cams = row.get("cameras") or []
    if not cams:
        return "no cameras"
    for c in cams:
        name = c.get("name", "?")
        try:
            w, h = check_image(c["image"])
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reason, not a crash
            return f"camera {name}: undecodable image ({type(e).__name__}: {e})"
        if (w, h) != (int(c["width"]), int(c["height"])):
            return f"camera {name}: image size {w}x{h} != declared {c['width']}x{c['height']}"
        reason = _pinhole_reason(np.asarray(c["K"], dtype=np.float64).reshape(3, 3))
        if reason:
            return f"camera {name}: {reason}"
        reason = _rigid_reason(np.asarray(c["T_cam_lidar"], dtype=np.float64).reshape(4, 4))
        if reason:
            return f"camera {name}: {reason}"
        d = camera_distortion(c)
        if d.shape != (5,) or not np.all(np.isfinite(d)):
            return f"camera {name}: distortion is not 5 finite coefficients (k1, k2, p1, p2, k3), got {d.tolist()}"
        rs = camera_rolling_shutter(c)
        if rs is not None and (rs.shape != (9,) or not np.all(np.isfinite(rs))):
            return (f"camera {name}: rolling_shutter is not 9 finite values (v_x, v_y, v_z, w_x, w_y, w_z, t0, dt_dx, "
                    f"dt_dy), got {rs.tolist()}")
    return None


def split_valid(rows: list[dict], seen_ids: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(valid rows, rejects {id, reason}); duplicate frame_ids (within `rows` and `seen_ids`) are rejected."""
    seen = set() if seen_ids is None else seen_ids
    good, rejects = [], []
    for r in rows:
        reason = validate_frame(r)
        if reason is None and r["frame_id"] in seen:
            reason = "duplicate frame_id"
        if reason is None:
            seen.add(r["frame_id"])
            good.append(r)
        else:
            rejects.append({"id": str(r.get("frame_id", "")), "reason": reason})
    return good, rejects


def rejects_table(rejects: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"id": str(r["id"]), "reason": str(r["reason"])} for r in rejects],
                                schema=REJECT_SCHEMA)
