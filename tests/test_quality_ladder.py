"""The quality ladder's paired ablations (jobs/benchmarks/quality.py) toggle each student part from the config."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from raydseg.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs" / "benchmarks"))
import quality  # noqa: E402


def test_each_ablation_toggles_its_part_from_the_configured_value():
    # the embedded default has refinement off, so its ablation turns it on; the paper's config has it on
    embedded = quality.ablation_variants(["ema", "soft_targets", "refine", "degrade"], load_config(None).student)
    assert embedded == {"no_ema": ["student.ema=false"], "no_soft_targets": ["student.soft_targets=false"],
                        "with_refine": ["student.refine=true"], "no_degrade": ["student.degrade=0"]}
    paper = load_config("configs/waymo.yaml", overrides=["student.degrade=0"]).student
    assert quality.ablation_variants(["refine", "degrade"], paper) == {
        "no_refine": ["student.refine=false"], "with_degrade": ["student.degrade=0.8"]}


def test_an_unknown_part_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--out", "/tmp/never.json", "--ablate", "ema,dropout"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(  # after argparse's program name
        ": error: --ablate: unknown student part(s) dropout (known: ema, soft_targets, refine, degrade)")
