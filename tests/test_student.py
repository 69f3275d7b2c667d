"""Student stage ingredients: exact EMA, soft-target loss, LiDAR-segment refinement, EMA in checkpoints, and a
student run on Ray Train initialised from a saved teacher."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from raydseg.models.ema import EMA
from raydseg.models.losses import ce_loss, soft_target_loss
from raydseg.models.segmenter import build_segmenter
from raydseg.refine import refine_numpy, refine_with_segments, segment_mean
from raydseg.train.engine import load_train_state, lr_scheduler, save_train_state

TINY = {"backbone": "vit_tiny_patch16_224", "n_cls": 4, "drop_path": 0.0, "dropout": 0.0}


def test_ema_update_is_m_teacher_plus_one_minus_m_student():
    """timm's ModelEmaV3 computes it as a lerp: equal to the formula up to float32 rounding."""
    torch.manual_seed(0)
    student = build_segmenter(TINY)
    ema = EMA(student)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    m = 0.9
    ema.update(student, m)
    s = student.state_dict()
    for k, t in ema.state_dict().items():
        torch.testing.assert_close(t, m * before[k] + (1 - m) * s[k], rtol=1e-6, atol=1e-7, msg=k)
        assert not torch.equal(t, before[k]), k
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_with_momentum_one_keeps_teacher_and_zero_copies_student():
    student = build_segmenter(TINY)
    ema = EMA(student)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0).add_(1.0)
    ema.update(student, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema.update(student, 0.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ema.state_dict().items())


def test_soft_target_loss_equals_cross_entropy_for_one_hot_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    one_hot = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    assert torch.allclose(soft_target_loss(logits, one_hot, temperature=1.0), ce_loss(logits, target), atol=1e-6)
    # valid mask selects pixels like the ignore index does
    valid = torch.rand(2, 6, 7) > 0.5
    assert torch.allclose(soft_target_loss(logits, one_hot, 1.0, valid),
                          ce_loss(logits, torch.where(valid, target, 255)), atol=1e-6)


def test_soft_target_loss_is_minimal_at_the_teacher_distribution():
    teacher = torch.softmax(torch.randn(1, 4, 3, 3) / 2.0, 1)
    at_teacher = soft_target_loss(teacher.log() * 2.0, teacher, temperature=2.0)  # student/T = log teacher
    other = soft_target_loss(torch.randn(1, 4, 3, 3), teacher, temperature=2.0)
    assert at_teacher < other


def test_refinement_turns_segment_into_majority_class_and_leaves_outside_untouched():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (20, 30))
    segments = np.zeros((20, 30), np.int64)
    segments[2:10, 3:12] = 1
    segments[12:18, 15:28] = 7
    labels[2:10, 3:12] = 2
    noisy = rng.random((8, 9)) < 0.3
    labels[2:10, 3:12][noisy] = rng.integers(0, 5, noisy.sum())  # a noisy prediction, 2 still the majority
    labels[12:18, 15:28] = 4
    labels[12, 15:20] = 1
    out = refine_numpy(labels, segments, 5)
    assert (out[segments == 1] == 2).all() and (out[segments == 7] == 4).all()
    assert np.array_equal(out[segments == 0], labels[segments == 0])


def test_refinement_is_per_image_in_a_batch():
    labels = torch.tensor([[[0, 0, 1]], [[1, 1, 0]]])
    segments = torch.tensor([[[1, 1, 1]], [[1, 1, 1]]])  # same id in two images = two different segments
    assert refine_with_segments(labels, segments, 2).tolist() == [[[0, 0, 0]], [[1, 1, 1]]]


