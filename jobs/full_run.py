"""Run the whole pipeline: `python jobs/full_run.py [--config FILE] [--set section.key=value ...]`.

Locally it starts a Ray cluster and uses the embedded default (synthetic data, sqlite MLflow); under
`ray job submit` it joins the cluster (RAY_ADDRESS). A rerun skips the stages that already finished.
"""
import sys

from raydseg.cli import full_run

if __name__ == "__main__":
    sys.exit(full_run(sys.argv[1:]))
