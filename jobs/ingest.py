"""Run the `ingest` stage alone: `python jobs/ingest.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["ingest", *sys.argv[1:]]))
