"""Fine-tuning's pieces without Ray: encoder transfer, the labelled split, bad input (the job: tests/test_full_run.py)."""
import numpy as np
import pytest
import torch

from raydseg.config import load_config
from raydseg.errors import InputError, UserError
from raydseg.finetune import N_CLASSES, init_weights, main, table
from raydseg.models.io import save_model
from raydseg.models.segmenter import build_segmenter
from raydseg.train.segmentation import _segmenter

TINY = {"backbone": "vit_tiny_patch16_224", "n_cls": 6, "drop_path": 0.0, "dropout": 0.0}


def test_student_init_takes_the_models_encoder_under_a_new_19_class_decoder(tmp_path):
    torch.manual_seed(0)
    src = build_segmenter(TINY)
    save_model(src, TINY, str(tmp_path / "student" / "model"))
    cfg = load_config()
    init = init_weights(cfg, str(tmp_path), "student")
    assert init == {"encoder_weights": "", "init_encoder_from": str(tmp_path / "student" / "model")}
    torch.manual_seed(1)
    model, _ = _segmenter({"model_cfg": {**TINY, "n_cls": N_CLASSES}, **init})
    assert model.n_cls == N_CLASSES
    for (name, a), b in zip(model.encoder.state_dict().items(), src.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    random, _ = _segmenter({"model_cfg": {**TINY, "n_cls": N_CLASSES}, **init_weights(cfg, str(tmp_path), "random")})
    assert not torch.equal(random.encoder.patch_embed.proj.weight, src.encoder.patch_embed.proj.weight)
    with pytest.raises(InputError, match=f"^--inits teacher: no model at {tmp_path}/teacher/model$"):
        init_weights(cfg, str(tmp_path), "teacher")


def test_labelled_split_shows_other_places_than_the_eval_split():
    from raydseg.data.sources.synthetic import render_eval_images

    syn = load_config(overrides=["synthetic.width=96", "synthetic.height=48"]).synthetic
    labelled = [rgb for _, _, rgb, _ in render_eval_images("day", syn, 0, labelled_train=4)]
    evals = [rgb for _, _, rgb, _ in render_eval_images("day", syn, 0)]
    assert len(labelled) == 4 and len(evals) == syn.eval_images_per_condition
    assert not any(np.array_equal(a, b) for a in labelled for b in evals)
    again = [rgb for _, _, rgb, _ in render_eval_images("day", syn, 0, labelled_train=2)]
    assert all(np.array_equal(a, b) for a, b in zip(again, labelled))  # N=2 is inside N=4


def test_table_pools_seeds_and_bad_arguments_fail_in_one_line(tmp_path):
    res = [{"init": "student", "n": 8, "seed": s, "sets": {"day": {"miou": m}}} for s, m in ((0, 0.2), (1, 0.3))]
    assert table(res, ["day"]).splitlines()[2] == "| student | 8 | 2 | 25.0 ± 7.1 |"
    with pytest.raises(UserError, match=r"^--n: expected comma-separated positive integers, got '0,8'$"):
        main(["--run", str(tmp_path), "--n", "0,8"])
    with pytest.raises(UserError, match=r"^--inits: expected some of student, teacher, features, random, got 'x'$"):
        main(["--run", str(tmp_path), "--inits", "x"])
    with pytest.raises(InputError, match=f"^--run: no run folder at {tmp_path} \\(its config.yaml is missing\\)$"):
        main(["--run", str(tmp_path)])
