"""Run the `teacher` stage alone: `python jobs/teacher.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["teacher", *sys.argv[1:]]))
