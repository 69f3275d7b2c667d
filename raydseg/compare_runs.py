"""Compare the runs of an MLflow experiment: `raydseg compare --experiment NAME [--out FILE]` (also
`python jobs/compare_runs.py ...`).

Prints a markdown table (config values that differ between runs vs `eval/<model>/<set>/{miou,pixel_acc}` in %),
and with --out writes FILE.csv (raw fractions) and FILE.md next to each other (any extension of FILE is dropped).
With --screenshot RUN_A,RUN_B it also saves the MLflow UI's comparison page of those runs as a PNG (headless
Chromium) and logs it to each of the runs' artifacts (`compare/compare_<A>_<B>.png`).
"""
from __future__ import annotations

import argparse
import os
import sys

from raydseg.eval.compare import runs_table, to_csv, to_markdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name (config tracking.experiment)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", default=None, help="write OUT.csv and OUT.md")
    p.add_argument("--all-classes", action="store_true", help="also per-class IoU columns")
    p.add_argument("--screenshot", default=None, metavar="RUN_A,RUN_B",
                   help="screenshot the MLflow comparison page of these runs into their artifacts")
    args = p.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"
    suffixes = ("/miou", "/pixel_acc") + (("",) if args.all_classes else ())
    try:
        header, rows = runs_table(args.experiment, uri, suffixes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = to_markdown(header, rows)
    print(md)
    if args.out:
        stem = os.path.splitext(args.out)[0]
        with open(stem + ".csv", "w") as f:
            f.write(to_csv(header, rows))
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"wrote {stem}.csv and {stem}.md")
    if args.screenshot:
        return screenshot(uri, [r.strip() for r in args.screenshot.split(",") if r.strip()])
    return 0


def screenshot(uri: str, run_ids: list[str]) -> int:
    import tempfile

    from mlflow.tracking import MlflowClient

    from raydseg.eval.compare import screenshot_compare

    if len(run_ids) < 2:
        print("error: --screenshot needs at least two run ids", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "compare_" + "_".join(r[:8] for r in run_ids) + ".png")
        try:
            url = screenshot_compare(uri, run_ids, png)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        client = MlflowClient(uri)
        for run_id in run_ids:
            client.log_artifact(run_id, png, "compare")
    print(f"comparison page {url} saved as artifact compare/{os.path.basename(png)} of runs {', '.join(run_ids)}")
    return 0


if __name__ == "__main__":
    from raydseg.cli import guarded

    sys.exit(guarded(main)())
