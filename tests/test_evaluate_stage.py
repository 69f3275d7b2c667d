"""Stage `evaluate` end to end on a real local Ray cluster and a real MLflow server, with a tiny colour-prototype
model that follows the `load_model(dir)` / `predict_image(model, image, ...)` interface of raydseg.models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

# gt class (trainId) -> labelId and a pure colour; the tiny model maps colours to pseudo-classes
CLASSES = {0: (7, (128, 64, 128)), 2: (11, (70, 70, 70)), 10: (23, (70, 130, 180)), 13: (26, (0, 0, 142))}
EXTRA = [(255, 255, 0), (0, 255, 0)]  # pseudo-classes never seen on the day split
H, W = 12, 16


class TinyColourModel(torch.nn.Module):
    """1x1 conv nearest-colour classifier: logits_j = 2 x.c_j - |c_j|^2 for pseudo-class prototype colours c_j."""

    def __init__(self, prototypes: list[list[float]]):
        super().__init__()
        c = torch.tensor(prototypes, dtype=torch.float32) / 255
        self.head = torch.nn.Conv2d(3, len(prototypes), 1)
        with torch.no_grad():
            self.head.weight.copy_(2 * c[:, :, None, None])
            self.head.bias.copy_(-(c ** 2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def save_tiny(model_dir: Path, perm: list[int]) -> None:
    protos = [None] * 6
    for (cls, (_, colour)), j in zip(CLASSES.items(), perm):
        protos[j] = list(colour)
    free = [j for j in range(6) if protos[j] is None]
    for j, colour in zip(free, EXTRA):
        protos[j] = list(colour)
    model_dir.mkdir(parents=True)
    torch.save(TinyColourModel(protos).state_dict(), model_dir / "model.pt")
    (model_dir / "model_config.json").write_text(json.dumps({"prototypes": protos}))


def load_tiny(model_dir: str) -> torch.nn.Module:
    cfg = json.loads((Path(model_dir) / "model_config.json").read_text())
    model = TinyColourModel(cfg["prototypes"])
    model.load_state_dict(torch.load(Path(model_dir) / "model.pt", weights_only=True))
    return model.eval()


def predict_tiny(model: torch.nn.Module, image: np.ndarray, *, size=None, window=None, stride=None) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return model(x)[0].argmax(0).numpy().astype(np.int64)


def _scene(seed: int) -> np.ndarray:
    """(H, W) trainIds: road bottom, building middle, sky top, a car box, a void strip."""
    gt = np.full((H, W), 2, dtype=np.uint8)
    gt[:3] = 10
    gt[8:] = 0
    gt[6:10, 2 + seed:7 + seed] = 13
    gt[:, -1] = 255
    return gt


def _write_split(root: Path, cond: str, n: int) -> list[np.ndarray]:
    to_label = {t: lid for t, (lid, _) in CLASSES.items()}
    gts = []
    for i in range(n):
        gt = _scene(i)
        image = np.zeros((H, W, 3), dtype=np.uint8)
        for t, (_, colour) in CLASSES.items():
            image[gt == t] = colour
        if cond == "night":  # cars look like an unseen colour at night -> the day-fitted mapping misses them
            image[gt == 13] = EXTRA[0]
        label_ids = np.zeros((H, W), dtype=np.uint8)  # 0 = unlabeled (void)
        for t, lid in to_label.items():
            label_ids[gt == t] = lid
        stem = f"synth_{i:06d}_000000"
        for sub, name, arr in [("leftImg8bit", f"{stem}_leftImg8bit.png", image),
                               ("gtFine", f"{stem}_gtFine_labelIds.png", label_ids)]:
            d = root / "ingest" / "eval" / cond / sub / "val" / "synth"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / name)
        gts.append(gt)
    return gts


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_fits_matching_on_day_and_logs_metrics_report_and_predictions(
        tmp_path, ray_local, mlflow_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from raydseg.config import load_config
    from raydseg.pipeline import StageContext
    from raydseg.stages import evaluate

    root = tmp_path / "run"
    day = _write_split(root, "day", 3)
    _write_split(root, "night", 2)
    save_tiny(root / "teacher" / "model", perm=[3, 0, 5, 1])
    save_tiny(root / "student" / "model", perm=[0, 1, 2, 3])
    cfg = load_config(overrides=["synthetic.eval_conditions=day,night", "eval.batch_size=2", "eval.n_overlays=1",
                                 "eval.knn_k=0"])
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("eval-test")
    out_dir = root / "evaluate"
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as child:
        ctx = StageContext(cfg=cfg, run_root=str(root), out_dir=str(out_dir), tracking_uri=mlflow_server,
                           mlflow_run_id=child.info.run_id, parent_run_id=parent.info.run_id)
        result = evaluate.run_evaluation(ctx, loader=load_tiny, predictor=predict_tiny)
    assert result.counts == {"images_synthetic_day": 3, "images_synthetic_night": 2}
    assert result.rejects == []
    client = MlflowClient(mlflow_server)
    m = client.get_run(child.info.run_id).data.metrics
    night_gt = [_scene(i) for i in range(2)]
    car_frac = sum((g == 13).sum() for g in night_gt) / sum((g != 255).sum() for g in night_gt)
    for model in ("teacher", "student"):
        assert m[f"eval/{model}/synthetic_day/miou"] == 1.0
        assert m[f"eval/{model}/synthetic_day/pixel_acc"] == 1.0
        assert m[f"eval/{model}/synthetic_day/majority_miou"] == 1.0
        # fitted on day, applied unchanged to night: the unseen car colour is an unmatched pseudo-class -> errors
        assert m[f"eval/{model}/synthetic_night/iou_car"] == 0.0
        assert m[f"eval/{model}/synthetic_night/iou_road"] == 1.0
        assert m[f"eval/{model}/synthetic_night/miou"] == pytest.approx(0.75)
        assert m[f"eval/{model}/synthetic_night/pixel_acc"] == pytest.approx(1 - car_frac)
        assert f"eval/{model}/synthetic_day/iou_bicycle" not in m  # absent class: NaN, not logged
        assert m[f"eval/{model}/images_per_s"] > 0
    assert client.get_run(parent.info.run_id).data.metrics["eval/student/synthetic_night/miou"] == pytest.approx(0.75)
    arts = {a.path for a in client.list_artifacts(child.info.run_id, "evaluate")}
    assert "evaluate/report.html" in arts and "evaluate/plots" in arts
    # predicted PNGs are the raw pseudo-classes; the teacher's mapping recovers its permutation
    pred = np.array(Image.open(out_dir / "predictions" / "teacher" / "synthetic_day" / "synth_000000_000000.png"))
    perm = {0: 3, 2: 0, 10: 5, 13: 1}
    valid = day[0] != 255
    assert np.array_equal(pred[valid], np.vectorize(perm.get)(day[0][valid]))
    mapping = json.loads((out_dir / "mappings" / "teacher.json").read_text())
    assert mapping["19/hungarian"][3] == 0 and mapping["19/hungarian"][5] == 10 and mapping["fit_sets"]["19"] == \
        "synthetic_day"
    cm = np.load(out_dir / "confusion" / "teacher" / "synthetic_night.npy")
    assert cm.sum() == sum((g != 255).sum() for g in night_gt)
    report = (out_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 * 2 * 2  # models x sets x (confusion + 1 overlay)
    assert "synthetic_night" in report


def predict_threads(model: torch.nn.Module, image: np.ndarray, **kwargs) -> np.ndarray:
    """Every pixel is the calling process's torch intra-op thread count."""
    return np.full(image.shape[:2], torch.get_num_threads(), np.int64)


