"""Typed configuration: one dataclass tree for every stage, loaded from YAML with `section.key=value` overrides.

Unknown keys and values of the wrong type are errors (never silently swallowed), so a typo in a config file or
an override fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass
class RunConfig:
    """Where outputs go and how the run is named and seeded."""

    name: str = "default"  # outputs under <output_root>/<name>/<stage>/
    output_root: str = "outputs"  # local path or s3://bucket/prefix
    seed: int = 0
    ray_address: str = ""  # "" = RAY_ADDRESS when set (ray job submit), else a local cluster
    stages: list[str] = field(default_factory=list)  # [] = all registered stages, in order
    force: list[str] = field(default_factory=list)  # stages to rerun even when their manifest matches


@dataclass
class DataConfig:
    """Which Frame source to ingest and which frames of it to keep."""

    source: str = "synthetic"  # synthetic | kitti | nuscenes | waymo
    root: str = ""  # dataset root (local or s3://); unused by the synthetic source
    cameras: list[str] = field(default_factory=list)  # [] = every camera the source has
    frame_stride: int = 1  # keep every n-th frame of a sequence
    max_frames: int = 0  # 0 = no limit
    sync_tolerance_us: int = 50_000  # reject frames whose camera and LiDAR timestamps differ by more
    frames_per_part: int = 8  # frames per output part file (the unit of parallelism and resume)
    # real sources (issue 3): kitti | nuscenes | waymo
    split: str = ""  # kitti object: training|testing ("" = every split found); waymo: training|validation|testing
    version: str = "v1.0-mini"  # nuScenes table folder under root (v1.0-mini | v1.0-trainval | v1.0-test)
    sweeps: bool = False  # nuScenes: every LIDAR_TOP sweep (20 Hz) instead of the 2 Hz keyframes only
    lidars: list[str] = field(default_factory=lambda: ["TOP"])  # waymo lasers: TOP FRONT SIDE_LEFT SIDE_RIGHT REAR
    returns: int = 1  # waymo range-image returns to use: 1 (first) or 2 (first + second)
    shard_frames: int = 100  # kitti object layout: frames per shard (other sources: one shard per sequence)


@dataclass
class SyntheticConfig:
    """Procedural street scenes (the embedded default and the ground-truth benchmark)."""

    n_sequences: int = 4
    frames_per_sequence: int = 6
    width: int = 640
    height: int = 320
    beams: int = 32
    conditions: list[str] = field(default_factory=lambda: ["day"])  # conditions of the training sequences
    eval_conditions: list[str] = field(default_factory=lambda: ["day", "night", "fog"])
    eval_images_per_condition: int = 8
    eval_images_per_scene: int = 4  # eval images are taken this many at a time from one scene, 8 m apart
    eval_city: str = "synthcity"  # <city> of the Cityscapes-layout eval splits
    hfov_deg: float = 90.0  # camera horizontal field of view
    camera_pitch_deg: float = 3.0  # camera pitched down by this much
    lidar_height_m: float = 1.8  # LiDAR mount height above the road
    fov_up_deg: float = 10.0  # LiDAR vertical FOV (HDL-64: +2 / -24.8; Waymo top: +2.4 / -17.6)
    fov_down_deg: float = -25.0
    azimuth_steps: int = 1024  # LiDAR columns per revolution (Waymo top ~2650)
    max_range_m: float = 80.0
    min_range_m: float = 1.0
    range_noise_m: float = 0.02  # Gaussian range noise sigma
    dropout: float = 0.05  # probability that a return is lost
    intensity_noise: float = 0.02
    ego_speed_mps: float = 10.0
    frame_interval_us: int = 100_000  # 10 Hz sweeps
    fog_density: float = 0.035  # 1/m, Koschmieder extinction (visibility ~ 3 / density = 85 m)
    night_noise: float = 0.03  # sensor noise sigma at night (linear intensity)
    shadows: bool = True  # cast sun shadows (one extra ray per pixel by day)
    raycast_threads: int = 1  # Open3D threads per render (1 = one Ray CPU per sequence)


@dataclass
class ProposalsConfig:
    """LiDAR ground removal, 3D segmentation and projection into the cameras."""

    # range image (beam row from the source's ring index when present, else elevation binning)
    n_beams: int = 64  # rows when the source gives no ring index (HDL-64E: 64)
    n_cols: int = 0  # azimuth columns over 360 deg; 0 = estimated from the ring's azimuth step (2048 without ring)
    min_range_m: float = 1.0  # closer returns (ego vehicle) are ignored
    # LiDAR density ablation (paper): keep every n-th beam, then a random fraction of the points
    beam_stride: int = 1
    point_fraction: float = 1.0
    # ground removal: range_image (depth_clustering column method) | ransac (one plane, flat scenes only)
    ground_method: str = "range_image"
    ground_angle_deg: float = 7.0  # max smoothed-inclination difference between joined pixels (depth_clustering)
    ground_start_max_deg: float = 30.0  # skip columns whose lowest pixel is steeper
    ground_max_slope_deg: float = 20.0  # never ground above this inclination
    ground_sg_window: int = 7  # Savitzky-Golay window (rows), 7-9 in depth_clustering
    ground_max_gap: int = 2  # empty rows bridged in a column ("repair")
    ground_step_m: float = 0.25  # column step extension over kerbs / object feet (ours; 0 = off)
    ground_plane_threshold_m: float = 0.2  # ransac inlier distance
    # segmentation: range_image (BFS with the beta angle criterion) | dbscan (open3d baseline)
    segment_method: str = "range_image"  # range_image | dbscan
    beta_deg: float = 10.0  # join neighbours when beta > this (depth_clustering)
    segment_max_gap: int = 1  # empty pixels bridged (dropout); 0 = depth_clustering, purer on dense 64-beam sweeps
    dbscan_eps_m: float = 0.5
    dbscan_min_points: int = 5
    min_points: int = 20  # segment size bounds (depth_clustering examples: 20 ... 100 000)
    max_points: int = 100_000
    min_extent_m: float = 0.0  # largest bounding-box side bounds (0 = off)
    max_extent_m: float = 0.0
    # projection
    near_m: float = 0.5  # min camera depth
    zbuf_radius_px: int = 2  # z-buffer neighbourhood half-size
    zbuf_rel_tol: float = 0.05  # depth margin of the occlusion test: abs + rel * depth
    zbuf_abs_tol_m: float = 0.3
    densify_radius_px: int = 4  # nearest-visible-point assignment radius (scale with image size / beam spacing)
    fill_gap_px: int = 12  # vertical gaps closed inside a segment's mask (between its scanlines; 0 = off)
    ground_fill_px: int = 0  # vertical gaps closed between ground scanlines and below the lowest (0 = ground hits only)


@dataclass
class FeaturesConfig:
    """Self-supervised ViT descriptors pooled per projected segment."""

    backbone: str = "vit_tiny_patch16_224"  # real runs: vit_small_patch16_224.dino
    weights: str = ""  # "" random init | hub | local file | s3:// URL
    descriptor: str = "crop_cls"  # crop_cls (paper) | mask_pool
    num_gpus: float = 0.0  # GPUs per feature actor (bf16 autocast on GPU)
    crop_size: int = 112  # crop_cls: side of the resized masked crop (paper: 224)
    crop_pad: int = 0  # crop_cls: px of context around the tight box (paper: 0)
    image_size: int = 0  # mask_pool: shorter input side in px (0 = native), rounded to patch multiples
    min_pixels: int = 16  # segments with fewer projected pixels get no descriptor (stay unlabelled)
    batch_size: int = 32  # crops per forward pass
    num_actors: int = 1  # actor-pool size (each actor loads the backbone once)
    cpus_per_actor: float = 1.0
    torch_threads: int = 1  # intra-op threads per actor


@dataclass
class ClusterConfig:
    """Distributed k-means over segment descriptors -> pseudo-classes."""

    k: int = 12  # pseudo-classes from k-means (paper: 30; the k ablation is one override cluster.k=N)
    n_iter: int = 20  # Lloyd iterations per restart
    n_restarts: int = 3  # keep the restart with the lowest inertia
    n_actors: int = 2  # shard actors
    ground_class: bool = True  # ground points form pseudo-class 0; k-means classes are 1..k
    num_gpus: float = 0.0  # GPUs per shard actor (faiss GPU index when available)
    use_faiss: bool = True  # false: numpy distances (reference path)
    seed_sample: int = 20_000  # k-means++ runs on this many rows (deterministic global sample)
    tol: float = 0.0  # stop a restart early when the relative inertia decrease is below tol (0 = never)
    pca_dim: int = 0  # PCA before clustering (0 = off; paper: no pre-processing)
    whiten: bool = False  # whiten the (PCA) components
    montage_per_cluster: int = 8  # segment crops per cluster in the MLflow montage (0 = no montage)
    montage_px: int = 64  # thumbnail side


@dataclass
class TeacherConfig:
    """Segmenter trained on the sparse pseudo-labels (Ray Train)."""

    backbone: str = "vit_tiny_patch16_224"  # paper: vit_small_patch16_224.dino (DINO ViT-S/16)
    weights: str = ""  # encoder init ("" = features.weights when the backbones match, else random)
    n_cls: int = 0  # output pseudo-classes (0 = cluster.k + cluster.ground_class; paper: 31)
    decoder: str = "linear"  # mask (mask transformer, paper) | linear (learns faster at the embedded scale)
    n_layers: int = 1  # mask-transformer layers (released config: 1)
    dropout: float = 0.0  # decoder dropout (released config: 0.1; off for the embedded default's few steps)
    drop_path: float = 0.0  # encoder stochastic depth (released config: 0.1)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 1  # intra-op threads per training worker
    steps: int = 60  # optimiser steps (paper recipe: Segmenter's 160k at batch 8 on Cityscapes-size data)
    batch_size: int = 8  # global batch (fixed when num_workers changes: gradient accumulation)
    micro_batch_size: int = 0  # per-worker forward batch (0 = batch_size // num_workers)
    crop_size: int = 192  # random-resized-crop side in px (paper: 512)
    scale_min: float = 0.3  # crop area as a fraction of min(H, W)^2
    scale_max: float = 1.0
    flip: bool = True
    jitter: float = 0.2  # photometric jitter strength (brightness / contrast / saturation factors 1 +- jitter)
    optimizer: str = "adamw"  # sgd (paper: momentum 0.9, lr 1e-3..1e-2) | adamw
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0001
    schedule: str = "poly"  # poly (power 0.9, paper) | cosine | constant
    warmup_steps: int = 5
    class_balance: float = 0.0  # loss weight of a class n_c^-p over its pixels in the batch (0 = plain CE, 1 = equal)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    checkpoint_every: int = 20  # steps between Ray Train checkpoints
    log_every: int = 5  # steps between metric reports / MLflow points
    max_failures: int = 2  # Ray Train FailureConfig: restarts from the last checkpoint
    val_fraction: float = 0.1  # frames held out (hash of frame_id) for validation mIoU vs pseudo-labels
    val_images: int = 8  # held-out images used for validation
    val_every: int = 0  # steps between validations (0 = only at the end; -1 = never)
    n_overlays: int = 3  # prediction overlays logged to MLflow


@dataclass
class StudentConfig:
    """EMA teacher-student distillation with soft targets and LiDAR-segment refinement."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 1  # intra-op threads per training worker
    steps: int = 40  # optimiser steps (paper recipe: Segmenter's 160k at batch 8 on Cityscapes-size data)
    batch_size: int = 8  # global batch (fixed when num_workers changes: gradient accumulation)
    micro_batch_size: int = 0  # per-worker forward batch (0 = batch_size // num_workers)
    crop_size: int = 192  # random-resized-crop side in px (paper: 512)
    scale_min: float = 0.3  # crop area as a fraction of min(H, W)^2
    scale_max: float = 1.0
    flip: bool = True
    jitter: float = 0.2  # photometric jitter strength (brightness / contrast / saturation factors 1 +- jitter)
    optimizer: str = "adamw"  # sgd (paper: momentum 0.9, lr 1e-3..1e-2) | adamw
    lr: float = 0.0002
    momentum: float = 0.9
    weight_decay: float = 0.0001
    schedule: str = "poly"  # poly (power 0.9, paper) | cosine | constant
    warmup_steps: int = 0
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    checkpoint_every: int = 20  # steps between Ray Train checkpoints
    log_every: int = 5  # steps between metric reports / MLflow points
    max_failures: int = 2  # Ray Train FailureConfig: restarts from the last checkpoint
    val_fraction: float = 0.1  # frames held out (hash of frame_id) for validation mIoU vs pseudo-labels
    val_images: int = 8  # held-out images used for validation
    val_every: int = 0  # steps between validations (0 = only at the end; -1 = never)
    n_overlays: int = 3  # prediction overlays logged to MLflow
    ema: bool = True  # off: the teacher stays the frozen teacher-stage model
    ema_momentum: float = 0.99  # paper (journal): about 0.999 for long runs; short default runs need less
    soft_targets: bool = True  # soft teacher probabilities (temperature) vs hard argmax targets
    temperature: float = 1.0
    refine: bool = True  # LiDAR-segment refinement (majority class inside each projected segment)
    export: str = "ema"  # model saved to student/model: ema (the EMA teacher, when ema is on) | student