def test_segment_mean_averages_probabilities_per_segment_and_image():
    p0 = torch.tensor([[0.9, 0.6, 0.6, 0.2], [0.1, 0.4, 0.4, 0.8]])  # class-0 probability, (image, x)
    probs = torch.stack([p0, 1 - p0], 1).unsqueeze(2)  # (B=2, C=2, H=1, W=4)
    segments = torch.tensor([[[1, 1, 1, 0]], [[1, 1, 2, 2]]])  # same id 1 in both images = two segments
    out = segment_mean(probs, segments)
    assert torch.allclose(out[:, 0, 0], torch.tensor([[0.7, 0.7, 0.7, 0.2], [0.25, 0.25, 0.6, 0.6]]))
    assert torch.allclose(out.sum(1), torch.ones(2, 1, 4))  # pixel (0, 3) has no segment: kept


def test_mean_vote_follows_the_teacher_confidence_where_the_majority_does_not():
    """Segment of 3 pixels: two lean weakly to class 1, one is sure of class 0. The majority vote gives 1; the mean
    of the probabilities gives 0, and the soft targets are that mean on every pixel of the segment."""
    from raydseg.train.steps import student_targets

    p = torch.tensor([[0.45, 0.45, 0.98], [0.55, 0.55, 0.02]])  # (C=2, W=3)
    teacher = lambda x: p.log().view(1, 2, 1, 3).expand(x.shape[0], -1, -1, -1)  # noqa: E731  logits = log p
    batch = {"segments": torch.ones(1, 1, 3, dtype=torch.long)}
    x = torch.zeros(1, 3, 1, 3)
    kw = dict(soft_targets=True, temperature=1.0, refine=True)
    hard, probs = student_targets(teacher, x, batch, 2, refine_vote="majority", **kw)
    assert hard.tolist() == [[[1, 1, 1]]] and probs[0, 1].tolist() == [[1.0, 1.0, 1.0]]
    hard, probs = student_targets(teacher, x, batch, 2, refine_vote="mean", **kw)
    assert hard.tolist() == [[[0, 0, 0]]]
    assert torch.allclose(probs[0, :, 0], torch.tensor([[0.6267] * 3, [0.3733] * 3]), atol=1e-4)
    hard, probs = student_targets(teacher, x, batch, 2, refine_vote="mean", **{**kw, "soft_targets": False})
    assert hard.tolist() == [[[0, 0, 0]]] and probs is None


def test_class_balanced_distillation_weighs_each_teacher_class_alike():
    """The teacher paints class 0 on 15 of 16 pixels and class 1 on one. At class_balance 1 the student's soft loss
    is the mean over those two classes of their pixels' mean loss; at 0 it is the plain pixel mean."""
    from raydseg.train.steps import DistillationStep

    torch.manual_seed(0)
    t_logits = torch.randn(2, 3, 4, 4)
    t_logits[:, 0] += 5.0
    t_logits[:, 1, 0, 0] += 20.0  # pixel (0, 0) of each image: class 1
    teacher = lambda x: t_logits  # noqa: E731
    s_logits = torch.randn(2, 3, 4, 4)
    cfg = dict(soft_targets=True, temperature=1.0, refine=False, refine_vote="majority", mix="none")
    batch = {"image": torch.zeros(2, 4, 4, 3, dtype=torch.uint8)}
    loss = lambda p: DistillationStep(teacher, 3, {**cfg, "class_balance": p}, DIST_MEAN, DIST_STD)(  # noqa: E731
        lambda x: s_logits, batch, 0)[0]
    per_px = -(torch.softmax(t_logits, 1) * torch.log_softmax(s_logits, 1)).sum(1)
    hard = t_logits.argmax(1)
    assert torch.allclose(loss(0.0), per_px.mean())
    assert torch.allclose(loss(1.0), torch.stack([per_px[hard == c].mean() for c in (0, 1)]).mean())
    hard_cfg = {**cfg, "soft_targets": False, "class_balance": 1.0}  # hard targets: the class-balanced CE
    hard_step = DistillationStep(teacher, 3, hard_cfg, DIST_MEAN, DIST_STD)
    assert torch.allclose(hard_step(lambda x: s_logits, batch, 0)[0], ce_loss(s_logits, hard, balance=1.0))