@pytest.mark.ray
def test_inference_actors_run_with_eval_torch_threads(tmp_path, ray_local):
    """Ray starts a 1-CPU actor with OMP_NUM_THREADS=1; the actor must use `eval.torch_threads` intra-op threads."""
    from raydseg.config import load_config
    from raydseg.eval.inference import infer_models
    from raydseg.eval.sets import eval_samples, eval_sets

    root = tmp_path / "run"
    _write_split(root, "day", 2)
    save_tiny(root / "student" / "model", perm=[0, 1, 2, 3])
    cfg = load_config(overrides=["synthetic.eval_conditions=day", "eval.torch_threads=2"])
    sets = eval_sets(cfg, str(root / "ingest"))
    samples, _ = eval_samples(sets)
    out = infer_models(cfg, {"student": str(root / "student" / "model")}, samples, sets,
                       {"student": str(tmp_path / "pred")}, load_tiny, predict_threads)
    conf = out["student"]["confusion"]["synthetic_day"].matrix
    assert conf.shape[0] == 3 and conf[2].sum() == conf.sum() > 0  # every pixel predicted "2 threads"


def test_fit_sets_one_per_protocol_and_rejects_unknown_fit_set():
    from raydseg.eval.sets import EvalSet
    from raydseg.eval.scoring import fit_sets

    sets = [EvalSet("cs", "cityscapes", "/a"), EvalSet("cs27", "cityscapes27", "/a"),
            EvalSet("dz", "darkzurich", "/b")]
    assert fit_sets(sets) == {19: "cs", 27: "cs27"}
    assert fit_sets(sets, "dz") == {19: "dz", 27: "cs27"}
    with pytest.raises(ValueError, match="not one of the sets"):
        fit_sets(sets, "acdc")


