"""Figures about the current process that stages and benchmarks report."""
from __future__ import annotations

import resource


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
