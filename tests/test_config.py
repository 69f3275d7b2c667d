import re

import pytest

from raydseg.config import ConfigError, apply_overrides, config_from_dict, load_config, Config


def test_overrides_are_typed_and_applied():
    cfg = load_config(overrides=["cluster.k=12", "data.cameras=front,left", "student.ema_momentum=1",
                                 "student.soft_targets=false", "run.name=abc"])
    assert cfg.cluster.k == 12 and isinstance(cfg.cluster.k, int)
    assert cfg.data.cameras == ["front", "left"]
    assert cfg.student.ema_momentum == 1.0 and isinstance(cfg.student.ema_momentum, float)
    assert cfg.student.soft_targets is False
    assert cfg.run.name == "abc"


def test_amp_reads_the_former_boolean():
    """`amp: true` meant bf16 on GPU only, `false` never: configs written then keep their meaning."""
    cfg = load_config(overrides=["teacher.amp=true", "student.amp=false", "pretrain.amp=all"])
    assert (cfg.teacher.amp, cfg.student.amp, cfg.pretrain.amp) == ("gpu", "none", "all")
    assert Config().teacher.amp == Config().student.amp == "auto" and Config().pretrain.amp == "gpu"


def test_string_fields_keep_numeric_looking_text():
    cfg = load_config(overrides=["run.name=0123"])
    assert cfg.run.name == "0123"


