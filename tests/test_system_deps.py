"""scripts/system_deps.sh, which `make run` / `make test` call before building the venv: nothing to do when every
Debian package is there; as a non-root user without sudo it stops with the exact install command."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "system_deps.sh"
RUN_PKGS = "libusb-1.0-0 libgl1 libegl1 libx11-6 libgomp1"


def _run(*args: str, env: dict | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), *args]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", f"PATH={env['PATH']}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_nothing_to_do_when_every_package_is_installed():
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a dpkg-based machine")
    p = _run("run")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_missing_package_without_root_prints_the_command_and_stops():
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to run the script as another user")
    stub = Path(tempfile.mkdtemp(prefix="stub-dpkg-"))  # pytest's tmp_path is private to root
    stub.chmod(0o755)
    # a dpkg database in which libusb and chromium are missing (dpkg-query prints nothing for them)
    (stub / "dpkg-query").write_text('#!/bin/sh\ncase "$3" in libusb-1.0-0|chromium) exit 1;; esac\n'
                                     'printf installed\n')
    (stub / "dpkg-query").chmod(0o755)
    env = {"PATH": f"{stub}:/usr/sbin:/usr/bin:/sbin:/bin"}
    p = _run("test", env=env, user="nobody")
    assert p.returncode == 2
    assert p.stderr == ("error: missing system packages libusb-1.0-0 chromium; install them first with:\n"
                        "  sudo bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                        "--no-install-recommends libusb-1.0-0 chromium'\n")
    p = _run("bogus", env=env)
    assert (p.returncode, p.stderr) == (2, "error: scripts/system_deps.sh takes 'run' or 'test', not 'bogus'\n")


def test_makefile_checks_system_packages_before_building_the_venv():
    """`make -n run` on a checkout without a venv: the package check comes first, then the venv."""
    repo = SCRIPT.parent.parent
    # under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines: run a top-level make
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    p = subprocess.run(["make", "-n", "--no-print-directory", "run", "VENV=/nonexistent-venv"], cwd=repo, env=env,
                       capture_output=True, text=True)
    lines = p.stdout.splitlines()
    assert lines[0] == "scripts/system_deps.sh run" and "-m venv" in lines[1], lines
    assert RUN_PKGS in SCRIPT.read_text()