def test_checkpoint_resume_restores_ema_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(TINY)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = lr_scheduler(opt, 10, "poly", 2)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    for _ in range(2):
        opt.zero_grad()
        ce_loss(model(x), y).backward()
        opt.step()
        sched.step()
        ema.update(model, 0.9)
    save_train_state(str(tmp_path / "state.pt"), model, opt, sched, 2, ema)

    model2 = build_segmenter({**TINY})
    ema2 = EMA(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = lr_scheduler(opt2, 10, "poly", 2)
    assert load_train_state(str(tmp_path / "state.pt"), model2, opt2, sched2, ema2) == 2
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(KeyError, match="no EMA state"):
        save_train_state(str(tmp_path / "plain.pt"), model, opt, sched, 2)
        load_train_state(str(tmp_path / "plain.pt"), model2, opt2, sched2, ema2)


@pytest.mark.ray
@pytest.mark.slow
def test_student_run_starts_from_teacher_and_exports_ema_checkpointed(ray_local, tmp_path):
    """Also: a student whose training worker is SIGKILLed at step 2 is restarted by Ray Train from its checkpoint
    (model, optimiser, EMA, data position) and exports the uninterrupted run's weights, degraded views included."""
    from raydseg.config import load_config
    from raydseg.models.io import load_model, save_model
    from raydseg.train.engine import weights_digest
    from raydseg.train.student import train
    from raydseg.train.synthetic import write_blob_parts
    from train_faults import KillAt

    write_blob_parts(str(tmp_path / "pl"), n_images=12, h=48, w=64, n_parts=2, n_cls=4)
    torch.manual_seed(1)
    teacher = build_segmenter(TINY)
    save_model(teacher, TINY, str(tmp_path / "teacher"))
    sets = {"student.steps": 3, "student.torch_threads": 1, "student.batch_size": 2, "student.crop_size": 48,
            "student.checkpoint_every": 1, "student.log_every": 1, "student.val_every": -1, "student.ema": True,
            "student.ema_momentum": 0.5, "student.lr": 1e-3, "student.degrade": 0.5}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in sets.items()])
    result = train(cfg, str(tmp_path / "pl"), str(tmp_path / "teacher"), str(tmp_path / "out"), name="student")
    assert result.metrics["step"] == 3
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
    exported = load_model(str(tmp_path / "out" / "model")).state_dict()
    for k, v in state["ema"].items():  # the exported model is the checkpointed EMA teacher
        assert torch.equal(v, exported[k]), k
    # EMA teacher moved away from the initial teacher, and is between it and the student
    t0 = teacher.state_dict()["decoder.cls_emb"]
    e, s = state["ema"]["decoder.cls_emb"], state["model"]["decoder.cls_emb"]
    assert not torch.equal(e, t0) and (e - t0).norm() < (s - t0).norm()

    marker = tmp_path / "killed_once"
    killed = train(cfg, str(tmp_path / "pl"), str(tmp_path / "teacher"), str(tmp_path / "killed"), name="killed",
                   callbacks=[KillAt(2, 0, str(marker))])
    # restarted from the step-1 checkpoint, or from scratch when Ray Train saw the death before registering it
    assert marker.exists() and killed.metrics["step"] == 3 and killed.metrics["start_step"] in (0, 1)
    assert weights_digest(load_model(str(tmp_path / "killed" / "model"))) == weights_digest(load_model(
        str(tmp_path / "out" / "model")))


