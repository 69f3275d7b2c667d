"""Run the `features` stage alone: `python jobs/features.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["features", *sys.argv[1:]]))
