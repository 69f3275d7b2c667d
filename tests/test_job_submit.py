"""`ray job submit` of jobs/full_run.py to a head started with `ray start` (its own file, so that pytest-xdist runs
it beside tests/test_full_run.py's two full runs)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
SUBMITTED = ["ingest", "proposals"]  # what the job runs


def test_ray_job_submit_to_a_started_head(tmp_path, mlflow_server):
    """`ray start --head --block` on loopback (token auth, as Ray 2.60 requires), then `ray job submit`.

    The head runs in its own process group on ports of its own and is killed with it, so the test session's own
    Ray is untouched (`ray stop` would stop every Ray on the machine). The job runs the first two stages only (Ray
    Data tasks on the head, the working directory and MLflow through the runtime env): every stage's own path
    runs in `s3_run`, on the same code."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the entrypoint's `python` is ours
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60 gives a starting node a fixed 30 s to register with its GCS; on a loaded machine it can miss that and
    # the head exits ("timed out during startup"): that start-up, not the submit, is tried a second time
    try:
        for attempt in (1, 2):
            head, address, temp_dir = _start_head(ray_bin, env, tmp_path / f"head{attempt}.log")
            log = _wait_for_head(head, address, ray_bin, env, tmp_path / f"head{attempt}.log")
            if head.poll() is None:
                break
            _stop_head(head, temp_dir)
            assert attempt == 1 and "timed out during startup" in log, log[-3000:]
        out = tmp_path / "out"
        runtime_env = '{"env_vars": {"MLFLOW_TRACKING_URI": "%s"}}' % mlflow_server
        cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--runtime-env-json", runtime_env, "--", "python", "jobs/full_run.py", "--config",
               "configs/smoke.yaml", "--set", f"run.output_root={out}", "--set", f"run.stages={','.join(SUBMITTED)}"]
        agent_deadline = time.time() + 300  # the job API answers before the head's job agent is ready (slow on
        while True:                          # a loaded CI machine): retry only that refusal
            submit = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > agent_deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        for stage in SUBMITTED:
            assert f"[{stage}] done" in submit.stdout, stage
            assert (out / "smoke" / stage / "_manifest.json").exists(), stage
    finally:
        _stop_head(head, temp_dir)


def _start_head(ray_bin: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` on loopback ports of its own, in its own process group: (process, dashboard
    address, temp dir)."""
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                             "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir,
                             # the test session's own Ray holds the default agent ports (52365 ...): a second
                             # head's job agent could not bind and every submit would be refused
                             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
                             str(free_port()), "--runtime-env-agent-port", str(free_port()),
                             "--metrics-export-port", str(free_port()), "--ray-client-server-port",
                             str(free_port())],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return head, f"http://127.0.0.1:{dash}", temp_dir


def _wait_for_head(head: subprocess.Popen, address: str, ray_bin: str, env: dict[str, str], log: Path) -> str:
    """Wait (at most 180 s) until the head has started ("Ray runtime started.") and its job API answers, or the
    head has exited; its log so far."""
    deadline, listed = time.time() + 180, [ray_bin, "job", "list", "--address", address]
    while head.poll() is None:
        if "Ray runtime started." in log.read_text() and subprocess.run(
                listed, capture_output=True, env=env, timeout=60).returncode == 0:
            break
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(2)
    return log.read_text()


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=60)
            break
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
