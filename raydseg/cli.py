"""The `raydseg` console script: one subcommand per job, all sharing `--config FILE --set key=value`."""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import Callable

from raydseg.config import load_config
from raydseg.errors import UserError, user_problems


def guarded(main: Callable[..., int | None]) -> Callable[..., int]:
    """An entry point that prints user errors as `error: ...` lines (no traceback) and returns exit status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except Exception as e:  # noqa: BLE001 - only user errors are caught; anything else is re-raised
            problems = user_problems(e)
            if problems is None:
                raise
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            return 2

    return run


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: the packaged configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set cluster.k=30 (repeatable)")


def run_stages(argv: list[str] | None, stages: list[str] | None, prog: str, description: str) -> int:
    """Parse config flags, run `stages` (None = all) through the pipeline; exit code 0 on success."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from raydseg.pipeline import run_pipeline

    result = run_pipeline(cfg, stages=stages)
    print(f"MLflow parent run: {result.parent_run_id}")
    print(f"outputs: {result.run_root}")
    return 0


SUBCOMMANDS = {
    # name: ("module:function" taking argv and returning the exit status, help); all inside the package, so the
    # console script works from a wheel install (jobs/*.py are thin wrappers of the same functions)
    "run": ("raydseg.cli:full_run", "run the whole pipeline (skips finished stages)"),
    "stage": ("raydseg.cli:one_stage", "run one stage: raydseg stage NAME [--set ...]"),
    "predict": ("raydseg.predict:main", "predict label images with a trained model (also an exported .onnx)"),
    "export": ("raydseg.models.export:main", "export a trained model to ONNX or TorchScript"),
    "serve": ("raydseg.serve:main", "serve a trained model over HTTP with Ray Serve (POST /predict)"),
    "prepare-data": ("raydseg.prepare_data:main", "ingest a dataset into Frame parquet"),
    "compare": ("raydseg.compare_runs:main", "compare MLflow runs of an experiment"),
    "preflight": ("raydseg.preflight:main", "check every stage's worker request against a cluster file"),
    "sweep": ("raydseg.sweep:main", "run config variants (the paper's ablations) and compare them"),
    "finetune": ("raydseg.finetune:main", "fine-tune a run's models on N labelled images (mIoU vs N per init)"),
    "gc": ("raydseg.outputs:main", "remove stage outputs that no run references (lists them first)"),
}


@guarded
def full_run(argv: list[str] | None = None) -> int:
    return run_stages(argv, None, "raydseg run", "Run the whole raydseg pipeline.")


@guarded
def one_stage(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0].startswith("-"):
        print("usage: raydseg stage NAME [--config FILE] [--set key=value ...]", file=sys.stderr)
        return 2
    from raydseg.pipeline import STAGE_ORDER

    if argv[0] not in STAGE_ORDER:
        raise UserError(f"unknown stage '{argv[0]}' (stages: {', '.join(STAGE_ORDER)})")
    return run_stages(argv[1:], [argv[0]], f"raydseg stage {argv[0]}", f"Run stage {argv[0]}.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: raydseg {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:14s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = SUBCOMMANDS[argv[0]][0].split(":")
    fn = getattr(importlib.import_module(module), func)
    return guarded(fn)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
