"""The quality ladder (jobs/benchmarks/quality.py): paired ablations toggle each student part from the config, and a
seed's oracle and student reruns run side by side on their share of the cores, from the stored teacher."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raydseg.config import load_config
from raydseg.train.precision import use_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs" / "benchmarks"))
import quality  # noqa: E402


def test_each_ablation_toggles_its_part_from_the_configured_value():
    # the embedded default has EMA and refinement off, so their ablations turn them on; the paper's config has them on
    embedded = quality.ablation_variants(["ema", "soft_targets", "refine", "degrade", "class_balance", "lowlight"],
                                         load_config(None).student)
    assert embedded == {"with_ema": ["student.ema=true"], "no_soft_targets": ["student.soft_targets=false"],
                        "with_refine": ["student.refine=true"], "no_degrade": ["student.degrade=0"],
                        "no_class_balance": ["student.class_balance=0"], "no_lowlight": ["student.lowlight=0"]}
    paper = load_config("configs/waymo.yaml", overrides=["student.degrade=0", "student.lowlight=0"]).student
    assert quality.ablation_variants(["refine", "degrade", "class_balance", "lowlight"], paper) == {
        "no_refine": ["student.refine=false"], "with_degrade": ["student.degrade=0.8"],
        "with_class_balance": ["student.class_balance=1.0"], "with_lowlight": ["student.lowlight=0.15"]}


def test_an_unknown_part_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--out", "/tmp/never.json", "--ablate", "ema,dropout"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(  # after argparse's program name
        ": error: --ablate: unknown student part(s) dropout (known: ema, soft_targets, refine, degrade, class_balance,"
        " lowlight)")


def test_jobs_below_one_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--out", "/tmp/never.json", "--jobs", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(": error: --jobs: expected at least 1, got 0")


@pytest.mark.parametrize("ran,words", [(["--set", "teacher.steps=60"], "--set teacher.steps=60"),
                                       (None, "unrecorded arguments")])
def test_a_seed_finished_under_other_arguments_is_refused_before_any_work(tmp_path, capsys, ran, words):
    """A root's finished seed is another config's result: reusing it would pair two recipes as if they were one."""
    (tmp_path / "q1").mkdir()
    row = {"seed": 1, "wall_s": 1.0} if ran is None else {"seed": 1, "cli": ran, "wall_s": 1.0}
    (tmp_path / "q1" / "quality_row.json").write_text(json.dumps(row))
    with pytest.raises(SystemExit) as e:
        quality.main(["--out", str(tmp_path / "q.json"), "--root", str(tmp_path), "--seeds", "0,1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --root {tmp_path}: seed 1 finished there with {words}, not no --config / --set; give another --root")
    assert not (tmp_path / "q0").exists() and not (tmp_path / "q.json").exists()  # nothing started


def _random_init_checkpoint(path: Path, backbone: str, seed: int) -> Path:
    """The random-init ViT that the probes build for `seed`, saved as a checkpoint with the input statistics it is
    used with (timm's for the architecture), so it must score as random."""
    import torch
    from safetensors.torch import save_file

    from raydseg.features.backbone import create_backbone, input_stats_metadata

    torch.manual_seed(seed)
    vit = create_backbone(backbone, "", dynamic_img_size=True, num_classes=0)
    save_file(vit.state_dict(), str(path), input_stats_metadata(vit))
    return path


def _ladder(path: Path, rows: list[dict], overrides: list[str]) -> str:
    """A finished ladder's --out file, of the embedded default's checkpoint."""
    path.write_text(json.dumps({"seeds": rows, "config": None, "overrides": overrides,
                                "pretrained": load_config(None).features.weights}))
    return str(path)


def test_ladders_run_in_pieces_merge_into_one_with_paired_differences_over_all_their_seeds(tmp_path):
    rows = [{"seed": s, "teacher_day": t, "student_day": t + d, "oracle_day": 20.0}
            for s, t, d in ((3, 10.0, 1.0), (1, 12.0, 2.0), (2, 14.0, 3.0))]
    pieces = [_ladder(tmp_path / "a.json", rows[:1], ["student.steps=80"]),
              _ladder(tmp_path / "b.json", rows[1:], ["student.steps=80"])]
    out = tmp_path / "all.json"
    assert quality.main(["--out", str(out), "--set", "student.steps=80", "--ablate", "", "--merge", pieces[0],
                         "--merge", pieces[1]]) == 0
    ladder = json.loads(out.read_text())
    assert [r["seed"] for r in ladder["seeds"]] == [3, 1, 2] and ladder["overrides"] == ["student.steps=80"]
    assert ladder["summary"]["teacher_day"] == quality.stats([10.0, 12.0, 14.0])
    assert ladder["paired"]["student_minus_teacher_day"] == {"mean": 2.0, "std": 1.0, "se": 1.0 / 3 ** 0.5, "n": 3}
    assert ladder["paired"]["student_over_oracle_day"]["mean"] == pytest.approx((11 + 14 + 17) / 3 / 20)


@pytest.mark.parametrize("second_sets,second_seed,message", [
    (["student.steps=40"], 2, "--merge {b}: ran with --config None --set ['student.steps=40'] and checkpoint {w!r}, "
                              "not --config None --set ['student.steps=80'] and {w!r}"),
    (["student.steps=80"], 1, "--merge {b}: seed 1 is already in an earlier file")])
def test_a_merge_of_other_arguments_or_a_repeated_seed_is_refused_in_one_line(tmp_path, capsys, second_sets,
                                                                             second_seed, message):
    row = {"teacher_day": 10.0, "student_day": 11.0, "oracle_day": 20.0}
    a = _ladder(tmp_path / "a.json", [{"seed": 1, **row}], ["student.steps=80"])
    b = _ladder(tmp_path / "b.json", [{"seed": second_seed, **row}], second_sets)
    with pytest.raises(SystemExit) as e:
        quality.main(["--out", str(tmp_path / "all.json"), "--set", "student.steps=80", "--merge", a, "--merge", b])
    assert e.value.code == 2
    weights = load_config(None).features.weights
    assert capsys.readouterr().err.splitlines()[-1].endswith(": error: " + message.format(b=b, w=weights))
    assert not (tmp_path / "all.json").exists()


def test_the_drive_probe_splits_two_worlds_by_drive_and_scores_the_same_weights_alike(tmp_path, monkeypatch):
    from raydseg.eval.knn import scene_split
    from raydseg.train.pretrain import build_knn_probe

    monkeypatch.setattr(quality, "PROBE_DRIVES", 2)
    cfg = load_config(None)
    same = _random_init_checkpoint(tmp_path / "same.safetensors", cfg.features.backbone, 3)
    out = quality.drive_knn(str(tmp_path), cfg, str(same), cfg.eval.knn_k, 3)
    assert set(out) == {"drive_knn_colour", "drive_knn_random", "drive_knn_pretrained", "drive_knn_std_random",
                        "drive_knn_std_pretrained", "drive_knn_segments"}
    assert out["drive_knn_pretrained"] == out["drive_knn_random"]  # the same weights score the same
    assert out["drive_knn_std_pretrained"] == out["drive_knn_std_random"]
    assert all(0 <= out[k] <= 100 for k in out if k != "drive_knn_segments")
    probe = build_knn_probe(str(tmp_path / "probe3"), cfg.proposals, 100)  # the frames drive_knn wrote
    assert out["drive_knn_segments"] == len(probe["seg_id"]) > 0
    drives = {f: probe["sequences"][f] for f in probe["frame_ids"]}
    assert sorted(set(drives.values())) == ["w1003-seq0000_day", "w1003-seq0001_day", "w3-seq0000_day",
                                            "w3-seq0001_day"]  # one frame of each of 2 drives of worlds 3 and 1003
    tests = scene_split(list(drives), drives)
    assert sorted({drives[f] for f, t in zip(drives, tests) if t}) == ["w1003-seq0001_day", "w3-seq0001_day"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_seed_of_the_smoke_ladder_runs_its_oracle_and_rerun_side_by_side_from_the_stored_teacher(tmp_path):
    out, root = tmp_path / "q.json", tmp_path / "root"
    threads = [a for k in ("teacher", "student", "eval") for a in ("--set", f"{k}.torch_threads=2")]
    assert quality.main(["--out", str(out), "--root", str(root), "--seeds", "0", "--config", "configs/smoke.yaml",
                         "--ablate", "ema", "--jobs", "2", *threads]) == 0
    row = json.loads(out.read_text())["seeds"][0]
    assert row["cli"] == ["--config", "configs/smoke.yaml", *threads]  # what a resume must match
    for key in ("teacher_day", "teacher_night", "student_day", "student_night", "oracle_day", "oracle_fog",
                "with_ema_day", "with_ema_night", "teacher_unseen_fog", "student_unseen_day", "knn_random",
                "drive_knn_random", "drive_knn_colour", "pseudo_miou"):
        assert 0 <= row[key] <= 100, key
    assert row["teacher_day_se_images"] >= 0 and row["student_night_se_scenes"] >= 0
    base, rerun = (json.loads((root / r / "run.json").read_text())["stages"] for r in ("q0", "q0_with_ema"))
    assert rerun["teacher"] == base["teacher"] and rerun["student"] != base["student"]  # the stored teacher reused
    cfg = load_config(str(root / "q0_with_ema" / "config.yaml"))
    share = quality.job_threads(2)  # the rerun's student and evaluation on its share of the cores, the teacher as set
    assert (cfg.student.torch_threads, cfg.eval.torch_threads, cfg.teacher.torch_threads) == (share, share, 2)
    assert sorted(p.name for p in root.glob("mlflow_*.db")) == ["mlflow_q0.db", "mlflow_q0_with_ema.db"]
    # the oracle trains in the teacher stage's precision (bf16 where `amp: auto` resolves to it on this CPU)
    oracle_json = json.loads((root / "q0" / "oracle.json").read_text())
    assert oracle_json["autocast_bf16"] is use_bf16(load_config("configs/smoke.yaml").teacher.amp, "cpu")
    # a recipe candidate added to the finished seed: only its rerun runs, scored on the unseen world too
    assert quality.main(["--out", str(out), "--root", str(root), "--seeds", "0", "--config", "configs/smoke.yaml",
                         "--ablate", "ema", "--variant", "hard=student.soft_targets=false", *threads]) == 0
    result = json.loads(out.read_text())
    again = result["seeds"][0]
    assert {k: again[k] for k in row} == row  # the finished row kept, nothing rerun
    assert {f"hard_{c}" for c in ("day", "unseen_day", "unseen_night", "unseen_fog")} <= set(again)
    assert "with_ema_unseen_day" not in again  # ablations are scored on the run's own eval scenes only
    paired = result["paired"]["hard_minus_teacher_unseen_fog"]["mean"]
    assert paired == again["hard_unseen_fog"] - row["teacher_unseen_fog"]
    # another checkpoint: the finished seed's probes are rescored with it, and nothing else runs again
    smoke = load_config("configs/smoke.yaml")
    same = _random_init_checkpoint(tmp_path / "same.safetensors", smoke.features.backbone, 0)
    assert quality.main(["--out", str(out), "--root", str(root), "--seeds", "0", "--config", "configs/smoke.yaml",
                         "--ablate", "ema", "--pretrained", str(same), *threads]) == 0
    third = json.loads(out.read_text())["seeds"][0]
    assert again["knn_probe_of"]["pretrained"] == smoke.features.weights  # the config's checkpoint, then `same`
    assert third["knn_probe_of"]["pretrained"] == str(same)
    assert third["knn_pretrained"] == third["knn_random"] and third["drive_knn_pretrained"] == third["drive_knn_random"]
    assert {k: third[k] for k in row if "knn" not in k} == {k: row[k] for k in row if "knn" not in k}


def test_the_drive_knn_benchmark_pairs_each_checkpoint_with_the_seeds_random_vit(tmp_path, monkeypatch):
    """jobs/benchmarks/drive_knn.py: a checkpoint holding a seed's own random init gains exactly 0 on every seed,
    with both descriptors, plain and standardised; paired `--against` another checkpoint, it differs from it by
    minus that one's gain."""
    import drive_knn

    monkeypatch.setattr(quality, "PROBE_DRIVES", 2)
    cfg = load_config(None)
    same = _random_init_checkpoint(tmp_path / "same.safetensors", cfg.features.backbone, 3)
    other = _random_init_checkpoint(tmp_path / "other.safetensors", cfg.features.backbone, 4)
    out_json = tmp_path / "out.json"
    assert drive_knn.main(["--out", str(out_json), "--weights", f"same={same}", "--weights", f"other={other}",
                           "--root", str(tmp_path), "--seeds", "3,3", "--against", "other"]) == 0
    out = json.loads(out_json.read_text())
    assert out["seeds"] == [3, 3] and list(out["checkpoints"]) == ["same", "other"]
    assert "vs_other" not in out["checkpoints"]["other"]["crop_cls"]
    moved = 0.0
    for desc in ("crop_cls", "crop_mean"):
        got = out["checkpoints"]["same"][desc]
        for key in ("drive_knn_gain", "drive_knn_std_gain"):
            assert got[key] == {"mean": 0.0, "se": 0.0, "per_seed": [0.0, 0.0]}
            gain = out["checkpoints"]["other"][desc][key]
            assert got["vs_other"][key] == {"mean": -gain["mean"], "se": gain["se"],
                                            "per_seed": [-g for g in gain["per_seed"]]}
            moved += abs(gain["mean"])
        assert got["rows"][0] == got["rows"][1] and got["rows"][0]["drive_knn_segments"] > 0
    assert moved > 0  # another init scores differently somewhere, so the signs above are tested


def test_the_drive_knn_benchmark_refuses_an_unknown_against_name_before_any_work(tmp_path, capsys):
    """--against must name one of the --weights checkpoints; the error names it and the names there are."""
    import drive_knn

    with pytest.raises(SystemExit) as e:
        drive_knn.main(["--out", str(tmp_path / "o.json"), "--weights", "a=x.safetensors", "--weights", "y.safetensors",
                        "--against", "b", "--root", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "drive_knn.py: error: --against b: not among the --weights names ['a', 'y.safetensors']")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weights, message", [
    (["a=random", "a=random"], "--weights: each checkpoint needs its own NAME, ['a', 'a'] repeats one"),
    (["a=random", "b={tmp}/missing.safetensors"], "--weights b: {tmp}/missing.safetensors does not exist")])
def test_the_drive_knn_benchmark_refuses_a_repeated_name_or_a_missing_file_before_any_work(tmp_path, capsys, weights,
                                                                                           message):
    """Two checkpoints under one NAME would overwrite each other in the JSON; a missing file would fail only after
    the probes were rendered."""
    import drive_knn

    with pytest.raises(SystemExit) as e:
        drive_knn.main(["--out", str(tmp_path / "o.json"), "--root", str(tmp_path)]
                       + [x for w in weights for x in ("--weights", w.format(tmp=tmp_path))])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "drive_knn.py: error: " + message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []
