"""Run the `cluster` stage alone: `python jobs/cluster.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["cluster", *sys.argv[1:]]))
