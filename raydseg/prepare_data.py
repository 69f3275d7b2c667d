"""Ingest a real dataset into Frame parquet (the `ingest` stage alone, resumable).

    raydseg prepare-data --source waymo --input s3://bucket/waymo_v2 --output s3://bucket/frames \
        [--name waymo_train] [--set data.split=training --set data.max_frames=1000 ...]

Output: `<output>/<name>/ingest/frames/part-*.parquet` (Frame schema, readable with plain pyarrow),
`<output>/<name>/ingest/rejects.parquet` and `_manifest.json`. Rerunning resumes with the unfinished shards.
`python jobs/prepare_data.py ...` runs the same `main`.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from raydseg.cli import guarded
from raydseg.config import load_config


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_data", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=["kitti", "nuscenes", "waymo", "synthetic"])
    p.add_argument("--input", default="", help="dataset root, local path or s3:// (data.root)")
    p.add_argument("--output", required=True, help="output root, local path or s3:// (run.output_root)")
    p.add_argument("--name", default="", help="run name (default: prepare_<source>)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    name = args.name or f"prepare_{args.source}"
    cfg = load_config(args.config, [f"data.source={args.source}", f"data.root={args.input}",
                                    f"run.output_root={args.output}", f"run.name={name}", *args.overrides])
    from raydseg import storage
    from raydseg.pipeline import run_pipeline

    result = run_pipeline(cfg, stages=["ingest"])
    report = result.reports[-1]
    print(f"ingest {report.status}: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
    rej_path = storage.join(result.stage_dirs["ingest"], "rejects.parquet")
    rejects = storage.read_table(rej_path).to_pylist() if storage.exists(rej_path) else []
    print(f"rejects: {len(rejects)}")
    for reason, n in Counter(r["reason"] for r in rejects).most_common(20):
        print(f"  {n:6d}  {reason}")
    print(f"frames: {storage.join(result.stage_dirs['ingest'], 'frames')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
