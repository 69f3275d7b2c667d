"""Metrics vs a brute-force reference and the official cityscapesscripts evaluation; matching recovers structure."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raydseg.eval.matching import covered_scores, fit_mapping, hungarian_mapping, majority_mapping, map_prediction
from raydseg.eval.metrics import ConfusionAccumulator, apply_mapping, confusion_matrix, scores
from raydseg.eval.sets import labelid_to_trainid_lut


def _brute_force(preds: list[np.ndarray], gts: list[np.ndarray], n_classes: int) -> tuple[np.ndarray, float]:
    """Per-class IoU by explicit pixel loops over sets (independent of the confusion-matrix code)."""
    p = np.concatenate([x.ravel() for x in preds]).astype(int)
    g = np.concatenate([x.ravel() for x in gts]).astype(int)
    keep = g != 255
    p, g = p[keep], g[keep]
    ious = []
    for c in range(n_classes):
        inter = int(np.sum((p == c) & (g == c)))
        union = int(np.sum((p == c) | (g == c)))
        ious.append(inter / union if union else np.nan)
    return np.array(ious), float(np.mean(p == g))


def _random_case(rng: np.random.Generator, n: int = 3, h: int = 24, w: int = 32) -> tuple[list, list]:
    gts, preds = [], []
    for _ in range(n):
        gt = rng.integers(0, 19, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.2] = 255
        gt[gt == 16] = 255  # an absent class -> NaN IoU unless predicted
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, 19, size=(h, w))).astype(np.uint8)
        pred[rng.random((h, w)) < 0.05] = 255  # unmatched -> "ignore" prediction, an error
        gts.append(gt)
        preds.append(pred)
    return preds, gts


def test_scores_equal_brute_force_reference_with_ignore_predictions_counted_as_errors():
    preds, gts = _random_case(np.random.default_rng(0))
    acc = ConfusionAccumulator(n_gt=19)
    for p, g in zip(preds, gts):
        acc.update(np.where(p == 255, 19, p), g)  # pseudo-class 19 = unmatched
    mapping = np.arange(19)  # 19 -> -1 (beyond mapping)
    s = scores(apply_mapping(acc.matrix, mapping))
    ref_iou, ref_acc = _brute_force(preds, gts, 19)
    np.testing.assert_allclose(s["iou"], ref_iou, equal_nan=True)
    assert s["miou"] == pytest.approx(np.nanmean(ref_iou))
    assert s["pixel_acc"] == pytest.approx(ref_acc)
    assert acc.n_images == 3


def test_void_ground_truth_never_counts_and_predictions_are_never_masked():
    gt = np.array([[0, 255], [1, 255]], dtype=np.uint8)
    pred = np.array([[0, 7], [30, 30]])  # 30 is an over-clustered pseudo-class
    cm = confusion_matrix(pred, gt, n_pred=31, n_gt=19)
    assert cm.sum() == 2 and cm[0, 0] == 1 and cm[30, 1] == 1
    s = scores(apply_mapping(cm, hungarian_mapping(cm)))
    # 30 can match class 1 one-to-one here; with majority, too -> perfect
    assert s["pixel_acc"] == 1.0
    with pytest.raises(ValueError, match="never masked"):
        confusion_matrix(pred, gt, n_pred=19, n_gt=19)


def test_hungarian_recovers_permuted_labelling_exactly():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 19, size=(40, 50)).astype(np.uint8)
    gt[:3] = 255
    perm = rng.permutation(25)  # 25 pseudo-classes, 19 of them used
    pred = perm[np.where(gt == 255, 0, gt)]
    acc = ConfusionAccumulator(n_gt=19)
    acc.update(pred, gt)
    mapping = hungarian_mapping(acc.matrix)
    for c in range(19):
        assert mapping[perm[c]] == c
    unused = sorted(set(range(acc.matrix.shape[0])) - set(perm[:19].tolist()))
    assert all(mapping[u] == -1 for u in unused)
    s = scores(apply_mapping(acc.matrix, mapping))
    assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0
    mapped = map_prediction(pred, mapping)
    assert np.array_equal(mapped[gt != 255], gt[gt != 255])


def test_majority_mapping_many_to_one_with_more_clusters_than_classes():
    # 30 pseudo-classes: pseudo-class j covers class j % 19 mostly, with some confusion into class (j+1) % 19
    rows = []
    for j in range(30):
        r = np.zeros(19, dtype=np.int64)
        r[j % 19] = 100 + j
        r[(j + 1) % 19] = 10
        rows.append(r)
    rows.append(np.zeros(19, dtype=np.int64))  # an empty pseudo-class 30
    cm = np.stack(rows)
    maj = majority_mapping(cm)
    assert maj.tolist() == [j % 19 for j in range(30)] + [-1]
    hung = hungarian_mapping(cm)
    assert (hung >= 0).sum() == 19 and len(set(hung[hung >= 0].tolist())) == 19
    # many-to-one keeps every pixel of the duplicates; one-to-one loses the unmatched ones -> majority scores higher
    assert scores(apply_mapping(cm, maj))["pixel_acc"] > scores(apply_mapping(cm, hung))["pixel_acc"]
    # explicit pixel accuracy of the majority mapping
    assert scores(apply_mapping(cm, maj))["pixel_acc"] == pytest.approx(
        sum(100 + j for j in range(30)) / cm.sum())
    with pytest.raises(ValueError, match="unknown matching"):
        fit_mapping(cm, "greedy")


def test_hungarian_leaves_zero_overlap_pseudo_classes_unmatched():
    cm = np.zeros((5, 19), dtype=np.int64)
    cm[0, 3], cm[1, 7] = 50, 20  # pseudo-classes 2..4 never seen on the fitting split
    assert hungarian_mapping(cm).tolist() == [3, 7, -1, -1, -1]
    night = np.zeros((5, 19), dtype=np.int64)
    night[0, 3], night[4, 5] = 10, 10  # an unseen pseudo-class appears: an error, not an arbitrary class
    s = scores(apply_mapping(night, hungarian_mapping(cm)))
    assert s["pixel_acc"] == 0.5 and np.nansum(~np.isnan(s["iou"])) == 2  # classes 3 and 5 only


def test_covered_scores_count_only_labelled_pixels_after_hungarian_matching():
    """Pseudo-classes 0 / 1 stand for gt 2 / 0 on the covered half; one covered pixel is wrong. Uncovered pixels
    (255) carry gt class 1, which therefore never enters the score."""
    gt = np.array([[2, 2, 0, 0], [1, 1, 1, 1]])
    labels = np.array([[0, 0, 1, 0], [255, 255, 255, 255]])
    out = covered_scores(labels, gt, n_pred=2, n_gt=3)
    assert out["coverage"] == 0.5
    assert out["pixel_acc"] == 0.75
    # gt 2: TP 2, FP 1 (pseudo-class 0 on a gt-0 pixel) -> 2/3; gt 0: TP 1, FN 1 -> 1/2; gt 1 absent (NaN)
    assert np.isclose(out["miou"], (2 / 3 + 1 / 2) / 2) and np.isnan(out["iou"][1])


def test_accumulator_grows_rows_and_adds_partial_matrices():
    acc = ConfusionAccumulator(n_gt=3)
    acc.update(np.array([[0, 1]]), np.array([[0, 1]]))
    acc.update(np.array([[5]]), np.array([[2]]))
    assert acc.matrix.shape == (6, 3) and acc.matrix[5, 2] == 1
    acc.add(np.ones((2, 3), dtype=np.int64), n_images=2)
    assert acc.matrix.sum() == 3 + 6 and acc.n_images == 4


def test_scores_equal_official_cityscapes_evaluation(tmp_path, monkeypatch):
    """Write gt labelIds + predicted labelIds in the official layout and run cityscapesscripts' evaluator."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import labels, trainId2label

    rng = np.random.default_rng(3)
    lut = labelid_to_trainid_lut()
    gt_dir = tmp_path / "gtFine" / "val" / "testcity"
    pred_dir = tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    label_ids = np.array([lab.id for lab in labels if lab.id >= 0])
    acc = ConfusionAccumulator(n_gt=19)
    gt_files, pred_files = [], []
    for i in range(3):
        gt_ids = rng.choice(label_ids, size=(16, 24)).astype(np.uint8)  # includes void label ids (0..6, 9, ...)
        gt_train = lut[gt_ids]
        pred_train = np.where(rng.random(gt_ids.shape) < 0.5, gt_train, rng.integers(0, 19, gt_ids.shape))
        pred_train = pred_train.astype(np.int64)
        pred_train[rng.random(gt_ids.shape) < 0.1] = 255  # unmatched
        id_lut = np.zeros(256, dtype=np.uint8)
        for t in range(19):
            id_lut[t] = trainId2label[t].id
        id_lut[255] = 0  # "unlabeled": an ignored label id, an error for the official evaluator too
        stem = f"testcity_000000_{i:06d}"
        Image.fromarray(gt_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(id_lut[pred_train]).save(pred_dir / f"{stem}_pred.png")
        gt_files.append(str(gt_dir / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(pred_dir / f"{stem}_pred.png"))
        acc.update(np.where(pred_train == 255, 19, pred_train), gt_train)
    args = official.args
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists(pred_files, gt_files, args)
    ours = scores(apply_mapping(acc.matrix, np.arange(19)))
    for t in range(19):
        theirs = result["classScores"][trainId2label[t].name]
        if np.isnan(theirs):
            assert np.isnan(ours["iou"][t])
        else:
            assert ours["iou"][t] == pytest.approx(theirs, abs=1e-12)
    assert ours["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
