"""Eval-set readers on fixtures in each published layout and on the real Cityscapes sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydseg.eval.sets import (EvalSet, class_names, labelid_to_27_lut, labelid_to_trainid_lut, list_samples,
                               load_image, load_label, parse_eval_sets)

# labelIds with known trainIds: 7 road->0, 26 car->13, 23 sky->10, 0 unlabeled->255, 9 parking->255
LABEL_IDS = np.array([[7, 26, 23, 0], [9, 33, 24, 11]], dtype=np.uint8)
TRAIN_IDS = np.array([[0, 13, 10, 255], [255, 18, 11, 2]], dtype=np.uint8)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(2, 4, 3), dtype=np.uint8)


def test_label_table_comes_from_cityscapesscripts():
    lut = labelid_to_trainid_lut()
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[9] == 255
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))
    lut27 = labelid_to_27_lut()
    assert lut27[7] == 0 and lut27[9] == 2 and lut27[33] == 26 and lut27[6] == 255
    assert class_names(19)[0] == "road" and class_names(19)[18] == "bicycle"
    assert class_names(27)[2] == "parking" and len(class_names(27)) == 27


def test_parse_eval_sets_accepts_s3_paths_and_rejects_bad_entries():
    sets = parse_eval_sets("cs:cityscapes:/d/cs, acdc_night:acdc:s3://b/acdc")
    assert sets == [EvalSet("cs", "cityscapes", "/d/cs"), EvalSet("acdc_night", "acdc", "s3://b/acdc")]
    assert parse_eval_sets("") == []
    with pytest.raises(ValueError, match="unknown format 'kitti'"):
        parse_eval_sets("x:kitti:/p")
    with pytest.raises(ValueError, match="not NAME:FORMAT:PATH"):
        parse_eval_sets("x:cityscapes")
    with pytest.raises(ValueError, match="twice"):
        parse_eval_sets("x:cityscapes:/a,x:acdc:/b")


def test_cityscapes_layout_reads_labelids_and_27_classes(tmp_path):
    stem = "aachen_000000_000019"
    _write(tmp_path / f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png", _rgb(0))
    _write(tmp_path / f"gtFine/val/aachen/{stem}_gtFine_labelIds.png", LABEL_IDS)
    _write(tmp_path / "leftImg8bit/val/aachen/nolabel_000000_000001_leftImg8bit.png", _rgb(1))  # skipped
    samples = list_samples(EvalSet("cs", "cityscapes", str(tmp_path)))
    assert [s.sample_id for s in samples] == [stem]
    assert np.array_equal(load_image(samples[0]), _rgb(0))
    assert np.array_equal(load_label(samples[0]), TRAIN_IDS)
    s27 = list_samples(EvalSet("cs27", "cityscapes27", str(tmp_path)))
    assert load_label(s27[0], 27).tolist() == [[0, 19, 16, 255], [2, 26, 17, 4]]


def test_cityscapes_layout_falls_back_to_trainids(tmp_path):
    _write(tmp_path / "leftImg8bit/val/c/x_leftImg8bit.png", _rgb(0))
    _write(tmp_path / "gtFine/val/c/x_gtFine_labelTrainIds.png", TRAIN_IDS)
    (sample,) = list_samples(EvalSet("syn", "cityscapes", str(tmp_path)))
    assert sample.label_kind == "trainIds" and np.array_equal(load_label(sample), TRAIN_IDS)
    with pytest.raises(ValueError, match="needs labelIds"):
        load_label(sample, 27)


def test_acdc_layout_per_condition(tmp_path):
    for i, cond in enumerate(["fog", "night", "rain", "snow"]):
        stem = f"GOPR0475_frame_00000{i}"
        _write(tmp_path / f"rgb_anon/{cond}/val/GOPR0475/{stem}_rgb_anon.png", _rgb(i))
        _write(tmp_path / f"gt/{cond}/val/GOPR0475/{stem}_gt_labelIds.png", LABEL_IDS)
    night = list_samples(EvalSet("acdc_night", "acdc", str(tmp_path)))
    assert [s.sample_id for s in night] == ["GOPR0475_frame_000001"]
    assert np.array_equal(load_image(night[0]), _rgb(1))
    assert np.array_equal(load_label(night[0]), TRAIN_IDS)
    assert len(list_samples(EvalSet("acdc", "acdc", str(tmp_path)))) == 4


def test_dark_zurich_layout_val_night(tmp_path):
    stem = "GOPR0356_frame_000321"
    _write(tmp_path / f"rgb_anon/val/night/GOPR0356/{stem}_rgb_anon.png", _rgb(5))
    _write(tmp_path / f"gt/val/night/GOPR0356/{stem}_gt_labelIds.png", LABEL_IDS)
    (sample,) = list_samples(EvalSet("dz", "darkzurich", str(tmp_path)))
    assert sample.sample_id == stem and np.array_equal(load_label(sample), TRAIN_IDS)


def test_nighttime_driving_layout_coarse_labels(tmp_path):
    stem = "0_frame_0026"
    _write(tmp_path / f"leftImg8bit/test/night/{stem}_leftImg8bit.png", _rgb(6))
    _write(tmp_path / f"gtCoarse_daytime_trainvaltest/test/night/{stem}_gtCoarse_labelIds.png", LABEL_IDS)
    (sample,) = list_samples(EvalSet("nd", "nightdriving", str(tmp_path)))
    assert sample.sample_id == stem and np.array_equal(load_label(sample), TRAIN_IDS)


def test_real_cityscapes_sample_matches_its_train_ids(shared_data):
    root = Path(shared_data) / "mmseg_pseudo_cityscapes"
    (sample,) = list_samples(EvalSet("cs", "cityscapes", str(root)))
    assert sample.sample_id == "frankfurt_000000_000294" and sample.label_kind == "labelIds"
    image, label = load_image(sample), load_label(sample)
    assert image.shape == (128, 256, 3) and label.shape == (128, 256)
    counts = {c: int((label == c).sum()) for c in np.unique(label)}
    # README: labelIds road 9,740, car 1,802, building 12,744 map one-to-one to trainIds 0, 13, 2
    assert counts[0] == 9740 and counts[13] == 1802 and counts[2] == 12744
    official = np.array(Image.open(root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    assert (label != official).mean() < 0.003  # separately downscaled: 0.23 % boundary pixels differ
