"""Run the `pretrain` stage (after `ingest`, which is skipped when finished):
`python jobs/pretrain.py [--config FILE] [--set section.key=value ...]`. Prints where the backbone checkpoint is."""
import sys

from raydseg.cli import guarded, run_stages

if __name__ == "__main__":
    sys.exit(guarded(run_stages)(sys.argv[1:], ["ingest", "pretrain"], "jobs/pretrain.py",
                        "Pretrain the ViT backbone (DINO or a masked autoencoder: pretrain.objective) on the camera "
                        "images of the ingest stage."))
