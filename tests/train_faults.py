"""Faults injected into Ray Train workers through the training loop's after-step `callbacks` (picklable; the tests
folder is on the workers' PYTHONPATH). Each fires once per test: a marker file remembers that it happened, so the
attempt Ray Train restarts goes on."""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass


def _first_time(marker: str, note: str) -> bool:
    """True (and the marker written) the first time `marker` is asked for."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(note)
    return True


@dataclass
class KillAt:
    """At step `step` on rank `rank`: SIGKILL this worker process (`sigkill`), or raise."""

    step: int
    rank: int
    marker: str
    sigkill: bool = True

    def __call__(self, step: int, rank: int, model) -> None:
        if step == self.step and rank == self.rank and _first_time(self.marker, str(rank)):
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step} on rank {rank}")


@dataclass
class WriteDigest:
    """After step 1 each rank writes its weights' digest to `<folder>/rank<R>.txt` (DDP keeps the ranks equal)."""

    folder: str

    def __call__(self, step: int, rank: int, model) -> None:
        from raydseg.train.engine import weights_digest

        if step == 1:
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, f"rank{rank}.txt"), "w") as f:
                f.write(weights_digest(model))


@dataclass
class PauseAt:
    """At step `step` on rank `rank`: write {"node_id": this worker's Ray node} to `marker` and wait (at most
    `timeout_s`) for the test to act on that node, e.g. remove it."""

    step: int
    rank: int
    marker: str
    timeout_s: float = 120.0

    def __call__(self, step: int, rank: int, model) -> None:
        import ray

        if step == self.step and rank == self.rank:
            node = ray.get_runtime_context().get_node_id()
            if _first_time(self.marker, json.dumps({"node_id": node})):
                time.sleep(self.timeout_s)  # the node goes away under this sleep
