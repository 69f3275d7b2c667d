"""Ingest a real dataset into Frame parquet: `python jobs/prepare_data.py --source waymo --input ... --output ...`.

The logic lives in raydseg.prepare_data (also `raydseg prepare-data`); this script only calls it.
"""
import sys

from raydseg.prepare_data import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
