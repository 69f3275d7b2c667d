"""Training data: `cluster/pseudolabels/part-*.parquet` as a raydseg.train.feed.Feed (decoded and augmented in Ray
Data tasks, in a seeded order; see that module).

Rows are frame x camera: `image` (PNG/JPEG bytes), `label` (PNG uint8 pseudo-classes, 255 = ignore),
`segment_ids` (PNG uint16, 0 = no segment). A deterministic hash of `frame_id` holds out a fraction of the frames
for validation (`is_val`); training batches never contain them. Augmentation (random resized crop, horizontal
flip, photometric jitter, degraded views) is torchvision v2's ops on tv_tensors, with parameters drawn from each
sample's own generator, never on the driver.
"""
from __future__ import annotations

import zlib
from functools import partial
from typing import Any

import numpy as np

from raydseg.train.feed import Feed, part_files


def is_val(frame_id: str, val_fraction: float) -> bool:
    """Deterministic held-out split by frame (all cameras of a frame fall on the same side)."""
    return (zlib.crc32(frame_id.encode()) % 10_000) < round(val_fraction * 10_000)


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(y0, x0, ch, cw): a crop of area fraction ~U(scale) of min(h, w)^2 and aspect ~logU(ratio), inside the image."""
    side = min(h, w)
    area = side * side * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
    cw = int(np.clip(round(np.sqrt(area * aspect)), 1, w))
    ch = int(np.clip(round(np.sqrt(area / aspect)), 1, h))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw


def photometric_jitter(image: Any, rng: np.random.Generator, strength: float) -> Any:
    """Brightness, contrast and saturation factors drawn in [1 - s, 1 + s], applied in that order to a uint8
    (3, H, W) tensor / tv_tensors.Image with torchvision v2's ops."""
    import torchvision.transforms.v2.functional as TF

    if strength <= 0:
        return image
    for op in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        image = op(image, float(rng.uniform(1 - strength, 1 + strength)))
    return image


