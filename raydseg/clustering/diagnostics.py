"""How good the pseudo-classes are: purity of the painted pseudo-labels against ground truth (with a random-cluster
control), and a montage of each cluster's most central segments, for the cluster stage's metrics and MLflow
artifacts."""
from __future__ import annotations

import numpy as np

from raydseg import storage
from raydseg.clustering.assignments import NO_SEGMENTS, read_assignments
from raydseg.clustering.pseudolabels import class_of_cluster, montage, purity, segment_purity, segment_thumbnail
from raydseg.data.frame_lookup import camera_records
from raydseg.data.schema import decode_image, encode_png
from raydseg.parts import part_names

PURITY_MAX_IMAGES = 200  # images scored against ground truth (a sample is enough for a 3-digit figure)


def montage_png(picks: list[list[tuple[str, str, int]]], counts: np.ndarray, frames_dir: str, seg_dir: str,
                index: dict[str, str], px: int, n_ground: int) -> bytes:
    """Per cluster (one row, labelled with its pseudo-class and size `counts[j]`), its picked segments (frame_id,
    camera, segment_id; KMeansResult.nearest: nearest to the centroid first) as masked `px`-pixel thumbnails;
    images from `frames_dir`, segment images from `seg_dir` (the parts named by `index`)."""
    need = {(f, c) for row in picks for f, c, _ in row}
    images = camera_records(frames_dir, index, [f for f, _ in need])
    segs: dict[tuple[str, str], bytes] = {}
    for part in sorted({index[f] for f, _ in need if f in index}):
        t = storage.read_table(storage.join(seg_dir, part), columns=["frame_id", "camera", "segment_ids"])
        for r in t.to_pylist():
            if (r["frame_id"], r["camera"]) in need:
                segs[(r["frame_id"], r["camera"])] = r["segment_ids"]
    thumbs, names = [], []
    for j, row in enumerate(picks):
        thumbs.append([segment_thumbnail(decode_image(images[(f, c)]["image"]), decode_image(segs[(f, c)]), sid, px)
                       for f, c, sid in row if (f, c) in images and (f, c) in segs])
        names.append(f"{int(class_of_cluster(j, n_ground))} (n={int(counts[j])})")
    return encode_png(montage(thumbs, names, px))


def purity_metrics(pl_dir: str, assign_dir: str, index: dict[str, str], seed: int,
                   max_images: int = PURITY_MAX_IMAGES) -> dict[str, float]:
    """Pseudo-label purity against the ground truth of the first `max_images` labelled images ({} without gt):
    `purity` over all labelled pixels (ground class included), `purity_segments` over segment pixels and
    `purity_random` for the same segments under randomly permuted clusters (the control). Reads the assignments
    of those images' frames only (`index`: frame_id -> part name)."""
    labels, gts, segs = [], [], []
    for name in part_names(pl_dir):
        if len(labels) >= max_images:
            break
        t = storage.read_table(storage.join(pl_dir, name), columns=["frame_id", "camera", "label", "segment_ids",
                                                                     "gt_semantic"])
        rows = [r for r in zip(*(t[n].to_pylist() for n in t.column_names)) if r[4] is not None]
        rows = rows[:max_images - len(labels)]
        lookup = read_assignments(assign_dir, [index[f] for f, *_ in rows if f in index])
        for f, c, lab, sid, gt in rows:
            gt_img = decode_image(gt)
            ids, cls = lookup.get((f, c), NO_SEGMENTS)
            labels.append(decode_image(lab))
            gts.append(gt_img)
            segs.append((decode_image(sid).astype(np.int64), gt_img, ids, cls))
    if not labels:
        return {}
    seg_purity, control = segment_purity(segs, seed)
    return {"purity": purity(labels, gts), "purity_segments": seg_purity, "purity_random": control,
            "purity_images": float(len(labels))}
