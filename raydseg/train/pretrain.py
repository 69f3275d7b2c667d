"""Self-supervised pretraining of the ViT backbone on Ray Train (the `pretrain` stage): data, tasks, k-NN probe,
export.

- Data: every camera image of the ingest stage's frames (no labels), or (`inputs: segment_crops`) the masked crop
  of every LiDAR segment, what the features stage shows the ViT (`segment_crop_part`, written once by the stage);
  a raydseg.train.feed.Feed decoded and multi-cropped (raydseg.train.dino.MultiCrop) in Ray tasks in a seeded
  order, never on the driver.
- Tasks (raydseg.train.engine.Task for the shared loop raydseg.train.loop.fit), by `objective`:
  - `dino_task`: the student is a timm ViT + DINO head (raydseg.models.dino_head); the teacher is its EMA (momentum
    cosine-scheduled to 1); the step function is `raydseg.train.dino.DinoStep`; per step the weight decay follows
    its cosine schedule, gradients are clipped and the head's last layer stays frozen for `freeze_last_layer_steps`;
  - `mae_task`: a masked autoencoder (raydseg.models.mae) on `mae_views` global crops of each image, step
    `raydseg.train.mae.MaeStep`.
- k-NN probe: LiDAR segments (the proposals stage's pure functions) of a few frames with ground truth, their
  majority class (`knn_probe`: ingest frames, or with `knn_drives` one frame of each of many synthetic drives);
  every `knn_every` steps rank 0 describes them with the backbone being trained (DINO's teacher, MAE's encoder;
  masked crops, `knn_descriptor`: the features stage's descriptor) and logs the k-NN accuracy
  (raydseg.eval.knn, train / test split by drive).
- Export: that backbone as a timm-layout safetensors file `<out_dir>/backbone.safetensors`, loadable by
  `features.weights` / `teacher.weights` (raydseg.features.backbone) and by
  `timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...))`.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from raydseg.features.backbone import input_stats, input_stats_metadata, is_random_init, set_input_stats
from raydseg.features.pooling import CROP_DESCRIPTORS
from raydseg.models.dino_head import build_dino_model
from raydseg.models.ema import EMA
from raydseg.train.dino import (DINOLoss, DinoStep, MultiCrop, cancel_last_layer_gradients, clip_gradients,
                                cosine_schedule, crop_names, param_groups, teacher_temp_schedule)
from raydseg.train.engine import Task
from raydseg.train.feed import ByteLRU, Feed, part_files

CHECKPOINT = "backbone.safetensors"
PROBE = "knn_probe.pt"


# ---------------------------------------------------------------------------------------------------------- data
def camera_samples(index: Any) -> list[tuple[int, int]]:
    """Feed.list_samples: every (frame row, camera) of a frames part (index column: the cameras' names)."""
    return [(i, j) for i, cams in enumerate(index.column("cameras").to_pylist()) for j in range(len(cams or []))]


MULTICROP_KEYS = ("global_crop_size", "local_crop_size", "local_crops", "global_crop_scale_min",
                  "local_crop_scale_min", "local_crop_scale_max", "photometric", "photometric_device", "objective")


def make_multicrop(p: dict[str, Any]) -> MultiCrop:
    """The MultiCrop of the `pretrain` section `p` (a dict holding at least MULTICROP_KEYS; without `objective`:
    DINO's, with its blur; a masked autoencoder's crops are not blurred)."""
    return MultiCrop(p["global_crop_size"], p["local_crop_size"], p["local_crops"], (p["global_crop_scale_min"], 1.0),
                     (p["local_crop_scale_min"], p["local_crop_scale_max"]),
                     p["photometric"] and not p["photometric_device"], blur=p.get("objective", "dino") == "dino")


def as_rgb(image: np.ndarray | bytes) -> np.ndarray:
    """An (H, W, 3) uint8 array, or the bytes of an encoded image (PNG / JPEG, decoded with PIL) -> (H, W, 3) uint8."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image

        return np.array(Image.open(io.BytesIO(image)).convert("RGB"))  # a writable copy, as torch wants
    return image


# An image is decoded once per loader process, not once per epoch, while the encoded and decoded sizes fit
# DECODED_CACHE_BYTES; keyed by its encoded bytes (bytes objects keep their hash).
DECODED_CACHE_BYTES = 512 << 20
_DECODED = ByteLRU(DECODED_CACHE_BYTES)


def decoded_rgb(image: np.ndarray | bytes) -> np.ndarray:
    """`as_rgb(image)`, from the cache for encoded bytes seen before in this process (callers must not write to it)."""
    if not isinstance(image, bytes):
        return as_rgb(image)

    def decode() -> tuple[np.ndarray, int]:
        rgb = as_rgb(image)
        return rgb, len(image) + rgb.nbytes

    return _DECODED.get(image, decode)


def seeded_views(crop: MultiCrop, image: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
    """The multi-crop views {global_0, global_1, local_0, ...: (3, s, s) uint8} of one (H, W, 3) uint8 image, drawn
    from torch seeded by `seed` (torchvision's v2 transforms draw from torch's RNG), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues a CUDA seed
        views = crop(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return dict(zip(crop_names(crop.n_local), views))


def _stacked_views(images: list[np.ndarray | bytes], rngs: list[np.random.Generator], crop_kw: dict[str, Any]
                   ) -> dict[str, np.ndarray]:
    crop = make_multicrop(crop_kw)
    views = [seeded_views(crop, decoded_rgb(image), int(rng.integers(2 ** 63))) for image, rng in zip(images, rngs)]
    return {k: torch.stack([v[k] for v in views]).numpy() for k in views[0]}


def multicrop_views(rows: list[dict[str, Any]], subs: list[int], rngs: list[np.random.Generator],
                    **crop_kw: Any) -> dict[str, np.ndarray]:
    """Feed.make_batch: camera `sub` of each frame row -> its multi-crop views {global_0, global_1, local_0, ...:
    (B, 3, s, s) uint8}, each image's crops drawn from torch seeded by its own generator. `crop_kw`: MULTICROP_KEYS."""
    return _stacked_views([row["cameras"][sub]["image"] for row, sub in zip(rows, subs)], rngs, crop_kw)


def pretrain_feed(frames_dir: str, p: dict[str, Any]) -> Feed:
    """Every camera image of the frames of `frames_dir`, multi-cropped (the `pretrain` section `p` as a dict)."""
    return Feed(paths=tuple(part_files(frames_dir, "frame")), index_columns=("cameras.list.element.name",),
                list_samples=camera_samples, columns=("cameras",), make_batch=multicrop_views,
                kwargs={k: p[k] for k in MULTICROP_KEYS})


SEGMENT_CROPS = "segment_crops"  # the folder of `inputs: segment_crops` under the stage's out_dir


def segment_crops(image: np.ndarray, segment_ids: np.ndarray, size: int, min_pixels: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image, (H, W) segment ids (0 = none) -> (ids (S,), crops (S, size, size, 3) uint8): the
    features stage's masked crops (raydseg.features.pooling.masked_crops) of the segments of >= min_pixels pixels, in
    id order, mapped back to uint8, so that outside the mask is the ImageNet mean colour (zero after normalisation)."""
    from raydseg.features.pooling import masked_crops, normalize_image

    ids = np.nonzero(np.bincount(segment_ids.ravel()) >= min_pixels)[0]
    ids = ids[ids > 0]
    if not len(ids):
        return ids, np.zeros((0, size, size, 3), np.uint8)
    crops = masked_crops(normalize_image(image), segment_ids, ids, size)
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in input_stats(None))  # normalize_image's
    return ids, (255 * (crops * std + mean)).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def segment_crop_part(table: Any, proposals: dict[str, Any], size: int, min_pixels: int, seed: int = 0
                      ) -> tuple[dict[str, Any], list[dict]]:
    """raydseg.parts.map_parts fn: one frames part -> {SEGMENT_CROPS: (frame_id, camera, seg_id, crop PNG) rows}, with
    the proposals stage's segments (`frame_outputs`; its rejects, and a frame that raises, are rejects)."""
    import pyarrow as pa

    from raydseg.config import config_from_dict
    from raydseg.data.schema import decode_image, encode_png, table_to_frames
    from raydseg.geometry.proposals import frame_outputs

    cfg = config_from_dict({"proposals": proposals}).proposals
    rows: list[dict[str, Any]] = []
    rejects: list[dict] = []
    for frame in table_to_frames(table):
        try:
            seg_rows, _, _, rej = frame_outputs(frame, cfg, seed)
        except Exception as e:  # noqa: BLE001 - one broken sweep is a reject, as in the proposals stage
            rejects.append({"id": frame["frame_id"], "reason": f"proposals failed: {type(e).__name__}: {e}"})
            continue
        rejects += rej
        images = {cam["name"]: cam["image"] for cam in frame["cameras"]}
        for r in seg_rows:
            ids, crops = segment_crops(as_rgb(images[r["camera"]]), decode_image(r["segment_ids"]), size, min_pixels)
            rows += [{"frame_id": frame["frame_id"], "camera": r["camera"], "seg_id": int(i), "crop": encode_png(c)}
                     for i, c in zip(ids, crops)]
    schema = pa.schema([("frame_id", pa.string()), ("camera", pa.string()), ("seg_id", pa.int32()),
                        ("crop", pa.binary())])
    return {SEGMENT_CROPS: pa.Table.from_pylist(rows, schema=schema)}, rejects


def row_samples(index: Any) -> list[tuple[int, int]]:
    """Feed.list_samples: every row of a part."""
    return [(i, 0) for i in range(index.num_rows)]


def crop_views(rows: list[dict[str, Any]], subs: list[int], rngs: list[np.random.Generator], **crop_kw: Any
               ) -> dict[str, np.ndarray]:
    """Feed.make_batch: each segment-crop row -> the multi-crop views of its crop (as `multicrop_views`)."""
    return _stacked_views([row["crop"] for row in rows], rngs, crop_kw)


def segment_crop_feed(crops_dir: str, p: dict[str, Any]) -> Feed:
    """Every segment crop of `crops_dir` (`segment_crop_part`'s parts), multi-cropped (the `pretrain` section `p`)."""
    return Feed(paths=tuple(part_files(crops_dir, "segment crop")), index_columns=("seg_id",),
                list_samples=row_samples, columns=("crop",), make_batch=crop_views,
                kwargs={k: p[k] for k in MULTICROP_KEYS})


# ----------------------------------------------------------------------------------------------------- k-NN probe
def build_knn_probe(frames_dir: str, proposals_cfg: Any, n_frames: int, seed: int = 0, min_pixels: int = 16
                    ) -> dict[str, Any]:
    """LiDAR segments of `n_frames` evenly spaced frames that have ground truth, with their majority class.

    Returns {frame_ids: [str], sequences: {frame_id: sequence}, images: [(H, W, 3) uint8 tensors], segment_ids:
    [(H, W) int32 tensors], seg_image: (S,) int64, seg_id: (S,) int64, seg_class: (S,) int64} (one image per frame x
    camera with `gt_semantic`; segments with >= min_pixels pixels and a valid majority class). Empty lists when no
    frame has ground truth.
    """
    from raydseg import storage
    from raydseg.data.schema import decode_image, table_to_frames
    from raydseg.eval.knn import segment_majority_class
    from raydseg.geometry.proposals import camera_segments, frame_seed, sweep_segments

    paths = part_files(frames_dir, "frame")
    ids = [(p, f) for p in paths for f in storage.read_table(p, columns=["frame_id"]).column("frame_id").to_pylist()]
    pick = set(np.unique(np.linspace(0, len(ids) - 1, min(n_frames, len(ids))).round().astype(int)).tolist()) \
        if n_frames > 0 and ids else set()
    wanted: dict[str, set[str]] = {}
    for i in sorted(pick):
        wanted.setdefault(ids[i][0], set()).add(ids[i][1])
    probe: dict[str, Any] = {"frame_ids": [], "sequences": {}, "images": [], "segment_ids": [], "seg_image": [],
                             "seg_id": [], "seg_class": []}
    for path, fids in wanted.items():
        for frame in table_to_frames(storage.read_table(path)):
            if frame["frame_id"] not in fids:
                continue
            pts = np.asarray(frame["points"], np.float32).reshape(-1, 4)
            sw = None
            for cam in frame["cameras"]:
                if cam.get("gt_semantic") is None:
                    continue
                if sw is None:
                    sw = sweep_segments(pts, frame.get("ring"), proposals_cfg, seed=frame_seed(frame["frame_id"], seed))
                out = camera_segments(pts[:, :3], sw, cam["K"], cam["T_cam_lidar"], int(cam["width"]),
                                      int(cam["height"]), proposals_cfg, cam.get("distortion"),
                                      cam.get("rolling_shutter"))
                seg = out["segment_ids"].astype(np.int32)
                sizes = np.bincount(seg.ravel())
                majority = {s: c for s, c in segment_majority_class(seg, decode_image(cam["gt_semantic"])).items()
                            if sizes[s] >= min_pixels}
                if not majority:
                    continue
                image = decode_image(cam["image"])
                image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
                k = len(probe["images"])
                probe["frame_ids"].append(frame["frame_id"])
                probe["sequences"][frame["frame_id"]] = frame.get("sequence") or ""
                probe["images"].append(torch.from_numpy(np.array(image)))  # a writable copy
                probe["segment_ids"].append(torch.from_numpy(seg))
                for s, c in sorted(majority.items()):
                    probe["seg_image"].append(k)
                    probe["seg_id"].append(s)
                    probe["seg_class"].append(c)
    for key in ("seg_image", "seg_id", "seg_class"):
        probe[key] = torch.tensor(probe[key], dtype=torch.int64)
    return probe


def synthetic_drive_probe(cfg: Any, worlds: Sequence[int], drives: int, frames_dir: str) -> dict[str, Any]:
    """The probe (`build_knn_probe`) of one LiDAR frame of each of `drives` train-stream day drives of each synthetic
    world W in `worlds` (what a run with run.seed W, synthetic.n_sequences `drives`, frames_per_sequence 1 and
    conditions [day] ingests: the features stage describes day drives), written as frames to `frames_dir`. Split by
    drive, two worlds of 24 drives test 24 drives against 24, where a run's own 16 frames give 2 against 2. `cfg`: a
    whole config (its synthetic and proposals sections)."""
    import pyarrow.parquet as pq

    from raydseg.data.schema import frames_to_table
    from raydseg.data.sources import synthetic

    syn = cfg.synthetic.model_copy(update={"n_sequences": drives, "frames_per_sequence": 1, "conditions": ["day"]})
    rows = []
    for w in worlds:
        for shard in synthetic.list_shards(syn, w):
            for r in synthetic.generate_sequence(shard, syn):
                r["sequence"], r["frame_id"] = f"w{w}-{r['sequence']}", f"w{w}-{r['frame_id']}"
                rows.append(r)
    os.makedirs(frames_dir, exist_ok=True)
    pq.write_table(frames_to_table(rows), os.path.join(frames_dir, "part-00000.parquet"))
    return build_knn_probe(frames_dir, cfg.proposals, len(rows))


def knn_probe(cfg: Any, frames_dir: str) -> dict[str, Any]:
    """The pretrain stage's probe: `synthetic_drive_probe` of pretrain.knn_drives drives of worlds run.seed and
    run.seed + 1 when set, else `build_knn_probe` of pretrain.knn_frames frames of the ingest's `frames_dir`."""
    p = cfg.pretrain
    if not p.knn_drives:
        return build_knn_probe(frames_dir, cfg.proposals, p.knn_frames, cfg.run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        return synthetic_drive_probe(cfg, [cfg.run.seed, cfg.run.seed + 1], p.knn_drives, tmp)


def probe_knn_accuracy(backbone: torch.nn.Module, probe: dict[str, Any], k: int = 5, crop_size: int = 112,
                       device: str = "cpu", pool: str = "cls") -> dict[str, float]:
    """k-NN accuracy of the probe's segment descriptors (masked crops of `backbone`, [CLS] or mean-pooled: the
    features stage's crop_cls / crop_mean) against their majority ground-truth class; train / test split by drive
    (`scene_split`), as the evaluate stage does."""
    if len(probe["seg_id"]) == 0 or len(set(probe["frame_ids"])) < 2:
        return {}
    return probe_knn_scores(probe, probe_cls_descriptors(backbone, probe, crop_size, device, pool), k)


def probe_cls_descriptors(backbone: torch.nn.Module, probe: dict[str, Any], crop_size: int = 112,
                          device: str = "cpu", pool: str = "cls") -> np.ndarray:
    """(S, D) float32 masked-crop descriptors of the probe's segments (the features stage's crop_cls, or with
    `pool="mean"` its crop_mean), the backbone in eval mode for the pass and then back in its former mode."""
    from raydseg.features.pooling import crop_cls_descriptors

    was_training = backbone.training
    backbone.eval()
    x = probe_descriptors(probe, lambda image, seg, ids: crop_cls_descriptors(
        backbone, image, seg, ids, crop_size=crop_size, device=device, pool=pool), backbone.num_features)
    backbone.train(was_training)
    return x


def probe_descriptors(probe: dict[str, Any], describe: Any, dim: int) -> np.ndarray:
    """(S, dim) float32 descriptors of the probe's segments: describe(image (H, W, 3) uint8, segment_ids (H, W),
    ids (s,)) -> (s, dim) for the segments of each probe image."""
    seg_image, seg_id = probe["seg_image"].numpy(), probe["seg_id"].numpy()
    x = np.zeros((len(seg_id), dim), np.float32)
    for i, (image, seg) in enumerate(zip(probe["images"], probe["segment_ids"])):
        rows = np.nonzero(seg_image == i)[0]
        x[rows] = describe(image.numpy(), seg.numpy(), seg_id[rows])
    return x


def probe_knn_scores(probe: dict[str, Any], x: np.ndarray, k: int = 5, standardise: bool = False
                     ) -> dict[str, float]:
    """k-NN accuracy of descriptors x (S, D) of the probe's segments against their majority class, split by drive
    (`scene_split`, as the evaluate stage). `standardise`: each dimension first shifted and scaled by the train
    side's mean and std (MAE's linear probe normalises its features so, with a BatchNorm without affine)."""
    from raydseg.eval.knn import knn_accuracy, scene_split

    y = probe["seg_class"].numpy()
    is_test = scene_split([probe["frame_ids"][i] for i in probe["seg_image"].numpy()], probe.get("sequences"))
    if standardise:
        x = (x - x[~is_test].mean(0)) / (x[~is_test].std(0) + 1e-6)
    out = knn_accuracy(x[~is_test], y[~is_test], x[is_test], y[is_test], k)
    out["knn_n_segments"] = float(len(y))
    return out


# ------------------------------------------------------------------------------------------------------------ task
def _model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {"weights": config["weights"], "drop_path": config["drop_path"], "out_dim": config["out_dim"],
            "hidden_dim": config["hidden_dim"], "bottleneck_dim": config["bottleneck_dim"],
            "norm_last_layer": config["norm_last_layer"], "use_bn": config["head_bn"]}


def backbone_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The timm-layout state_dict of a DINO model's backbone (fp32, CPU, contiguous)."""
    model = getattr(model, "module", model)
    return {k: v.detach().float().cpu().contiguous() for k, v in model.backbone.state_dict().items()}


def canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its JSON header's keys sorted: safetensors writes the metadata in hash-map
    order, which changes from process to process, so equal tensors and metadata gave files of different sha256."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def save_backbone(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write the backbone of a DINO model as safetensors (`save_safetensors`)."""
    save_safetensors(backbone_state_dict(model), path, metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as safetensors (local or s3:// path), byte-identical for equal tensors and metadata; a local
    file by temp name + rename, without raydseg.storage (pyarrow), so that it runs on a torch + timm machine."""
    from safetensors.torch import save

    data = canonical_safetensors(save(tensors, metadata=metadata or {}))
    if path.startswith("s3://"):
        from raydseg import storage

        storage.write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _probe(config: dict[str, Any], rank: int, probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The k-NN probe on rank 0: `probe`, else the file config["knn_probe"] when set; None elsewhere or when off."""
    if rank != 0 or config["knn_every"] < 0:
        return None
    if probe is None and config.get("knn_probe"):
        from raydseg import storage

        probe = torch.load(io.BytesIO(storage.read_bytes(config["knn_probe"])), map_location="cpu",
                           weights_only=True)
    return probe


def _probe_and_export(config: dict[str, Any], backbone_of: torch.nn.Module, device: torch.device,
                      probe: dict[str, Any] | None) -> tuple[Any, Any]:
    """Task.validate (the k-NN probe every `knn_every` steps and at the end) and Task.export (the backbone of
    `backbone_of`, a module with a `.backbone`, as CHECKPOINT under out_dir and as an MLflow artifact)."""
    steps = int(config["steps"])
    pool = CROP_DESCRIPTORS[config["knn_descriptor"]]

    def validate(done: int, final: bool) -> dict[str, float]:
        every = config["knn_every"]
        if probe is None or not ((every > 0 and done % every == 0) or final):
            return {}
        out = probe_knn_accuracy(backbone_of.backbone, probe, config["knn_k"], config["knn_crop_size"], str(device),
                                 pool)
        return {k: v for k, v in out.items() if k != "knn_n_segments"}

    def export(log: Any, last_loss: float) -> None:
        path = config["out_dir"].rstrip("/") + "/" + CHECKPOINT
        meta = {"backbone": config["backbone"], "format": "timm", "source": f"raydseg pretrain {config['objective']}",
                "steps": str(steps), **input_stats_metadata(backbone_of.backbone)}
        save_backbone(backbone_of, path, meta)
        if log.active_run() is not None:
            with tempfile.TemporaryDirectory() as tmp:
                save_backbone(backbone_of, os.path.join(tmp, CHECKPOINT), meta)
                log.log_artifacts(tmp, "backbone")
            log.log_metric(f"{config['prefix']}final_loss", last_loss, step=steps)

    return validate, export


def _lr_and_wd(config: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """Both objectives' schedules: (make_scheduler: optimiser -> LambdaLR following the cosine lr array with linear
    warmup, wd: (steps,) cosine weight decay weight_decay -> weight_decay_end, set per step in before_update)."""
    steps = int(config["steps"])
    lr = cosine_schedule(config["lr"], config["min_lr"], steps, config["warmup_steps"])
    wd = cosine_schedule(config["weight_decay"], config["weight_decay_end"], steps)
    base_lr = float(config["lr"]) or 1.0
    return (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr[min(s, steps - 1)]) / base_lr)), wd


def with_pretraining_stats(backbone: torch.nn.Module, weights: str) -> torch.nn.Module:
    """`backbone` with the input mean / std it is pretrained on: ImageNet's from random init, as DINO and MAE (timm's
    default for the architecture describes timm's hub weights); a file's or the hub's own otherwise. The steps
    normalise with them, the probe and the features stage read them back (the export writes them to the file)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return set_input_stats(backbone, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if is_random_init(weights) \
        else backbone


def initial_backbone(config: dict[str, Any]) -> torch.nn.Module:
    """The ViT both objectives start from under torch's current seed (`pretrain` section as a dict: backbone,
    weights, drop_path), as `build_dino_model` builds it before its head: the probe's step 0."""
    from raydseg.features.backbone import create_backbone

    return with_pretraining_stats(create_backbone(config["backbone"], config["weights"], dynamic_img_size=True,
                                                  num_classes=0, drop_path_rate=config["drop_path"]),
                                  config["weights"])


def pretrain_task(config: dict[str, Any], device: torch.device, rank: int, probe: dict[str, Any] | None = None
                  ) -> Task:
    """The `pretrain` section's objective (plain dict): `dino_task` or `mae_task`."""
    return (mae_task if config["objective"] == "mae" else dino_task)(config, device, _probe(config, rank, probe))


def dino_task(config: dict[str, Any], device: torch.device, probe: dict[str, Any] | None) -> Task:
    """Student (ViT + DINO head), EMA teacher, DINO loss and schedules; the probe and export use the teacher."""
    steps = int(config["steps"])
    student = build_dino_model(config["backbone"], **_model_kwargs(config))
    with_pretraining_stats(student.backbone, config["weights"])
    ema = EMA(student)  # the teacher: same init, no gradient, eval mode (no drop-path)
    teacher = ema.module.to(device)
    for m in teacher.head.modules():  # the teacher's head normalises with its own batch, as the official code
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    make_scheduler, wd = _lr_and_wd(config)
    momentum = cosine_schedule(config["momentum_teacher"], 1.0, steps)
    temps = teacher_temp_schedule(config["warmup_teacher_temp"], config["teacher_temp"], steps,
                                  config["teacher_temp_warmup_steps"])
    loss = DINOLoss(config["out_dim"], 2 + config["local_crops"], temps, config["student_temp"],
                    config["center_momentum"], centering=config["centering"]).to(device)

    def before_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        optimizer.param_groups[0]["weight_decay"] = float(wd[step])
        grad_norm = clip_gradients(model, config["clip_grad"])
        cancel_last_layer_gradients(model, step, config["freeze_last_layer_steps"])
        return {"grad_norm": grad_norm, "weight_decay": float(wd[step]), "momentum": float(momentum[step])}

    validate, export = _probe_and_export(config, teacher, device, probe)
    mean, std = input_stats(student.backbone)
    step_fn = DinoStep(teacher, loss, config["local_crops"], mean, std,
                       photometric_on_device=config["photometric"] and config["photometric_device"])
    return Task(model=student, step_fn=step_fn,
                make_optimizer=lambda m: torch.optim.AdamW(param_groups(m), lr=config["lr"],
                                                           weight_decay=config["weight_decay"]),
                make_scheduler=make_scheduler, ema=ema,
                ema_momentum=lambda s: float(momentum[min(s, steps - 1)]), before_update=before_update,
                validate=validate, export=export, extra_state=lambda: {"center": loss.center.detach().cpu()},
                load_extra_state=lambda s: loss.center.copy_(s["center"]) if "center" in s else None)


def mae_task(config: dict[str, Any], device: torch.device, probe: dict[str, Any] | None) -> Task:
    """Masked autoencoder (raydseg.models.mae) on both global crops of each image: AdamW with betas (0.9, 0.95) as
    the paper, lr cosine with linear warmup, weight decay cosine weight_decay -> weight_decay_end, gradient clip;
    no EMA. The probe and export use the encoder (the timm backbone) being trained."""
    from raydseg.models.mae import MaskedAutoencoder
    from raydseg.train.mae import MaeStep

    model = MaskedAutoencoder(initial_backbone(config), config["mask_ratio"], config["decoder_dim"],
                              config["decoder_depth"], norm_pix=config["norm_pix_loss"]).train()
    make_scheduler, wd = _lr_and_wd(config)

    def before_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        optimizer.param_groups[0]["weight_decay"] = float(wd[step])
        return {"grad_norm": clip_gradients(model, config["clip_grad"]), "weight_decay": float(wd[step])}

    validate, export = _probe_and_export(config, model, device, probe)
    return Task(model=model, step_fn=MaeStep(*input_stats(model.backbone), views=config["mae_views"]),
                make_optimizer=lambda m: torch.optim.AdamW(param_groups(m), lr=config["lr"], betas=(0.9, 0.95),
                                                           weight_decay=config["weight_decay"]),
                make_scheduler=make_scheduler, before_update=before_update, validate=validate, export=export)


class ImageCrops(torch.utils.data.Dataset):
    """Position p of a seeded endless stream over `images` -> the multi-crop views of its image.

    The stream walks one permutation of the images per epoch (`default_rng([seed, epoch])`), and the crops of
    position p are drawn from torch seeded by (seed, p): the batches are the same for any number of loader workers.
    Items: {global_0, global_1, local_0, ...: (3, s, s) uint8}. `images`: (H, W, 3) uint8 arrays or encoded bytes.
    """

    def __init__(self, images: Sequence[np.ndarray | bytes], config: dict[str, Any], seed: int):
        self.images, self.seed = images, seed
        self.crop = make_multicrop(config)
        self._epoch, self._order = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(position), len(self.images))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        return seeded_views(self.crop, decoded_rgb(self.images[self._order[i]]),
                            int(np.random.default_rng([self.seed, int(position)]).integers(2 ** 63)))


def local_batches(images: Sequence[np.ndarray | bytes], config: dict[str, Any], batch_size: int, steps: int,
                  device: torch.device, seed: int = 0, workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` multi-crop batches of `batch_size` images of the seeded stream `ImageCrops`, on `device`: the
    Ray-free counterpart of `pretrain_feed`, decoded and cropped in `workers` loader processes (0: this one)."""
    loader = torch.utils.data.DataLoader(ImageCrops(images, config, seed), batch_size=batch_size,
                                         sampler=range(steps * batch_size), num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pretrain_local(config: dict[str, Any], images: Sequence[np.ndarray | bytes], device: str = "cpu",
                   probe: dict[str, Any] | None = None, log: Any = print, workers: int = 0) -> list[dict[str, float]]:
    """DINO pretraining in one process on one device, without Ray (a GPU machine with torch + timm only): the same
    task, step function, schedules and export as the stage, images cropped in `workers` loader processes.
    `config`: the `pretrain` section as a dict plus `seed` and `out_dir` (local); `images`: (H, W, 3) uint8 arrays
    or encoded bytes. Returns the metric rows logged every `log_every` steps (step 0: the initial k-NN)."""
    from raydseg.train.engine import train_one_step
    from raydseg.train.loop import NO_MLFLOW
    from raydseg.train.precision import use_bf16

    dev = torch.device(device)
    torch.manual_seed(config["seed"])
    task = pretrain_task(config, dev, 0, probe=probe)
    model = task.model.to(dev).train()
    optimizer = task.make_optimizer(model)
    scheduler = task.make_scheduler(optimizer)
    steps = int(config["steps"])
    batches = local_batches(images, config, config["batch_size"], steps, dev, config["seed"], workers)
    history = [{"step": 0, **task.validate(0, True)}] if probe is not None else []
    t0, seen = time.time(), 0.0
    for step in range(steps):
        out = train_one_step(model, optimizer, batches, task.step_fn, step, amp=use_bf16(config["amp"], dev.type),
                             device_type=dev.type, before_update=task.before_update)
        scheduler.step()
        if task.ema is not None:
            task.ema.update(model, task.ema_momentum(step))
        seen += out.pop("images")
        done = step + 1
        knn_due = config["knn_every"] > 0 and done % config["knn_every"] == 0
        if done % config["log_every"] == 0 or done == steps or knn_due:
            row = {"step": done, **out, "lr": scheduler.get_last_lr()[0], "images_per_s": seen / (time.time() - t0)}
            row.update(task.validate(done, done == steps))
            history.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    task.export(NO_MLFLOW, history[-1]["loss"] if history else float("nan"))
    return history


def pretrain_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function of the pretrain stage."""
    from raydseg.train.loop import fit

    fit(config, pretrain_task)


# ---------------------------------------------------------------------------------------------------------- driver
def train(cfg: Any, frames_dir: str, out_dir: str, *, crops_dir: str = "", tracking_uri: str = "",
          mlflow_run_id: str = "", name: str = "pretrain", callbacks: list | None = None, timeout_s: int = 1800
          ) -> tuple[Any, dict[str, float]]:
    """Pretrain `cfg.pretrain.backbone` on the camera images of `frames_dir`, or with `inputs: segment_crops` on the
    crops of `crops_dir` (`segment_crop_part`'s parts); writes `<out_dir>/backbone.safetensors`. Returns
    (ray.train.Result, k-NN metrics of the initial backbone)."""
    from raydseg import storage
    import mlflow
    from raydseg.train.teacher import run_trainer

    p = cfg.pretrain
    config = p.model_dump()
    config.update(seed=cfg.run.seed, out_dir=out_dir, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id,
                  params={f"pretrain.{k}": v for k, v in p.model_dump().items()}, callbacks=callbacks or [],
                  prefix="pretrain/", knn_probe="")
    before: dict[str, float] = {}
    if p.knn_every >= 0:
        probe = knn_probe(cfg, frames_dir)
        if len(probe["seg_id"]):
            buf = io.BytesIO()
            torch.save(probe, buf)
            config["knn_probe"] = storage.join(out_dir, PROBE)
            storage.write_bytes(config["knn_probe"], buf.getvalue())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed)  # the same initial backbone as the workers build
                init = initial_backbone(config)  # the workers' init, without DINO's head
            before = probe_knn_accuracy(init, probe, p.knn_k, p.knn_crop_size, pool=CROP_DESCRIPTORS[p.knn_descriptor])
            if mlflow_run_id:
                client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
                for k, v in before.items():
                    if k != "knn_n_segments":
                        client.log_metric(mlflow_run_id, f"pretrain/{k}", float(v), step=0)
    config["feed"] = (segment_crop_feed(crops_dir, config) if p.inputs == "segment_crops"
                      else pretrain_feed(frames_dir, config))
    result = run_trainer(p, config, out_dir, name, timeout_s, loop=pretrain_loop_per_worker)
    return result, before