def night_exposure(image: np.ndarray, exposure: float, lights: list[tuple[float, float, float, float]],
                   shot: float, read: float, noise: np.ndarray | None) -> np.ndarray:
    """A uint8 (H, W, 3) view re-exposed in linear light (sRGB as gamma 2.2): scaled by `exposure`, plus light pools
    (cy, cx, sigma px, peak): Gaussian gain fields of height `peak`, then Poisson-Gaussian sensor noise of variance
    shot * x + read (x linear, 0..1), `noise` standard normals of the image's shape (None: noise-free)."""
    h, w = image.shape[:2]
    gain = np.full((h, w), exposure, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for cy, cx, sigma, peak in lights:
        gain += peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
    lin = np.clip((image.astype(np.float32) / 255.0) ** 2.2 * gain[:, :, None], 0, 1)
    if noise is not None:
        lin = lin + noise * np.sqrt(shot * lin + read)
    return (np.clip(lin, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def low_light_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (H, W, 3) day view as a night shot (`night_exposure`): exposure log-uniform in [1/300, 1/10]; 0-4 light
    pools (lamps, headlights) of peak gain log-uniform in [1/20, 1] and sigma 3-15 % of the image; the shot / read noise
    ranges of Brooks et al. 2019 ("Unprocessing images"). A generic low-light model drawn from wide ranges, not the
    renderer's night."""
    h, w = image.shape[:2]
    exposure = float(np.exp(rng.uniform(np.log(1 / 300), np.log(1 / 10))))
    lights = [(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.03, 0.15) * max(h, w),
               float(np.exp(rng.uniform(np.log(1 / 20), 0)))) for _ in range(int(rng.integers(0, 5)))]
    log_shot = rng.uniform(np.log(1e-4), np.log(1.2e-2))
    read = float(np.exp(2.18 * log_shot + 1.20 + rng.normal(0, 0.26)))
    return night_exposure(image, exposure, lights, float(np.exp(log_shot)), read,
                          rng.standard_normal(image.shape, dtype=np.float32))


def degraded_view(image: np.ndarray, rng: np.random.Generator, strength: float, lowlight: float = 0.0
                  ) -> np.ndarray:
    """A photometrically degraded copy of a uint8 (H, W, 3) view, for training that must hold in poor light and
    visibility. With probability `lowlight` it is `low_light_view`; otherwise each of these applies with
    probability 0.5, with a magnitude u drawn in [0, strength] (0..1):
    gamma 1 + 2u or 1 / (1 + 2u) (darker or brighter), brightness x (1 - 0.7u), contrast x (1 - 0.7u), a uniform
    haze (blend of weight 0.7u towards a grey level in [100, 230]), Gaussian blur (sigma 2u px) and sensor noise
    (sigma 15u grey levels). Generic degradations (torchvision v2 ops), not the renderer's night or fog model.
    Parameters come from `rng`, so the view is seeded like the rest of the sample (lowlight 0 draws nothing more)."""
    if strength <= 0:
        return image
    if lowlight > 0 and rng.random() < lowlight:
        return low_light_view(image, rng)
    import torch
    import torchvision.transforms.v2.functional as TF

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    u = lambda: float(rng.uniform(0, strength))  # noqa: E731
    if rng.random() < 0.5:
        gamma = 1 + 2 * u()
        x = TF.adjust_gamma(x, gamma if rng.random() < 0.5 else 1 / gamma)
    if rng.random() < 0.5:
        x = TF.adjust_brightness(x, 1 - 0.7 * u())
    if rng.random() < 0.5:
        x = TF.adjust_contrast(x, 1 - 0.7 * u())
    if rng.random() < 0.5:
        x = TF.gaussian_blur(x, [7, 7], [max(2 * u(), 0.1)])
    out = x.permute(1, 2, 0).numpy().astype(np.float32)
    if rng.random() < 0.5:
        a = 0.7 * u()
        out = (1 - a) * out + a * rng.uniform(100, 230)
    if rng.random() < 0.5:
        out = out + rng.normal(0, 15 * u(), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def augment_example(image: np.ndarray, label: np.ndarray, segments: np.ndarray | None, rng: np.random.Generator,
                    crop: int, scale: tuple[float, float], flip: bool, jitter: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One training view: (crop, crop, 3) uint8, (crop, crop) uint8 labels, (crop, crop) int32 segment ids.

    torchvision v2's ops on tv_tensors.Image (bilinear, antialiased) and tv_tensors.Mask (nearest with pixel-centre
    sampling, NEAREST_EXACT, so labels stay on their pixels); the parameters come from `rng`, not torch's global
    generator, so that each sample's view is seeded (raydseg.train.feed)."""
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import InterpolationMode

    h, w = label.shape
    y0, x0, ch, cw = random_resized_crop_box(h, w, rng, scale)
    img = tv_tensors.Image(torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1))
    img = TF.resized_crop(img, y0, x0, ch, cw, [crop, crop], antialias=True)
    planes = [torch.from_numpy(label.astype(np.int32))]
    if segments is not None:
        planes.append(torch.from_numpy(segments.astype(np.int32)))
    masks = TF.resize(TF.crop(tv_tensors.Mask(torch.stack(planes)), y0, x0, ch, cw), [crop, crop],
                      interpolation=InterpolationMode.NEAREST_EXACT)
    if flip and rng.random() < 0.5:
        img, masks = TF.horizontal_flip(img), TF.horizontal_flip(masks)
    img = photometric_jitter(img, rng, jitter)
    masks = masks.numpy()
    return (np.ascontiguousarray(img.permute(1, 2, 0).numpy()), masks[0].astype(np.uint8),
            masks[1] if segments is not None else None)


def train_samples(index: Any, *, val_fraction: float) -> list[tuple[int, int]]:
    """Feed.list_samples: the rows of a pseudo-label part (index columns: frame_id) that are not held out."""
    return [(i, 0) for i, fid in enumerate(index.column("frame_id").to_pylist()) if not is_val(fid, val_fraction)]


def make_views(rows: list[dict[str, Any]], subs: list[int], rngs: list[np.random.Generator], *, crop: int,
               scale_min: float, scale_max: float, flip: bool, jitter: float, with_segments: bool,
               degrade: float = 0.0, lowlight: float = 0.0) -> dict[str, np.ndarray]:
    """Feed.make_batch: decode and augment each pseudo-label row with its own generator.

    Out: image (B, crop, crop, 3) uint8, label (B, crop, crop) uint8 [, segments (B, crop, crop) int32]
    [, degraded (B, crop, crop, 3) uint8: `degraded_view(image, degrade, lowlight)`, when degrade > 0].
    """
    from raydseg.data.schema import decode_image  # pyarrow: imported where rows are decoded, so that the
    # augmentation above imports on a machine with torch alone (the device checks)

    images, labels, segs, degraded = [], [], [], []
    for row, rng in zip(rows, rngs):
        image = decode_image(row["image"])
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2).astype(np.uint8)
        seg = decode_image(row["segment_ids"]) if with_segments else None
        im, lb, sg = augment_example(image, decode_image(row["label"]), seg, rng, crop, (scale_min, scale_max),
                                     flip, jitter)
        images.append(im)
        labels.append(lb)
        segs.append(sg)
        if degrade > 0:
            degraded.append(degraded_view(im, rng, degrade, lowlight))
    out = {"image": np.stack(images), "label": np.stack(labels)}
    if degraded:
        out["degraded"] = np.stack(degraded)
    if with_segments:
        out["segments"] = np.stack(segs)
    return out


def train_feed(pl_dir: str, t: Any, with_segments: bool = False) -> Feed:
    """The training samples of the pseudo-label parts (held-out frames left out) and their augmentation, from the
    stage's config section `t` (a raydseg.config.TrainConfig)."""
    return Feed(paths=tuple(part_files(pl_dir, "pseudo-label")), index_columns=("frame_id",),
                list_samples=partial(train_samples, val_fraction=t.val_fraction),
                columns=("image", "label") + (("segment_ids",) if with_segments else ()), make_batch=make_views,
                kwargs=dict(crop=t.crop_size, scale_min=t.scale_min, scale_max=t.scale_max, flip=t.flip,
                            jitter=t.jitter, with_segments=with_segments, degrade=t.degrade,
                            lowlight=t.lowlight))


def load_val_rows(pl_dir: str, val_fraction: float, max_images: int) -> list[dict[str, Any]]:
    """Held-out rows `{frame_id, camera, image (H,W,3) uint8, label (H,W) uint8}` (read on rank 0, few images)."""
    from raydseg import storage
    from raydseg.data.schema import decode_image

    rows: list[dict[str, Any]] = []
    for path in part_files(pl_dir, "pseudo-label"):
        ids = storage.read_table(path, columns=["frame_id"]).column("frame_id").to_pylist()
        if not any(is_val(f, val_fraction) for f in ids):
            continue
        d = storage.read_table(path, columns=["frame_id", "camera", "image", "label"]).to_pydict()
        for i, fid in enumerate(d["frame_id"]):
            if is_val(fid, val_fraction):
                rows.append({"frame_id": fid, "camera": d["camera"][i], "image": decode_image(d["image"][i]),
                             "label": decode_image(d["label"][i])})
                if len(rows) >= max_images:
                    return rows
    return rows
