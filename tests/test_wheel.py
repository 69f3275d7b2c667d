"""The package as a wheel: it carries the configs and every subcommand, and the console script works from an install
outside the source tree (no jobs/*.py, no ../configs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, install dir): `pip wheel --no-deps` of a copy of the sources, installed with `pip install --target`."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "raydseg", src / "raydseg", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("raydseg-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return wheel, tmp / "site"


@pytest.mark.slow
def test_wheel_ships_the_configs_and_every_subcommand_module(installed):
    from raydseg.cli import SUBCOMMANDS

    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"raydseg/configs/{p.name}" for p in (REPO / "raydseg" / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    for target, _ in SUBCOMMANDS.values():
        assert target.split(":")[0].replace(".", "/") + ".py" in names, target
    assert not any(n.startswith("jobs/") for n in names)


@pytest.mark.slow
def test_installed_console_script_runs_outside_the_source_tree(installed, tmp_path):
    _, site = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed package only: /work/.../raydseg is not importable
    script = site / "bin" / "raydseg"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    p = run("run", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: raydseg run"), p.stderr
    for sub in ("prepare-data", "compare", "preflight"):
        assert run(sub, "--help").returncode == 0, sub
    # the README's `--config configs/waymo.yaml` resolves to the packaged file from any directory
    p = run("preflight", "--config", "configs/waymo.yaml", "--cluster", str(REPO / "cluster" / "aws.yaml"))
    assert p.returncode == 0 and "every worker request fits" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-c", "import raydseg.config as c; print(c.DEFAULT_CONFIG); "
                        "print(c.load_config().run.name)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    default, name = p.stdout.split()
    assert Path(default) == site / "raydseg" / "configs" / "default.yaml" and name == "default"
