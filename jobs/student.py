"""Run the `student` stage alone: `python jobs/student.py [--config FILE] [--set section.key=value ...]`."""
import sys

from raydseg.cli import one_stage

if __name__ == "__main__":
    sys.exit(one_stage(["student", *sys.argv[1:]]))
