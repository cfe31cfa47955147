"""Free loopback ports, never the same one twice in a process."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"  # the only address the harness ever listens on or sends to

_HANDED_OUT: set[int] = set()


def free_port(*, udp: bool = False) -> int:
    """A loopback port nobody listens on now (for UDP too if ``udp``, as Consul's serf needs
    both), and not one this process handed out before: the kernel may offer the same free
    port twice in a row (a server's HTTP and gRPC ports, say)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port: int = tcp.getsockname()[1]
            if port in _HANDED_OUT:
                continue
            if udp:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
                    try:
                        datagram.bind((LOOPBACK, port))
                    except OSError:
                        continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` of the loopback address now (the demo's 8501)."""
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True