@dataclass
class EvalConfig:
    """Evaluation sets, matching of pseudo-classes to classes, and inference settings."""

    sets: str = ""  # NAME:FORMAT:PATH,... ; "" = the synthetic splits of the ingest stage
    matching: str = "hungarian"  # headline mapping: hungarian | majority (both are reported)
    fit_set: str = ""  # set whose confusion fits the matching ("" = the first set of each class protocol)
    size: int = 0  # resize the shorter image side to this before inference (0 = native; paper: 1024)
    window: int = 0  # sliding-window size in px (0 = whole image; paper: 512)
    stride: int = 0  # sliding-window stride in px (0 = window // 2; paper: 128)
    batch_size: int = 4  # images per Ray Data inference batch
    num_actors: int = 1  # inference actor pool size
    num_gpus: float = 0.0  # GPUs per inference actor
    models: list[str] = field(default_factory=lambda: ["teacher", "student"])  # stages whose model/ is evaluated
    max_images: int = 0  # per set (0 = all)
    n_overlays: int = 3  # qualitative overlays per set in the report
    knn_k: int = 5  # k of the k-NN evaluation of segment descriptors (0 = skip)


@dataclass
class TrackingConfig:
    """MLflow tracking: MLFLOW_TRACKING_URI wins over `uri`; the local default is sqlite in the working dir."""

    uri: str = ""
    experiment: str = "raydseg"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections' values: decides whether a stage's output is still valid."""
        payload = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`section.key -> value` for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing); ints widen to floats, nothing else."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # from a command-line override: a,b,c
            value = [v for v in value.split(",") if v] if value else []
            value = [_parse_scalar(v) for v in value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _apply(section_obj: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}' (known: {', '.join(sorted(names))})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings (values parsed as YAML scalars; lists as a,b,c)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override '{item}': the key must be section.key, e.g. cluster.k=30")
        section, key = parts
        if section not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"unknown config section '{section}' in override '{item}'")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        value = raw if hints.get(key) is str else _parse_scalar(raw)
        _apply(getattr(cfg, section), {key: value}, section)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- configs/default.yaml (or `path`) <- overrides. Raises ConfigError on any bad key or value."""
    cfg = Config()
    path = Path(path) if path else DEFAULT_CONFIG
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        sections = {f.name for f in dataclasses.fields(cfg)}
        for section, values in data.items():
            if section not in sections:
                raise ConfigError(f"{path}: unknown config section '{section}' (known: {', '.join(sorted(sections))})")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            _apply(getattr(cfg, section), values, section)
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"config file {path} does not exist")
    return apply_overrides(cfg, overrides or [])


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. inside Ray workers)."""
    cfg = Config()
    for section, values in data.items():
        _apply(getattr(cfg, section), values, section)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
