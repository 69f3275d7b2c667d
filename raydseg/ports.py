"""A free TCP port on this machine, for the local services a run starts (Ray's dashboard, an MLflow UI)."""
from __future__ import annotations

import socket
from typing import Callable, Container

# Ports that Ray takes on every node whatever it is told: its dashboard agent's HTTP port
# (ray._private.ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT). ray.init refuses a dashboard port equal to it
# ("... is trying to use a port number 52365 that is used by other components"), and the OS may hand it out.
RAY_FIXED_PORTS = frozenset({52365})


def os_port(host: str) -> int:
    """A port that nothing listens on at `host` now, as the OS picks it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port(host: str = "127.0.0.1", avoid: Container[int] = RAY_FIXED_PORTS,
              draw: Callable[[str], int] = os_port) -> int:
    """A port that nothing listens on at `host` now and that is not in `avoid` (another process may still take it
    first)."""
    while (port := draw(host)) in avoid:
        pass
    return port
