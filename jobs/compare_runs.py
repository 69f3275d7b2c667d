"""Compare the runs of an MLflow experiment: `python jobs/compare_runs.py --experiment NAME [--out FILE]`.

The logic lives in raydseg.compare_runs (also `raydseg compare`); this script only calls it.
"""
import sys

from raydseg.cli import guarded
from raydseg.compare_runs import main

if __name__ == "__main__":
    sys.exit(guarded(main)(sys.argv[1:]))
