"""Figures about processes that stages and benchmarks report: a process's peak memory, the figures of a measured
child process, and a benchmark's flat figures printed and written as JSON."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GiB).

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. getrusage's ru_maxrss does not: a child started
    by a large parent (fork + exec) reports the parent's size. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS is
    not handled: Linux is what the project runs on)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_figures(argv: list[str]) -> dict[str, Any]:
    """Run `python argv...` as a measured child process (its own memory, its own Ray) and return the JSON object
    it prints as its last stdout line; its stderr passes through."""
    proc = subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_figures(out: dict[str, float], path: str, width: int = 36) -> None:
    """Print a benchmark's flat figures as a `metric value` table and write them to `path` as JSON."""
    print(f"{'metric':{width}s} value")
    for k, v in out.items():
        print(f"{k:{width}s} {v:.4g}")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