DIST_MEAN, DIST_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _distillation_case(mix: str):
    """A 1x1-conv student and teacher (4 classes), two clean and two degraded 8 x 8 images, and a step config."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 256, (2, 8, 8, 3), generator=g, dtype=torch.uint8)
    degraded = torch.randint(0, 256, (2, 8, 8, 3), generator=g, dtype=torch.uint8)
    cfg = {"soft_targets": True, "temperature": 2.0, "refine": False, "refine_vote": "majority", "mix": mix,
           "class_balance": 0.0}
    return student, teacher, clean, degraded, cfg


def test_distillation_student_sees_the_degraded_view_and_teacher_the_clean_one():
    """With batch["degraded"], the loss is the student's logits on the degraded view against the teacher's
    softmax on the clean view; without it, both see the clean view."""
    from raydseg.models.segmenter import normalize
    from raydseg.train.steps import DistillationStep

    student, teacher, clean, degraded, cfg = _distillation_case("none")
    mean, std = DIST_MEAN, DIST_STD
    step = DistillationStep(teacher, 4, cfg, mean, std)
    norm = lambda im: normalize(im, mean, std)  # noqa: E731
    with torch.no_grad():
        probs = torch.softmax(teacher(norm(clean)) / 2.0, 1)
        expect = soft_target_loss(student(norm(degraded)), probs, 2.0)
        same_view = soft_target_loss(student(norm(clean)), probs, 2.0)
        loss, _ = step(student, {"image": clean, "degraded": degraded}, 0)
        plain, _ = step(student, {"image": clean}, 0)
    assert torch.allclose(loss, expect) and torch.allclose(plain, same_view)
    assert not torch.allclose(loss, plain)


def test_classmix_pastes_half_of_each_images_teacher_classes_on_the_next_image_with_its_targets():
    from raydseg.models.segmenter import normalize
    from raydseg.train.steps import DistillationStep, classmix_masks, paste

    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[0] = torch.arange(4).repeat_interleave(4).view(4, 4)  # four classes, one per row
    labels[1, :, 2:] = 5  # two classes
    # image 2: one class
    torch.manual_seed(3)
    masks = classmix_masks(labels)
    assert masks[0].sum() == 8 and all(masks[0][labels[0] == c].all() or not masks[0][labels[0] == c].any()
                                       for c in range(4))  # 2 of 4 classes, each whole
    assert masks[1].sum() == 8 and masks[2].all()  # 1 of 2 classes (whole); 1 of 1
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4)  # image b holds the value b
    pasted = paste(x, masks)
    assert torch.equal(pasted[0], torch.where(masks[0], 0.0, 1.0).expand(2, 4, 4))
    assert torch.equal(pasted[2], torch.full((2, 4, 4), 2.0))  # all of image 2's pixels are pasted onto image 0
    assert torch.equal(paste(labels, masks)[1], torch.where(masks[1], labels[1], labels[2]))

    student, teacher, clean, degraded, cfg = _distillation_case("classmix")
    mean, std = DIST_MEAN, DIST_STD
    with torch.no_grad():
        logits = teacher(normalize(clean, mean, std))  # the teacher sees each clean image whole
        torch.manual_seed(7)
        masks = classmix_masks(logits.argmax(1))
        assert 0 < masks.float().mean() < 1
        expect = soft_target_loss(student(paste(normalize(degraded, mean, std), masks)),
                                  paste(torch.softmax(logits / 2.0, 1), masks), 2.0)
        torch.manual_seed(7)  # as the training loop seeds each step
        loss, _ = DistillationStep(teacher, 4, cfg, mean, std)(student, {"image": clean, "degraded": degraded}, 0)
        unmixed, _ = DistillationStep(teacher, 4, {**cfg, "mix": "none"}, mean, std)(
            student, {"image": clean, "degraded": degraded}, 0)
    assert torch.allclose(loss, expect) and not torch.allclose(loss, unmixed)


def test_segmentation_step_trains_on_the_degraded_view_when_the_batch_has_one():
    from raydseg.models.segmenter import normalize
    from raydseg.train.steps import SegmentationStep

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)
    g = torch.Generator().manual_seed(2)
    clean, degraded = (torch.randint(0, 256, (2, 8, 8, 3), generator=g, dtype=torch.uint8) for _ in range(2))
    label = torch.randint(0, 4, (2, 8, 8), generator=g)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    step = SegmentationStep(mean, std)
    with torch.no_grad():
        loss, _ = step(model, {"image": clean, "degraded": degraded, "label": label}, 0)
        assert torch.allclose(loss, ce_loss(model(normalize(degraded, mean, std)), label))
        assert not torch.allclose(loss, ce_loss(model(normalize(clean, mean, std)), label))
