"""Run the `evaluate` stage alone: `python jobs/evaluate.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["evaluate", *sys.argv[1:]]))
