"""Run the `proposals` stage alone: `python jobs/proposals.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["proposals", *sys.argv[1:]]))
