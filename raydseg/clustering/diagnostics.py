"""How good the pseudo-classes are: purity of the painted pseudo-labels against ground truth (with a random-cluster
control), and a montage of each cluster's most central segments, for the cluster stage's metrics and MLflow
artifacts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from raydseg import storage
from raydseg.clustering.pseudolabels import class_of_cluster, montage, purity, segment_purity, segment_thumbnail
from raydseg.data.frame_lookup import camera_records
from raydseg.data.schema import decode_image, encode_png
from raydseg.parts import part_names

PURITY_MAX_IMAGES = 200  # images scored against ground truth (a sample is enough for a 3-digit figure)


def montage_png(x: np.ndarray, res, keys: pa.Table, frames_dir: str, seg_dir: str, index: dict[str, str],
                per_cluster: int, px: int, ground_class: bool) -> bytes:
    """Per cluster (one row, labelled with its pseudo-class and size), the `per_cluster` segments nearest to its
    centroid as masked `px`-pixel thumbnails. x (N, D) descriptors, res a KMeansResult, keys (N,) frame_id, camera,
    segment_id; images from `frames_dir`, segment images from `seg_dir` (the parts named by `index`)."""
    d2 = ((x - res.centroids[res.labels]) ** 2).sum(1)
    picks: dict[int, list[int]] = {}
    for j in range(len(res.centroids)):
        members = np.nonzero(res.labels == j)[0]
        picks[j] = members[np.argsort(d2[members], kind="stable")[:per_cluster]].tolist()
    wanted = sorted({i for v in picks.values() for i in v})
    fids, cams_, sids = keys["frame_id"].to_pylist(), keys["camera"].to_pylist(), keys["segment_id"].to_pylist()
    images = camera_records(frames_dir, index, [fids[i] for i in wanted])
    segs: dict[tuple[str, str], bytes] = {}
    need = {(fids[i], cams_[i]) for i in wanted}
    for part in sorted({index[f] for f, _ in need if f in index}):
        t = storage.read_table(storage.join(seg_dir, part), columns=["frame_id", "camera", "segment_ids"])
        for r in t.to_pylist():
            if (r["frame_id"], r["camera"]) in need:
                segs[(r["frame_id"], r["camera"])] = r["segment_ids"]
    thumbs, names = [], []
    for j, members in picks.items():
        row = []
        for i in members:
            key = (fids[i], cams_[i])
            if key in images and key in segs:
                row.append(segment_thumbnail(decode_image(images[key]["image"]), decode_image(segs[key]), sids[i],
                                             px))
        thumbs.append(row)
        names.append(f"{int(class_of_cluster(j, ground_class))} (n={int(res.counts[j])})")
    return encode_png(montage(thumbs, names, px))


def purity_metrics(pl_dir: str, keys: pa.Table, classes: np.ndarray, seed: int,
                   max_images: int = PURITY_MAX_IMAGES) -> dict[str, float]:
    """Pseudo-label purity against the ground truth of the first `max_images` labelled images ({} without gt):
    `purity` over all labelled pixels (ground class included), `purity_segments` over segment pixels and
    `purity_random` for the same segments under randomly permuted clusters (the control)."""
    by_image: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for f, c, sid, k in zip(keys["frame_id"].to_pylist(), keys["camera"].to_pylist(),
                            keys["segment_id"].to_pylist(), classes.tolist()):
        ids, cls = by_image.setdefault((f, c), ([], []))
        ids.append(sid)
        cls.append(k)
    labels, gts, segs = [], [], []
    for name in part_names(pl_dir):
        t = storage.read_table(storage.join(pl_dir, name), columns=["frame_id", "camera", "label", "segment_ids",
                                                                     "gt_semantic"])
        for f, c, lab, sid, gt in zip(*(t[n].to_pylist() for n in t.column_names)):
            if gt is None or len(labels) >= max_images:
                continue
            gt_img = decode_image(gt)
            ids, cls = by_image.get((f, c), ([], []))
            labels.append(decode_image(lab))
            gts.append(gt_img)
            segs.append((decode_image(sid).astype(np.int64), gt_img, np.array(ids, np.int64), np.array(cls, np.int64)))
    if not labels:
        return {}
    seg_purity, control = segment_purity(segs, seed)
    return {"purity": purity(labels, gts), "purity_segments": seg_purity, "purity_random": control,
            "purity_images": float(len(labels))}