@pytest.mark.parametrize("override, message", [
    ("cluster.kk=3", "unknown key 'cluster.kk'"),
    ("nosection.k=3", "unknown config section 'nosection'"),
    ("cluster.k=abc", "cluster.k: input should be a valid integer, got 'abc'"),
    ("cluster.k=1.5", "cluster.k: input should be a valid integer, got 1.5"),
    ("student.ema=maybe", "student.ema: input should be a valid boolean, got 'maybe'"),
    ("teacher.amp=fast", "teacher.amp: input should be 'none', 'gpu', 'auto' or 'all', got 'fast'"),
    ("synthetic.conditions=day,rain", "synthetic.conditions[1]: input should be 'day', 'night' or 'fog', got 'rain'"),
    ("run.name=../up", "run.name: string should match pattern"),
    ("cluster.k", "not of the form section.key=value"),
    ("k=3", "must be section.key"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


def test_yaml_unknown_keys_and_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  k: 10\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'cluster.bogus'"):
        load_config(bad)
    bad.write_text("teacher:\n  steps: ten\n")
    with pytest.raises(ConfigError, match="teacher.steps: input should be a valid integer, got 'ten'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_problem_is_reported_at_once_one_line_each():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["cluster.k=0", "teacher.lr=-1", "features.num_actors=0"])
    assert e.value.problems == ["features.num_actors: input should be greater than or equal to 1, got 0",
                                "cluster.k: input should be greater than or equal to 2, got 0",
                                "teacher.lr: input should be greater than 0, got -1"]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["teacher.n_cls=5", "student.crop_size=100", "eval.fit_set=zz", "run.stages=bogus"])
    assert e.value.problems == [
        "run.stages: unknown stage(s) bogus (stages: ingest, pretrain, proposals, features, cluster, teacher, student, "
        "evaluate)",
        "teacher.n_cls: 5 does not match cluster.k + ground (cluster.ground_k) + sky (proposals.sky_margin_deg >= 0) "
        "= 14 (0 = derive it)",
        "student.crop_size: 100 must be a positive multiple of the patch size 16 of vit_tiny_patch16_224",
        "eval.fit_set: 'zz' is not one of the eval sets (synthetic_day, synthetic_night, synthetic_fog)"]


def test_assignment_is_validated_too():
    cfg = load_config()
    with pytest.raises(Exception, match="greater than or equal to 2"):
        cfg.cluster.k = 1


def test_yaml_then_overrides_and_round_trip(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("cluster:\n  k: 10\nrun:\n  name: fromyaml\n")
    cfg = load_config(good, ["cluster.k=11"])
    assert (cfg.cluster.k, cfg.run.name) == (11, "fromyaml")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.flat()["cluster.k"] == 11


def test_section_hash_changes_only_with_its_sections():
    a, b = Config(), apply_overrides(Config(), ["cluster.k=7"])
    assert a.section_hash("data", "synthetic") == b.section_hash("data", "synthetic")
    assert a.section_hash("cluster") != b.section_hash("cluster")


def test_shipped_configs_load():
    """default.yaml is exactly the dataclass defaults (so the two never drift); the paper configs hold its numbers."""
    import pathlib
    configs = pathlib.Path(__file__).resolve().parent.parent / "configs"
    assert {p.name for p in configs.glob("*.yaml")} >= {"default.yaml", "waymo.yaml", "waymo_all_cameras.yaml",
                                                       "nuscenes.yaml"}
    assert load_config(configs / "default.yaml") == Config()
    for name, source in [("waymo.yaml", "waymo"), ("waymo_all_cameras.yaml", "waymo"), ("nuscenes.yaml", "nuscenes")]:
        cfg = load_config(configs / name)
        assert cfg.data.source == source and cfg.run.output_root.startswith("s3://")
        assert cfg.cluster.k == 30 and cfg.teacher.n_cls == 31 and cfg.features.crop_size == 224
        assert cfg.features.backbone == cfg.teacher.backbone == "vit_small_patch16_224.dino"
        assert cfg.teacher.crop_size == cfg.student.crop_size == 512 and cfg.student.ema_momentum == 0.999
        assert (cfg.eval.size, cfg.eval.window, cfg.eval.stride) == (1024, 512, 128)
        # the paper's, not the embedded default's
        assert (cfg.teacher.input_norm, cfg.student.mix, cfg.student.ema, cfg.student.refine,
                cfg.student.class_balance) == ("dataset", "none", True, True, 0.0)
    # the paper's Waymo selection (TOP LiDAR, FRONT camera, every 20th frame); the all-camera variant differs only there
    paper, every = load_config(configs / "waymo.yaml"), load_config(configs / "waymo_all_cameras.yaml")
    assert (paper.data.lidars, paper.data.cameras, paper.data.frame_stride) == (["TOP"], ["FRONT"], 20)
    assert (every.data.lidars, every.data.cameras, every.data.frame_stride) == (["TOP"], [], 1)
    for section in ("proposals", "features", "cluster", "teacher", "student", "eval"):
        assert paper.section_hash(section) == every.section_hash(section), section


def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    """`--config configs/waymo.yaml` (the README's form), `waymo.yaml` and `waymo` name the packaged file when no
    such path exists here; an existing path always wins; a missing one is an error naming it."""
    from raydseg.config import PACKAGED_CONFIGS, resolve_config_path
    from raydseg.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    for name in ("configs/waymo.yaml", "waymo.yaml", "waymo"):
        assert resolve_config_path(name) == PACKAGED_CONFIGS / "waymo.yaml"
        assert load_config(name).run.name == "waymo"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "waymo.yaml").write_text("run:\n  name: mine\n")
    assert load_config("configs/waymo.yaml").run.name == "mine"
    with pytest.raises(ConfigError, match=r"^config file configs/nope.yaml does not exist$"):
        load_config("configs/nope.yaml")


def test_sky_resolves_from_the_source():
    """`proposals.sky_margin_deg: null` marks sky on the synthetic world only: on real sensors the band under the top
    beam holds far trees and buildings (docs/results.md). An explicit value wins; a resolved config round-trips."""
    from raydseg.config import SYNTHETIC_SKY_MARGIN_DEG, ProposalsConfig, painted_classes

    assert load_config().proposals.sky_margin_deg == SYNTHETIC_SKY_MARGIN_DEG
    kitti = ["data.source=kitti", "data.root=/data/kitti"]
    real = load_config(overrides=kitti)
    assert real.proposals.sky_margin_deg == -1.0 and painted_classes(real) == painted_classes(load_config()) - 1
    assert config_from_dict(real.to_dict()).proposals.sky_margin_deg == -1.0
    assert load_config(overrides=kitti + ["proposals.sky_margin_deg=2.5"]).proposals.sky_margin_deg == 2.5
    assert load_config(overrides=["proposals.sky_margin_deg=-1"]).proposals.sky_margin_deg == -1.0
    assert ProposalsConfig().sky_margin == -1.0  # unresolved outside a Config: no sky


def test_ground_split_needs_the_ground_patches_and_a_patch_size():
    from raydseg.config import ground_pseudo_classes, painted_classes

    with pytest.raises(ConfigError) as e:
        load_config(overrides=["cluster.ground_k=3"])
    assert e.value.problems == ["cluster.ground_k: 3 needs cluster.ground_class and features.ground_patches (the "
                                "ground patches it clusters)"]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["features.ground_patches=true", "features.backbone=resnet50"])
    assert "features.ground_patches: the backbone resnet50 names no patch size (patchNN)" in e.value.problems
    cfg = load_config(overrides=["features.ground_patches=true", "cluster.ground_k=3"])
    assert ground_pseudo_classes(cfg) == 3 and painted_classes(cfg) == 3 + cfg.cluster.k + 1
    assert ground_pseudo_classes(load_config(overrides=["cluster.ground_class=false"])) == 0
