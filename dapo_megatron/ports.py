"""Ports for torch.distributed rendezvous and server processes."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (another process may take it before
    the caller binds it; "" means every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listening_store(world_size: int, timeout_s: float = 300.0):
    """A torch.distributed TCPStore server, listening on every interface on a port the kernel
    picks (``store.port``). Made before anyone is told the port, so no other process can take
    it in between, as it can take the port a ``free_port()`` answer named a moment before
    (Ray's many connections draw their local ports from the same ephemeral range)."""
    import datetime

    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