def test_knn_analysis_on_feature_and_pseudolabel_parts(tmp_path):
    from raydseg.data.schema import encode_png
    from raydseg.eval.knn import knn_analysis

    rng = np.random.default_rng(0)
    centres = {0: rng.normal(size=16), 2: rng.normal(size=16), 13: rng.normal(size=16)}
    feat_rows, pl_rows = [], []
    for f in range(6):
        seg = np.zeros((8, 12), dtype=np.uint16)
        gt = np.full((8, 12), 255, dtype=np.uint8)
        for sid, cls in enumerate([0, 2, 13], start=1):
            seg[:, (sid - 1) * 4:(sid - 1) * 4 + 3] = sid
            gt[:, (sid - 1) * 4:sid * 4] = cls
            gt[0, (sid - 1) * 4] = 255  # void pixels never vote
            d = centres[cls] + 0.1 * rng.normal(size=16)
            feat_rows.append({"frame_id": f"f{f}", "camera": "front", "segment_id": sid,
                              "descriptor": (d / np.linalg.norm(d)).astype(np.float32).tolist()})
        pl_rows.append({"frame_id": f"f{f}", "camera": "front", "segment_ids": encode_png(seg),
                        "gt_semantic": encode_png(gt)})
    (tmp_path / "features").mkdir()
    (tmp_path / "cluster" / "pseudolabels").mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(feat_rows), tmp_path / "features" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(pl_rows), tmp_path / "cluster" / "pseudolabels" / "part-00000.parquet")
    metrics, png = knn_analysis(str(tmp_path / "features"), str(tmp_path / "cluster" / "pseudolabels"), k=3)
    assert metrics["knn_acc"] == 1.0 and metrics["knn_n_segments"] == 18
    capped, _ = knn_analysis(str(tmp_path / "features"), str(tmp_path / "cluster" / "pseudolabels"), k=3,
                             max_segments=9)  # the first 3 frames' segments: bounded memory on large runs
    assert capped["knn_n_segments"] == 9 and capped["knn_acc"] == 1.0
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert knn_analysis(str(tmp_path / "missing"), str(tmp_path / "missing"), k=3) == ({}, None)


def test_knn_analysis_splits_by_drive_so_a_twin_in_the_next_frame_does_not_count(tmp_path):
    """Two drives of two frames, each frame with a class-0 and a class-2 segment. A descriptor identifies the object
    (drive b's road looks like drive a's car): split by frame, each test segment finds its twin (accuracy 1); split
    by drive, every one is wrong (0). The drives come from the ingest frame parts (`frame_sequences`)."""
    import pyarrow.parquet as pq

    from raydseg.data.schema import encode_png
    from raydseg.eval.knn import frame_sequences, knn_analysis

    look = {("a", 0): [1.0, 0, 0], ("a", 2): [0, 1.0, 0], ("b", 0): [0, 1.0, 0.5], ("b", 2): [1.0, 0, 0.5]}
    drives = {"f0": "a", "f1": "a", "f2": "b", "f3": "b"}
    seg = np.array([[1, 1, 2, 2]] * 4, dtype=np.uint16)
    gt = np.array([[0, 0, 2, 2]] * 4, dtype=np.uint8)
    feat = [{"frame_id": f, "camera": "front", "segment_id": sid, "descriptor": look[(d, cls)]}
            for f, d in drives.items() for sid, cls in ((1, 0), (2, 2))]
    pl = [{"frame_id": f, "camera": "front", "segment_ids": encode_png(seg), "gt_semantic": encode_png(gt)}
          for f in drives]
    for folder, rows in (("features", feat), ("pseudolabels", pl),
                         ("frames", [{"frame_id": f, "sequence": d} for f, d in drives.items()])):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / folder / "part-00000.parquet")
    sequences = frame_sequences(str(tmp_path / "frames"))
    assert sequences == drives and frame_sequences(str(tmp_path / "missing")) == {}
    by_frame, _ = knn_analysis(str(tmp_path / "features"), str(tmp_path / "pseudolabels"), k=1)
    by_drive, _ = knn_analysis(str(tmp_path / "features"), str(tmp_path / "pseudolabels"), k=1,
                               frames_dir=str(tmp_path / "frames"))
    assert by_frame["knn_acc"] == 1.0 and by_drive["knn_acc"] == 0.0


