"""Benchmark: the data stages (ingest, proposals, features, cluster) of the synthetic pipeline at several sizes.

`python jobs/benchmarks/scale.py --out scale.json [--frames 24,96,384] [--root DIR] [--set section.key=value ...]`

Each size runs in its own process (its own local Ray and sqlite MLflow under DIR/f<N>), so that the driver's peak
memory (`driver_peak_rss_gb`, the largest over the stages) belongs to that size alone. Small images (320 x 160,
32 beams) and one eval image per condition keep the largest size within minutes on 2 cores; teacher, student and
evaluate are left out because their cost follows their step budget and eval split, not the number of frames.
Reports per size and stage the seconds per frame, and the ratios of the largest size to the smallest (the
baseline): goal, both flat within 25 % (ratios <= 1.25). `*_marginal_s_per_frame`: the extra seconds per extra
frame between the two largest sizes, which leaves out the fixed start-up (actors, model load, numba compile).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

STAGES = ("ingest", "proposals", "features", "cluster")
FRAMES_PER_SEQUENCE = 6
SIZE = ["synthetic.width=320", "synthetic.height=160", "synthetic.beams=32", "synthetic.eval_images_per_condition=1",
        "synthetic.eval_images_per_scene=1"]


def child(frames: int, root: str, overrides: list[str]) -> None:
    """The measured process: the data stages of one size; prints {stage: seconds, ...} and the driver's peak RSS."""
    from raydseg.config import load_config
    from raydseg.pipeline import run_pipeline

    cfg = load_config(overrides=[*SIZE, f"synthetic.n_sequences={frames // FRAMES_PER_SEQUENCE}",
                                 f"synthetic.frames_per_sequence={FRAMES_PER_SEQUENCE}", f"run.name=f{frames}",
                                 f"run.output_root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *overrides])
    res = run_pipeline(cfg, list(STAGES), log=lambda s: print(s, file=sys.stderr))
    print(json.dumps({"frames": frames, "seconds": {r.name: r.seconds for r in res.reports},
                      "status": {r.name: r.status for r in res.reports},
                      "segments": res.reports[-1].counts.get("segments", 0),
                      "driver_peak_rss_gb": max(r.driver_peak_rss_gb for r in res.reports)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", default="24,96,384", help="sizes, multiples of 6 (6 frames per sequence)")
    ap.add_argument("--root", default="/tmp/raydseg_scale")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # the measured process of one size
    a = ap.parse_args()
    from raydseg.procstats import child_figures, write_figures

    if a.child:
        return child(a.child, os.path.join(os.path.abspath(a.root), f"f{a.child}"), a.overrides)
    sizes = sorted(int(s) for s in a.frames.split(","))
    if any(n % FRAMES_PER_SEQUENCE for n in sizes):
        raise SystemExit(f"--frames: every size must be a multiple of {FRAMES_PER_SEQUENCE}, got {a.frames}")
    rows = []
    for n in sizes:
        r = child_figures([__file__, "--out", "-", "--root", a.root, "--child", str(n),
                           *(x for o in a.overrides for x in ("--set", o))])
        if any(s != "ran" for s in r["status"].values()):
            raise SystemExit(f"size {n}: stages were reused from an earlier run ({r['status']}); remove {a.root}")
        rows.append(r)
        print(f"{n} frames: " + ", ".join(f"{s} {r['seconds'][s]:.1f} s" for s in STAGES)
              + f"; driver peak {r['driver_peak_rss_gb']:.2f} GiB", file=sys.stderr)
    out: dict[str, float] = {}
    for r in rows:
        n = r["frames"]
        out[f"f{n}_segments"] = r["segments"]
        out[f"f{n}_driver_peak_rss_gb"] = r["driver_peak_rss_gb"]
        for s in STAGES:
            out[f"f{n}_{s}_s_per_frame"] = r["seconds"][s] / n
        out[f"f{n}_total_s_per_frame"] = sum(r["seconds"][s] for s in STAGES) / n
    lo, hi = sizes[0], sizes[-1]
    for s in (*STAGES, "total"):
        out[f"{s}_s_per_frame_ratio_{hi}_over_{lo}"] = out[f"f{hi}_{s}_s_per_frame"] / out[f"f{lo}_{s}_s_per_frame"]
    out[f"driver_peak_rss_ratio_{hi}_over_{lo}"] = out[f"f{hi}_driver_peak_rss_gb"] / out[f"f{lo}_driver_peak_rss_gb"]
    if len(sizes) >= 2:
        mid, big = (rows[-2], rows[-1])
        for s in STAGES:
            out[f"{s}_marginal_s_per_frame"] = ((big["seconds"][s] - mid["seconds"][s])
                                                / (big["frames"] - mid["frames"]))
    write_figures(out, a.out, width=44)


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
