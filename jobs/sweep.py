"""Run config variants as full runs that share their common upstream stages, and compare them:
`python jobs/sweep.py [SPEC] [--config C] [--grid section.key=v1,v2 ...] [--set section.key=v ...] [--name N]`
(SPEC: a sweep file, e.g. configs/sweeps/k.yaml or just `k`). See raydseg/sweep.py.
"""
import sys

from raydseg.cli import guarded
from raydseg.sweep import main

if __name__ == "__main__":
    sys.exit(guarded(main)())
