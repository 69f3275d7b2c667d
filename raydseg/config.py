"""Typed configuration: one pydantic tree for every stage, loaded from YAML with `section.key=value` overrides.

Every problem is found before any work starts and reported one line per problem, each naming its key: unknown
keys, wrong types (strict: ints widen to floats, nothing else is coerced), ranges (field constraints) and the
rules between fields (`cross_field_problems`). What needs the file system, S3 or timm is checked by
`raydseg.checks.check_inputs` before Ray starts.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from raydseg.errors import ConfigError
from raydseg.train.feed import batch_split
from raydseg.train.precision import AmpMode, amp_mode

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: installed with the wheel
DEFAULT_CONFIG = PACKAGED_CONFIGS / "default.yaml"
SYNTHETIC_SKY_MARGIN_DEG = 2.0  # proposals.sky_margin_deg's resolution on the synthetic world (docs/results.md)


def _number_to_text(value: Any) -> Any:
    """YAML reads `name: 0123` or `version: 1.0` as numbers; a text field takes them as written."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_number_to_text)]
NonEmpty = Annotated[str, BeforeValidator(_number_to_text), Field(min_length=1)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
Probability = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Condition = Literal["day", "night", "fog"]
Amp = Annotated[AmpMode, BeforeValidator(amp_mode)]  # bf16 autocast of training steps (raydseg.train.precision)
# run names become folder names under run.output_root: no separators, no '..'
RunName = Annotated[str, BeforeValidator(_number_to_text), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class Section(BaseModel):
    """One config section: unknown keys and wrong types are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RunConfig(Section):
    """Where outputs go and how the run is named and seeded."""

    name: RunName = "default"  # run folder <output_root>/<name>/ (stage outputs: raydseg.outputs)
    output_root: NonEmpty = "outputs"  # local path or s3://bucket/prefix
    seed: NonNegInt = 0
    ray_address: Text = ""  # "" = RAY_ADDRESS when set (ray job submit), else a local cluster
    stages: list[Text] = Field(default_factory=list)  # [] = all registered stages, in order
    force: list[Text] = Field(default_factory=list)  # stages to rerun even when their manifest matches


class DataConfig(Section):
    """Which Frame source to ingest and which frames of it to keep."""

    source: Literal["synthetic", "kitti", "nuscenes", "waymo"] = "synthetic"
    root: Text = ""  # dataset root (local or s3://); unused by the synthetic source
    cameras: list[Text] = Field(default_factory=list)  # [] = every camera the source has
    frame_stride: PosInt = 1  # keep every n-th frame of a sequence
    max_frames: NonNegInt = 0  # 0 = no limit
    sync_tolerance_us: NonNegInt = 50_000  # reject frames whose camera and LiDAR timestamps differ by more
    frames_per_part: PosInt = 8  # frames per output part file (the unit of parallelism and resume)
    # real sources: kitti | nuscenes | waymo
    split: Text = ""  # kitti object: training|testing ("" = every split found); waymo: training|validation|testing
    version: Text = "v1.0-mini"  # nuScenes table folder under root (v1.0-mini | v1.0-trainval | v1.0-test)
    sweeps: bool = False  # nuScenes: every LIDAR_TOP sweep (20 Hz) instead of the 2 Hz keyframes only
    lidars: Annotated[list[Literal["TOP", "FRONT", "SIDE_LEFT", "SIDE_RIGHT", "REAR"]], Field(min_length=1)] = \
        Field(default_factory=lambda: ["TOP"])  # waymo lasers
    returns: Literal[1, 2] = 1  # waymo range-image returns to use: 1 (first) or 2 (first + second)
    shard_frames: PosInt = 100  # kitti object layout: frames per shard (other sources: one shard per sequence)


class SyntheticConfig(Section):
    """Procedural street scenes (the embedded default and the ground-truth benchmark)."""

    n_sequences: PosInt = 4
    frames_per_sequence: PosInt = 6
    width: Annotated[int, Field(ge=16)] = 640
    height: Annotated[int, Field(ge=16)] = 320
    beams: Annotated[int, Field(ge=2)] = 32
    conditions: Annotated[list[Condition], Field(min_length=1)] = Field(default_factory=lambda: ["day"])
    eval_conditions: list[Condition] = Field(default_factory=lambda: ["day", "night", "fog"])
    eval_images_per_condition: PosInt = 64  # one image from each of 64 scenes: SE < 1 point (docs/results.md)
    eval_images_per_scene: PosInt = 1  # eval images are taken this many at a time from one scene, 8 m apart
    eval_city: NonEmpty = "synthcity"  # <city> of the Cityscapes-layout eval splits
    hfov_deg: Annotated[float, Field(gt=0, lt=180)] = 90.0  # camera horizontal field of view
    camera_pitch_deg: Annotated[float, Field(ge=-45, le=45)] = 3.0  # camera pitched down by this much
    lidar_height_m: PosFloat = 1.8  # LiDAR mount height above the road
    fov_up_deg: Annotated[float, Field(ge=-90, le=90)] = 10.0  # LiDAR vertical FOV (HDL-64: +2 / -24.8)
    fov_down_deg: Annotated[float, Field(ge=-90, le=90)] = -25.0
    azimuth_steps: Annotated[int, Field(ge=16)] = 1024  # LiDAR columns per revolution (Waymo top ~2650)
    max_range_m: PosFloat = 80.0
    min_range_m: NonNegFloat = 1.0
    range_noise_m: NonNegFloat = 0.02  # Gaussian range noise sigma
    dropout: Probability = 0.05  # probability that a return is lost
    intensity_noise: NonNegFloat = 0.02
    ego_speed_mps: NonNegFloat = 10.0
    frame_interval_us: PosInt = 100_000  # 10 Hz sweeps
    fog_density: NonNegFloat = 0.035  # 1/m, Koschmieder extinction (visibility ~ 3 / density = 85 m)
    night_noise: NonNegFloat = 0.03  # sensor noise sigma at night (linear intensity)
    shadows: bool = True  # cast sun shadows (one extra ray per pixel by day)
    raycast_threads: PosInt = 1  # Open3D threads per render (1 = one Ray CPU per sequence)


class ProposalsConfig(Section):
    """LiDAR ground removal, 3D segmentation and projection into the cameras."""

    # range image (beam row from the source's ring index when present, else elevation binning)
    n_beams: PosInt = 64  # rows when the source gives no ring index (HDL-64E: 64)
    n_cols: NonNegInt = 0  # azimuth columns over 360 deg; 0 = estimated from the ring's azimuth step
    min_range_m: NonNegFloat = 1.0  # closer returns (ego vehicle) are ignored
    # LiDAR density ablation (paper): keep every n-th beam, then a random fraction of the points
    beam_stride: PosInt = 1
    point_fraction: Fraction = 1.0
    # ground removal: range_image (depth_clustering column method) | ransac (one plane, flat scenes only)
    ground_method: Literal["range_image", "ransac"] = "range_image"
    ground_angle_deg: PosFloat = 7.0  # max smoothed-inclination difference between joined pixels
    ground_start_max_deg: PosFloat = 30.0  # skip columns whose lowest pixel is steeper
    ground_max_slope_deg: PosFloat = 20.0  # never ground above this inclination
    ground_sg_window: Annotated[int, Field(ge=3)] = 7  # Savitzky-Golay window (rows), 7-9 in depth_clustering
    ground_max_gap: NonNegInt = 2  # empty rows bridged in a column ("repair")
    ground_step_m: NonNegFloat = 0.25  # column step extension over kerbs / object feet (ours; 0 = off)
    ground_plane_threshold_m: PosFloat = 0.2  # ransac inlier distance
    # segmentation: range_image (BFS with the beta angle criterion) | dbscan (open3d baseline)
    segment_method: Literal["range_image", "dbscan"] = "range_image"
    beta_deg: Annotated[float, Field(gt=0, lt=90)] = 10.0  # join neighbours when beta > this (depth_clustering)
    segment_max_gap: NonNegInt = 1  # empty pixels bridged (dropout); 0 = depth_clustering
    dbscan_eps_m: PosFloat = 0.5
    dbscan_min_points: PosInt = 5
    min_points: PosInt = 20  # segment size bounds (depth_clustering examples: 20 ... 100 000)
    max_points: PosInt = 100_000
    min_extent_m: NonNegFloat = 0.0  # largest bounding-box side bounds (0 = off)
    max_extent_m: NonNegFloat = 0.0
    # projection
    near_m: PosFloat = 0.5  # min camera depth
    zbuf_radius_px: NonNegInt = 2  # z-buffer neighbourhood half-size
    zbuf_rel_tol: NonNegFloat = 0.05  # depth margin of the occlusion test: abs + rel * depth
    zbuf_abs_tol_m: NonNegFloat = 0.3
    densify_radius_px: NonNegInt = 4  # nearest-visible-point assignment radius (scale with image / beam spacing)
    fill_gap_px: NonNegInt = 12  # vertical gaps closed inside a segment's mask (between its scanlines; 0 = off)
    ground_fill_px: NonNegInt = 0  # vertical gaps closed between ground scanlines and below the lowest (0 = hits only)
    # sky: pixels crossed by rays without a return, more than this above their column's highest return (deg; the
    # gap to the next beam); painted as the last pseudo-class. < 0 = off, as in the paper (raydseg.geometry.sky).
    # null = SYNTHETIC_SKY_MARGIN_DEG on data.source=synthetic, off on real sensors: there the band under the top
    # beam holds far trees and buildings that return nothing (KITTI, nuScenes; docs/results.md)
    sky_margin_deg: float | None = None
    # also the sky above the top beam, in columns whose top beam returned nothing (sky precision 0.92 / recall 0.53
    # against 0.75 / 0.12, the models no better; docs/results.md)
    sky_above_top_beam: bool = False

    @property
    def sky_margin(self) -> float:
        """deg, < 0 = no sky; unresolved (None, a bare ProposalsConfig outside a Config) marks none either."""
        return -1.0 if self.sky_margin_deg is None else self.sky_margin_deg


class PretrainConfig(Section):
    """Self-supervised pretraining of the ViT on unlabelled camera images (stage `pretrain`): DINO self-distillation
    (Caron et al. 2021) or a masked autoencoder (He et al. 2021; `objective: mae`).

    Off by default: enable it here or name it in run.stages. Its output `<run>/pretrain/backbone.safetensors` is
    used through features.weights / teacher.weights. Steps replace the paper's epochs.
    """

    enabled: bool = False  # add `pretrain` to the default stage list (run.stages names it explicitly otherwise)
    # dino | mae: the masked autoencoder reads the two global crops only (set local_crops 0) and ignores the DINO
    # head / teacher / centering keys; its recipe is configs/pretrain_mae.yaml
    objective: Literal["dino", "mae"] = "dino"
    # images: every camera image of the ingest | segment_crops: what the features stage shows the ViT, the masked
    # crop (global_crop_size px, outside the mask the ImageNet mean colour) of every LiDAR segment of >=
    # segment_min_pixels pixels (the proposals section's segments), written once to <stage>/segment_crops/
    inputs: Literal["images", "segment_crops"] = "images"
    segment_min_pixels: PosInt = 64
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75  # mae: share of the patches hidden from the encoder
    decoder_dim: PosInt = 128  # mae: decoder width (paper: 512 for ViT-L; a light decoder suits ViT-Tiny)
    decoder_depth: PosInt = 2  # mae: decoder blocks (paper: 8)
    norm_pix_loss: bool = True  # mae: standardise each target patch by its own mean / variance (paper's default)
    mae_views: Annotated[int, Field(ge=1, le=2)] = 2  # mae: global crops of each image it reconstructs per step
    backbone: NonEmpty = "vit_tiny_patch16_224"  # timm ViT; paper: vit_small_patch16_224 (ViT-S/16)
    weights: Text = ""  # init: "" or random | hub | local file | s3:// URL
    drop_path: Probability = 0.1  # student stochastic depth (paper: 0.1)
    out_dim: PosInt = 4096  # prototypes K of the DINO head (paper: 65536)
    hidden_dim: PosInt = 2048  # head MLP width (paper: 2048)
    bottleneck_dim: PosInt = 256  # head bottleneck before the weight-normalised last layer (paper: 256)
    norm_last_layer: bool = True  # fix the last layer's weight-norm magnitude to 1 (paper code default)
    head_bn: bool = False  # BatchNorm in the head's hidden layers (official --use_bn_in_head; code default off)
    global_crop_size: PosInt = 112  # px, a patch multiple (paper: 224)
    local_crop_size: PosInt = 48  # px, a patch multiple (paper: 96)
    local_crops: NonNegInt = 4  # local crops per image (paper: 8)
    global_crop_scale_min: Fraction = 0.4  # global crop area fraction in [min, 1] (paper: 0.4)
    local_crop_scale_min: Fraction = 0.05  # local crop area fraction in [min, max] (paper: 0.05 - 0.4)
    local_crop_scale_max: Fraction = 0.4
    photometric: bool = True  # colour jitter, grayscale, solarisation (paper); false: crops, flips, blur only
    photometric_device: bool = False  # those colour ops on the training device, per image, not in the loader
    steps: PosInt = 200  # optimiser steps
    batch_size: PosInt = 16  # global batch of images (paper: 1024)
    micro_batch_size: NonNegInt = 0  # per-worker forward batch (0 = batch_size // num_workers)
    lr: PosFloat = 0.0005  # peak LR after warmup (paper: 0.0005 x batch / 256); cosine to min_lr
    min_lr: NonNegFloat = 0.000001
    warmup_steps: NonNegInt = 20  # linear LR warmup (paper: 10 of 100 epochs)
    weight_decay: NonNegFloat = 0.04  # cosine schedule weight_decay -> weight_decay_end (paper: 0.04 -> 0.4)
    weight_decay_end: NonNegFloat = 0.4
    momentum_teacher: Annotated[float, Field(ge=0, le=1)] = 0.99  # EMA momentum, cosine to 1 (paper: 0.996)
    warmup_teacher_temp: PosFloat = 0.04  # teacher temperature: linear warmup_teacher_temp -> teacher_temp
    teacher_temp: PosFloat = 0.07  # (paper ViT-S/16: 0.04 -> 0.07 over 30 epochs; above 0.07 is unstable)
    teacher_temp_warmup_steps: NonNegInt = 60
    student_temp: PosFloat = 0.1
    center_momentum: Annotated[float, Field(ge=0, le=1)] = 0.9
    centering: Literal["ema", "sinkhorn"] = "ema"  # teacher centering: EMA centre (DINO) | Sinkhorn-Knopp (DINOv2)
    clip_grad: NonNegFloat = 3.0  # per-parameter gradient-norm clip (0 = off)
    freeze_last_layer_steps: NonNegInt = 10  # the head's last layer is frozen this long (paper: 1 epoch)
    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: PosFloat = 1.0
    torch_threads: PosInt = 1  # intra-op threads per training worker
    amp: Amp = "gpu"
    deterministic: bool = False  # forbid non-deterministic GPU kernels (bit-identical GPU runs; slower)
    checkpoint_every: PosInt = 50  # steps between Ray Train checkpoints
    log_every: PosInt = 10  # steps between metric reports / MLflow points
    max_failures: NonNegInt = 2  # Ray Train FailureConfig: restarts from the last checkpoint
    knn_every: Annotated[int, Field(ge=-1)] = 50  # steps between k-NN probes (0 = at the end; -1 = never)
    knn_frames: PosInt = 16  # frames with ground truth whose LiDAR segments form the k-NN probe
    # > 0 (data.source synthetic): instead, one frame of each of this many day drives of worlds run.seed and
    # run.seed + 1, split by drive (raydseg.train.pretrain.synthetic_drive_probe; 24: 24 drives against 24, where 16
    # frames of the ingest can give 2 against 2)
    knn_drives: NonNegInt = 0
    knn_k: PosInt = 5
    knn_crop_size: PosInt = 112  # masked-crop side of the probe descriptors (features.crop_size)
    knn_descriptor: Literal["crop_cls", "crop_mean"] = "crop_cls"  # the probe's descriptor (features.descriptor)


class FeaturesConfig(Section):
    """Self-supervised ViT descriptors pooled per projected segment."""

    backbone: NonEmpty = "vit_tiny_patch16_224"  # real runs: vit_small_patch16_224.dino
    # "" or random: random init (the control) | hub | local file | s3:// URL | a shipped file (weights/<file>:
    # raydseg/weights). The default: the masked autoencoder that configs/pretrain_mae.yaml pretrained on the synthetic
    # world, which the teacher inherits (docs/results.md)
    weights: Text = "weights/vit_tiny_mae_synthetic.safetensors"
    # crop_cls (paper) | crop_mean (the masked crop's patch tokens averaged: a masked autoencoder's) | mask_pool
    descriptor: Literal["crop_cls", "crop_mean", "mask_pool"] = "crop_mean"
    num_gpus: NonNegFloat = 0.0  # GPUs per feature actor (bf16 autocast on GPU)
    crop_size: PosInt = 112  # crop_cls / crop_mean: side of the resized masked crop, a patch multiple (paper: 224)
    crop_pad: NonNegInt = 0  # crop_cls / crop_mean: px of context around the tight box (paper: 0)
    image_size: NonNegInt = 0  # mask_pool: shorter input side in px (0 = native), rounded to patch multiples
    min_pixels: PosInt = 16  # segments (and ground patches) with fewer pixels get no descriptor (stay unlabelled)
    # also describe the ground: one patch token per token-grid cell of a whole-image pass (at image_size) that holds
    # >= min_pixels LiDAR ground pixels (features/ground; clustered with cluster.ground_k; raydseg.features.ground);
    # the cluster stage then paints the ground of those cells only
    ground_patches: bool = False
    batch_size: PosInt = 32  # crops per forward pass
    num_actors: PosInt = 1  # actor-pool size (each actor loads the backbone once)
    cpus_per_actor: PosFloat = 1.0
    torch_threads: PosInt = 1  # intra-op threads per actor


class ClusterConfig(Section):
    """Distributed k-means over segment descriptors -> pseudo-classes."""

    k: Annotated[int, Field(ge=2)] = 12  # pseudo-classes from k-means (paper: 30)
    n_iter: PosInt = 20  # Lloyd iterations per restart
    n_restarts: PosInt = 3  # keep the restart with the lowest inertia
    n_actors: PosInt = 2  # shard actors
    ground_class: bool = True  # ground points form pseudo-class 0; k-means classes are 1..k
    # > 1: the ground patches (features.ground_patches) get their own k-means into this many ground pseudo-classes
    # 0..ground_k-1 (road / sidewalk / terrain), and the object clusters follow
    ground_k: PosInt = 1
    num_gpus: NonNegFloat = 0.0  # GPUs per shard actor (faiss GPU index when available)
    use_faiss: bool = True  # false: numpy distances (reference path)
    seed_sample: PosInt = 20_000  # k-means++ runs on this many rows (deterministic global sample)
    tol: NonNegFloat = 0.0  # stop a restart early when the relative inertia decrease is below tol (0 = never)
    pca_dim: NonNegInt = 0  # PCA before clustering (0 = off; paper: no pre-processing)
    whiten: bool = False  # whiten the (PCA) components
    montage_per_cluster: NonNegInt = 8  # segment crops per cluster in the MLflow montage (0 = no montage)
    montage_px: Annotated[int, Field(ge=8)] = 64  # thumbnail side


class TrainConfig(Section):
    """What the teacher and student stages share: workers, batch, augmentation, optimiser, checkpoints."""

    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: PosFloat = 1.0
    torch_threads: PosInt = 2  # intra-op threads per training worker (both cores of the embedded default)
    steps: PosInt = 240  # optimiser steps (paper recipe: Segmenter's 160k at batch 8 on Cityscapes-size data)
    batch_size: PosInt = 8  # global batch = micro x workers x accumulation, exactly (else a config error)
    micro_batch_size: NonNegInt = 0  # per-worker forward batch (0 = batch_size // num_workers)
    crop_size: PosInt = 192  # random-resized-crop side in px, a patch multiple (paper: 512)
    scale_min: Fraction = 0.3  # crop area as a fraction of min(H, W)^2
    scale_max: Fraction = 1.0
    flip: bool = True
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.2  # photometric jitter (factors 1 +- jitter)
    degrade: Annotated[float, Field(ge=0, le=1)] = 0.0  # degraded-view strength (gamma, contrast, blur, noise); 0 = off
    # share of the degraded views that are simulated night shots (raydseg.train.data.low_light_view); 0 = none
    lowlight: Annotated[float, Field(ge=0, le=1)] = 0.0
    # class weight n_c^-p over the batch's pixels (teacher: its pseudo-labels; student: its teacher's argmax); 0 = off
    class_balance: Annotated[float, Field(ge=0, le=1)] = 0.0
    optimizer: Literal["sgd", "adamw"] = "adamw"  # sgd (paper: momentum 0.9, lr 1e-3..1e-2) | adamw
    lr: PosFloat = 0.001
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 0.0001
    schedule: Literal["poly", "cosine", "constant"] = "poly"  # poly (power 0.9, paper) | cosine | constant
    warmup_steps: NonNegInt = 5
    amp: Amp = "auto"  # docs/results.md
    deterministic: bool = False  # forbid non-deterministic GPU kernels (bit-identical GPU runs; slower)
    checkpoint_every: PosInt = 20  # steps between Ray Train checkpoints
    log_every: PosInt = 5  # steps between metric reports / MLflow points
    max_failures: NonNegInt = 2  # Ray Train FailureConfig: restarts from the last checkpoint
    val_fraction: Fraction = 0.1  # frames held out (hash of frame_id) for validation mIoU vs pseudo-labels
    val_images: NonNegInt = 8  # held-out images used for validation
    val_every: Annotated[int, Field(ge=-1)] = 0  # steps between validations (0 = only at the end; -1 = never)
    n_overlays: NonNegInt = 3  # prediction overlays logged to MLflow


class TeacherConfig(TrainConfig):
    """Segmenter trained on the sparse pseudo-labels (Ray Train)."""

    backbone: NonEmpty = "vit_tiny_patch16_224"  # paper: vit_small_patch16_224.dino (DINO ViT-S/16)
    weights: Text = ""  # encoder init as features.weights; "" = features.weights when the backbones match, else random
    n_cls: NonNegInt = 0  # output pseudo-classes (0 = config.painted_classes: k + ground + sky; paper: 31)
    decoder: Literal["mask", "linear"] = "linear"  # mask (mask transformer, paper) | linear (faster to learn here)
    n_layers: PosInt = 1  # mask-transformer layers (released config: 1)
    dropout: Probability = 0.0  # decoder dropout (released config: 0.1; off for the embedded default's few steps)
    drop_path: Probability = 0.0  # encoder stochastic depth (released config: 0.1)
    # image: each input image standardised inside the model (models.segmenter.standardize_image); with the
    # student's ClassMix it lifted night and fog over the dataset-normalised default, day unchanged (docs/results.md)
    input_norm: Literal["dataset", "image"] = "image"


class StudentConfig(TrainConfig):
    """EMA teacher-student distillation with soft targets and LiDAR-segment refinement."""

    steps: PosInt = 160
    lr: PosFloat = 0.0008
    warmup_steps: NonNegInt = 0
    # every teacher class of a batch weighs the same: the student keeps the small classes (car, sidewalk) that plain
    # self-training erodes; with twice the lr it lifted day on every seed and fog on the mean (docs/results.md)
    class_balance: Annotated[float, Field(ge=0, le=1)] = 1.0
    degrade: Annotated[float, Field(ge=0, le=1)] = 0.8  # the student's view is degraded, its teacher's is not
    # night shots among the degraded views: night rose on every seed (sky, vegetation, sidewalk) for a little day and
    # fog; the share that met the night / day goal with day still above the teacher (docs/results.md)
    lowlight: Annotated[float, Field(ge=0, le=1)] = 0.15
    # EMA teacher (paper). Off in the embedded default: its targets come from the frozen teacher-stage model, which
    # at twice the lr lifted night on every seed for half a point of day (docs/results.md); the paper's configs set it
    ema: bool = False
    ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.99  # paper: about 0.999 for long runs
    soft_targets: bool = True  # soft teacher probabilities (temperature) vs hard argmax targets
    temperature: PosFloat = 1.0
    # LiDAR-segment refinement (one target per projected segment, by refine_vote). Off in the embedded default: at
    # its budget it cost the student on every condition and seed (docs/results.md); the paper's configs turn it on
    refine: bool = False
    refine_vote: Literal["majority", "mean"] = "majority"  # majority of the teacher's argmax (paper) | mean of its probs
    mix: Literal["none", "classmix"] = "classmix"  # the student's images and targets mixed by teacher classes | none
    export: Literal["ema", "student"] = "ema"  # model saved to student/model: the EMA teacher (ema on) | student


class EvalConfig(Section):
    """Evaluation sets, matching of pseudo-classes to classes, and inference settings."""

    sets: Text = ""  # NAME:FORMAT:PATH,... ; "" = the synthetic splits of the ingest stage
    matching: Literal["hungarian", "majority"] = "hungarian"  # headline mapping (both are reported)
    fit_set: Text = ""  # set whose confusion fits the matching ("" = the first set of each class protocol)
    size: NonNegInt = 0  # resize the shorter image side to this before inference (0 = native; paper: 1024)
    window: NonNegInt = 0  # sliding-window size in px (0 = whole image; paper: 512); padded to patch multiples
    stride: NonNegInt = 0  # sliding-window stride in px (0 = window // 2; paper: 128)
    batch_size: PosInt = 4  # images per inference call of an actor
    num_actors: PosInt = 1  # inference actor pool size
    num_gpus: NonNegFloat = 0.0  # GPUs per inference actor
    torch_threads: PosInt = 2  # intra-op threads per inference actor (both cores of the embedded default)
    models: Annotated[list[Literal["teacher", "student"]], Field(min_length=1)] = \
        Field(default_factory=lambda: ["teacher", "student"])  # stages whose model/ is evaluated
    max_images: NonNegInt = 0  # per set (0 = all)
    n_overlays: NonNegInt = 3  # qualitative overlays per set in the report
    knn_k: NonNegInt = 5  # k of the k-NN evaluation of segment descriptors (0 = skip)


class TrackingConfig(Section):
    """MLflow tracking: MLFLOW_TRACKING_URI wins over `uri`; the local default is sqlite in the working dir."""

    uri: Text = ""
    experiment: NonEmpty = "raydseg"


class Config(Section):
    """The whole configuration; `proposals.sky_margin_deg: null` resolves here, from data.source."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    proposals: ProposalsConfig = Field(default_factory=ProposalsConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _resolve_sky(self) -> "Config":
        if self.proposals.sky_margin_deg is None:
            synthetic = self.data.source == "synthetic"
            self.proposals.sky_margin_deg = SYNTHETIC_SKY_MARGIN_DEG if synthetic else -1.0
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections' values: decides whether a stage's output is still valid."""
        payload = {s: getattr(self, s).model_dump() for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


SECTIONS = tuple(Config.model_fields)


def patch_size(backbone: str) -> int | None:
    """Patch side in px from a timm ViT name (`vit_small_patch16_224.dino` -> 16); None when it says none."""
    m = re.search(r"patch(\d+)", backbone)
    return int(m.group(1)) if m else None


def ground_pseudo_classes(cfg: Config) -> int:
    """How many pseudo-classes the ground takes (the first ones): cluster.ground_k, 0 without cluster.ground_class."""
    return cfg.cluster.ground_k if cfg.cluster.ground_class else 0


def painted_classes(cfg: Config) -> int:
    """Pseudo-classes the cluster stage paints: the ground's (`ground_pseudo_classes`), the k clusters, then sky
    (the last, when proposals.sky_margin_deg >= 0)."""
    return ground_pseudo_classes(cfg) + cfg.cluster.k + int(cfg.proposals.sky_margin >= 0)


def sky_pseudo_class(cfg: Config) -> int | None:
    """The sky's pseudo-class (the last one), or None when the proposals mark no sky."""
    return painted_classes(cfg) - 1 if cfg.proposals.sky_margin >= 0 else None


def cross_field_problems(cfg: Config) -> list[str]:
    """Rules between fields, one line per broken rule naming its key ([] = all hold)."""
    from raydseg.eval.sets import parse_eval_sets
    from raydseg.pipeline import STAGE_ORDER

    out = []
    for key in ("stages", "force"):
        bad = [s for s in getattr(cfg.run, key) if s not in STAGE_ORDER]
        if bad:
            out.append(f"run.{key}: unknown stage(s) {', '.join(bad)} (stages: {', '.join(STAGE_ORDER)})")
    if cfg.data.source != "synthetic" and not cfg.data.root:
        out.append(f"data.root: required for data.source={cfg.data.source} (a local folder or s3:// URL)")
    s = cfg.synthetic
    if s.fov_down_deg >= s.fov_up_deg:
        out.append(f"synthetic.fov_down_deg: {s.fov_down_deg} must be below synthetic.fov_up_deg ({s.fov_up_deg})")
    if s.min_range_m >= s.max_range_m:
        out.append(f"synthetic.min_range_m: {s.min_range_m} must be below synthetic.max_range_m ({s.max_range_m})")
    p = cfg.proposals
    if p.min_points > p.max_points:
        out.append(f"proposals.min_points: {p.min_points} is above proposals.max_points ({p.max_points})")
    if p.max_extent_m and p.min_extent_m > p.max_extent_m:
        out.append(f"proposals.min_extent_m: {p.min_extent_m} is above proposals.max_extent_m ({p.max_extent_m})")
    if p.ground_sg_window % 2 == 0:
        out.append(f"proposals.ground_sg_window: {p.ground_sg_window} must be odd (a centred Savitzky-Golay window)")
    n_cls = painted_classes(cfg)
    if cfg.teacher.n_cls not in (0, n_cls):
        out.append(f"teacher.n_cls: {cfg.teacher.n_cls} does not match cluster.k + ground (cluster.ground_k) + sky "
                   f"(proposals.sky_margin_deg >= 0) = {n_cls} (0 = derive it)")
    if cfg.cluster.ground_k > 1 and not (cfg.cluster.ground_class and cfg.features.ground_patches):
        out.append(f"cluster.ground_k: {cfg.cluster.ground_k} needs cluster.ground_class and features.ground_patches "
                   "(the ground patches it clusters)")
    if cfg.features.ground_patches and not patch_size(cfg.features.backbone):
        out.append(f"features.ground_patches: the backbone {cfg.features.backbone} names no patch size (patchNN)")
    crops = [("features.crop_size", cfg.features.crop_size, cfg.features.backbone)]
    crops += [(f"{t}.crop_size", getattr(cfg, t).crop_size, cfg.teacher.backbone) for t in ("teacher", "student")]
    crops += [(f"pretrain.{c}_crop_size", getattr(cfg.pretrain, f"{c}_crop_size"), cfg.pretrain.backbone)
              for c in ("global", "local")]
    for key, size, backbone in crops:
        ps = patch_size(backbone)
        if ps and (size < ps or size % ps):
            out.append(f"{key}: {size} must be a positive multiple of the patch size {ps} of {backbone}")
    if cfg.eval.stride and not cfg.eval.window:
        out.append("eval.stride: set without eval.window (the stride of a sliding window)")
    if cfg.eval.window and cfg.eval.stride > cfg.eval.window:
        out.append(f"eval.stride: {cfg.eval.stride} is larger than eval.window ({cfg.eval.window}): pixels unseen")
    pt = cfg.pretrain
    if pt.knn_drives and cfg.data.source != "synthetic":
        out.append(f"pretrain.knn_drives: {pt.knn_drives} needs data.source synthetic (got {cfg.data.source}); "
                   "0 = the probe of pretrain.knn_frames ingest frames")
    if pt.local_crop_scale_min > pt.local_crop_scale_max:
        out.append(f"pretrain.local_crop_scale_min: {pt.local_crop_scale_min} is above pretrain.local_crop_scale_max "
                   f"({pt.local_crop_scale_max})")
    for t in ("teacher", "student", "pretrain"):
        tc = getattr(cfg, t)
        if tc.warmup_steps > tc.steps:
            out.append(f"{t}.warmup_steps: {tc.warmup_steps} is more than {t}.steps ({tc.steps})")
        try:
            batch_split(tc.batch_size, tc.micro_batch_size, tc.num_workers)
        except ValueError as e:
            out.append(f"{t}.batch_size: {e}")
    for t in ("teacher", "student"):
        tc: TrainConfig = getattr(cfg, t)
        if tc.scale_min > tc.scale_max:
            out.append(f"{t}.scale_min: {tc.scale_min} is above {t}.scale_max ({tc.scale_max})")
    try:
        sets = parse_eval_sets(cfg.eval.sets)
    except ValueError as e:
        out.append(f"eval.sets: {e}")
    else:
        names = [e.name for e in sets] or [f"synthetic_{c}" for c in cfg.synthetic.eval_conditions]
        if cfg.eval.fit_set and cfg.eval.fit_set not in names:
            out.append(f"eval.fit_set: '{cfg.eval.fit_set}' is not one of the eval sets ({', '.join(names)})")
    return out


def _describe(err: dict[str, Any]) -> str:
    """One line for one pydantic error, naming the dotted key (`synthetic.conditions[0]`)."""
    loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
    if err["type"] == "extra_forbidden":
        if len(err["loc"]) == 1:
            return f"unknown config section '{loc}' (known: {', '.join(SECTIONS)})"
        known = Config.model_fields[err["loc"][0]].annotation.model_fields
        return f"unknown key '{loc}' (known: {', '.join(sorted(known))})"
    return f"{loc}: {err['msg'][0].lower() + err['msg'][1:]}, got {err['input']!r}"


def _validated(data: dict[str, Any]) -> Config:
    """Config from nested values; every field and cross-field problem at once, as one ConfigError."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _override_value(section: str, key: str, raw: str) -> Any:
    """An override's text as the field wants it: text as written, a,b,c or [a, b] as a list, else a YAML scalar."""
    model = Config.model_fields[section].annotation
    field = model.model_fields.get(key)
    annotation = str(field.annotation) if field else ""
    if annotation.startswith("list"):
        return _parse_scalar(raw) if raw.lstrip().startswith("[") else [_parse_scalar(v) for v in raw.split(",") if v]
    if "str" in annotation and "Literal" not in annotation:
        return raw
    return _parse_scalar(raw)


def _merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}' is not of the form section.key=value")
            continue
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            problems.append(f"override '{item}': the key must be section.key, e.g. cluster.k=30")
            continue
        section, key = parts
        if section not in SECTIONS:
            problems.append(f"unknown config section '{section}' in override '{item}' (known: {', '.join(SECTIONS)})")
            continue
        if isinstance(data.setdefault(section, {}), dict):  # a non-mapping section fails validation as it is
            data[section][key] = _override_value(section, key, raw)
    if problems:
        raise ConfigError(problems)
    return data


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new Config: `cfg` with `section.key=value` strings applied (YAML scalars; lists as a,b,c)."""
    return _validated(_merge_overrides(cfg.to_dict(), overrides))


def resolve_config_path(path: str | Path | None) -> Path:
    """The config file `path` names: the packaged default for None; a path that exists as given; else a shipped
    config by its name (`waymo`, `waymo.yaml` or `configs/waymo.yaml`), so that the README's
    `--config configs/waymo.yaml` works from any directory when raydseg is installed from a wheel."""
    if not path:
        return DEFAULT_CONFIG
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    shipped = PACKAGED_CONFIGS.joinpath(*parts)
    if len(parts) == 1 and not shipped.suffix:
        shipped = shipped.with_suffix(".yaml")
    return shipped if shipped.is_file() else p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the packaged default.yaml (or `path`, see `resolve_config_path`) <- overrides. Raises ConfigError
    listing every problem."""
    path = resolve_config_path(path)
    data: Any = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"config file {path} does not exist")
    return _validated(_merge_overrides(data, overrides or []))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. inside Ray workers)."""
    return _validated(data)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
