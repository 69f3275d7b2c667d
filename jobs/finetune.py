"""Supervised fine-tuning of a run's models on N labelled images, from several initialisations:
`python jobs/finetune.py --run outputs/default [--n 8,32] [--inits student,teacher,features,random]`.
See raydseg/finetune.py.
"""
import sys

from raydseg.cli import guarded
from raydseg.finetune import main

if __name__ == "__main__":
    sys.exit(guarded(main)())
