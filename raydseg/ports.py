"""A free TCP port on this machine, for the local services a run starts (Ray's dashboard, an MLflow UI)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on at `host` now (the OS picks it; another process may still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
