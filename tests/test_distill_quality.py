"""Issue 7's quality check: on blob images with dense ground truth, the distilled student (EMA, soft targets,
LiDAR-segment refinement) is not worse than the teacher it starts from (Hungarian-mapped mIoU, held-out images).
The same experiment with the ablation rows is `jobs/benchmarks/distill_blobs.py`."""
from __future__ import annotations

import pytest

from raydseg.config import load_config
from raydseg.eval.matching import fit_mapping
from raydseg.eval.metrics import apply_mapping, confusion_matrix, scores

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_CLS = 4
COMMON = {"crop_size": 96, "batch_size": 8, "log_every": 10, "val_every": -1, "checkpoint_every": 1000,
          "torch_threads": 1}  # the thresholds below were measured with one thread


def heldout_miou(model_dir: str, rows: list[dict]) -> float:
    from raydseg.models.infer import predict_image
    from raydseg.models.io import load_model

    model = load_model(model_dir)
    conf = sum(confusion_matrix(predict_image(model, r["image"]), r["gt"], N_CLS, N_CLS) for r in rows)
    return float(scores(apply_mapping(conf, fit_mapping(conf, "hungarian")))["miou"])


def test_student_is_not_worse_than_its_teacher_on_blobs(tmp_path, ray_local):
    from raydseg.train import student, teacher
    from raydseg.train.synthetic import write_blob_parts

    pl = str(tmp_path / "pl")
    write_blob_parts(pl, n_images=48, h=96, w=128, n_parts=4, n_cls=N_CLS, seed=0)
    held_out = write_blob_parts(str(tmp_path / "heldout"), n_images=12, h=96, w=128, n_parts=1, n_cls=N_CLS, seed=99)
    tcfg = load_config(overrides=[f"teacher.{k}={v}" for k, v in {**COMMON, "n_cls": N_CLS, "steps": 60}.items()]
                       + [f"cluster.k={N_CLS - 1}", "proposals.sky_margin_deg=-1"])  # blob classes: ground + k
    teacher.train(tcfg, pl, str(tmp_path / "teacher"))
    # degrade 0: the blobs have no poor light or fog to be robust to, and degraded views cost the student about 3
    # points of blob mIoU in 40 steps (docs/results.md); this test is about the distillation itself, refinement
    # included (the paper's student: EMA teacher, plain distillation, at the lr the thresholds were measured with;
    # the embedded default has EMA off, weighs the classes alike and trains at four times that lr)
    scfg = load_config(overrides=[f"student.{k}={v}" for k, v in {**COMMON, "steps": 40, "degrade": 0, "refine": True,
                                                                   "ema": True, "lr": 0.0002,
                                                                   "class_balance": 0}.items()])
    student.train(scfg, pl, str(tmp_path / "teacher" / "model"), str(tmp_path / "student"))
    t = heldout_miou(str(tmp_path / "teacher" / "model"), held_out)
    s = heldout_miou(str(tmp_path / "student" / "model"), held_out)
    print(f"held-out mIoU: teacher {t:.3f}, student {s:.3f}")
    assert t > 0.5, "the teacher did not learn the blobs: the comparison would mean nothing"
    # not lower, up to the run-to-run spread of CPU training: measured teacher 0.696 / 0.702, student 0.701 / 0.708
    # in two fp32 runs of the same seed; 0.716 / 0.722 in bf16 (`amp: auto` on a CPU with AVX512-BF16)
    assert s >= t - 0.01, (t, s)