def test_knn_predict_majority_vote_and_segment_majority():
    from raydseg.eval.knn import knn_predict, segment_majority_class

    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.95, 0.05]])
    labels = np.array([0, 0, 1, 1, 1])
    assert knn_predict(train, labels, np.array([[1.0, 0.02], [0.05, 1.0]]), k=3).tolist() == [0, 1]
    seg = np.array([[1, 1, 1, 2], [1, 0, 2, 2]])
    gt = np.array([[3, 3, 255, 5], [4, 3, 255, 255]])
    assert segment_majority_class(seg, gt) == {1: 3, 2: 5}


def test_scene_split_keeps_each_drive_on_one_side_and_falls_back_to_frames():
    """Every other sorted sequence tests (b: f1, f2); with one sequence, or none given, every other sorted frame."""
    from raydseg.eval.knn import scene_split

    frames = ["f2", "f0", "f1", "f0", "f2", "f3"]
    drives = {"f0": "a", "f1": "b", "f2": "b", "f3": "c"}
    assert scene_split(frames, drives).tolist() == [True, False, True, False, True, False]
    assert scene_split(frames, {f: "a" for f in drives}).tolist() == [False, False, True, False, False, True]
    assert scene_split(frames).tolist() == [False, False, True, False, False, True]  # f1 and f3 test


def test_colour_histogram_bins_each_segments_pixels():
    """Segment 1: two red pixels and one black; segment 2: one white pixel. 4 levels: red is bin (3, 0, 0) = 48."""
    from raydseg.eval.knn import colour_histogram

    image = np.array([[[255, 0, 0], [250, 10, 10], [0, 0, 0], [255, 255, 255]]], np.uint8)
    seg = np.array([[1, 1, 1, 2]])
    h = colour_histogram(image, seg, np.array([1, 2]))
    assert h.shape == (2, 64) and np.allclose(np.linalg.norm(h, axis=1), 1.0)
    assert np.isclose(h[0, 48], np.sqrt(2 / 3)) and np.isclose(h[0, 0], np.sqrt(1 / 3)) and h[1, 63] == 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_real_segmenter_sliding_window_metrics_equal_recount_of_written_predictions(
        tmp_path, ray_local, mlflow_server):
    """Default loader/predictor (raydseg.models): the logged metrics are those of the written prediction PNGs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from raydseg.config import load_config
    from raydseg.eval.matching import hungarian_mapping
    from raydseg.eval.metrics import apply_mapping, confusion_matrix, scores
    from raydseg.models.io import save_model
    from raydseg.models.segmenter import build_segmenter
    from raydseg.pipeline import StageContext
    from raydseg.stages import evaluate

    root = tmp_path / "run"
    gts = _write_split(root, "day", 2)
    torch.manual_seed(0)
    model_cfg = {"backbone": "vit_tiny_patch16_224", "n_cls": 5, "decoder": "linear"}
    save_model(build_segmenter(model_cfg), model_cfg, str(root / "teacher" / "model"))
    cfg = load_config(overrides=["synthetic.eval_conditions=day", "eval.models=teacher", "eval.size=32",
                                 "eval.window=16", "eval.stride=8", "eval.knn_k=0", "eval.n_overlays=1"])
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("eval-test-real")
    with mlflow.start_run(nested=False) as run:
        ctx = StageContext(cfg=cfg, run_root=str(root), out_dir=str(root / "evaluate"), tracking_uri=mlflow_server,
                           mlflow_run_id=run.info.run_id)
        result = evaluate.run(ctx)
    assert result.rejects == [] and result.counts == {"images_synthetic_day": 2}
    preds = [np.array(Image.open(root / "evaluate/predictions/teacher/synthetic_day" / f"synth_{i:06d}_000000.png"))
             for i in range(2)]
    assert all(p.shape == (H, W) and p.max() < 5 for p in preds)
    cm = sum(confusion_matrix(p.astype(np.int64), g, 5, 19) for p, g in zip(preds, gts))
    expected = scores(apply_mapping(cm, hungarian_mapping(cm)))
    logged = MlflowClient(mlflow_server).get_run(run.info.run_id).data.metrics
    assert logged["eval/teacher/synthetic_day/miou"] == pytest.approx(expected["miou"])
    assert logged["eval/teacher/synthetic_day/pixel_acc"] == pytest.approx(expected["pixel_acc"])
