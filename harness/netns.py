"""Linux network namespaces for ``harness.cluster``: run ``ip``/``tc``, call code inside one,
read a link's byte counters.

The commands are built by pure functions (``link_commands``, ``shaping_commands``) and run by
``run``; ``parse_counters`` reads what ``counters_command`` prints. Everything here needs
root (``CAP_NET_ADMIN``); ``missing_privileges`` says why it cannot run, or ``None``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000  # <sched.h>: setns(2)'s nstype for a network namespace
NETNS_DIR = "/run/netns"  # where `ip netns add` keeps its namespaces' handles


class CommandFailed(RuntimeError):
    """An ``ip``/``tc`` command that exited non-zero; the message holds its standard error."""


def missing_privileges() -> str | None:
    """Why namespaces cannot be built here (not root, no ``ip``/``tc``), or ``None``."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    return None


def run(command: Sequence[str], *, check: bool = True) -> str:
    """Run ``command``; its standard output. ``CommandFailed`` if it fails and ``check``."""
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise CommandFailed(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def exec_prefix(netns: str) -> list[str]:
    """The prefix that runs a command inside ``netns``."""
    return ["ip", "netns", "exec", netns]


def namespaces(prefix: str) -> list[str]:
    """The namespaces whose name starts with ``prefix`` (``ip netns list``)."""
    names = [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def pids_in(netns: str) -> list[int]:
    """The processes running in ``netns`` (``ip netns pids``)."""
    return [int(p) for p in run(["ip", "netns", "pids", netns], check=False).split()]


def call_in(netns: str, function: Callable[[], T]) -> T:
    """``function()`` run on a thread of its own that has entered ``netns``: the sockets it
    opens live in that namespace (setns(2) moves only the calling thread)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            enter(netns)
            outcome["value"] = function()
        except BaseException as e:  # handed to the caller's thread, re-raised there
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def enter(netns: str) -> None:
    """Move the calling thread into ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Shaping:
    """What ``tc`` does to a link, in each direction: its rate cap (``tbf``) and one-way delay
    (``netem``, a child of the ``tbf``). ``None``: not capped, not delayed."""

    rate: str | None  # tc's form: "200mbit"
    delay: str | None = "1ms"

    def qdiscs(self, prefix: list[str]) -> list[list[str]]:
        """The ``tc`` commands for one device; ``prefix`` is ``tc -n NS qdisc replace dev DEV``."""
        commands: list[list[str]] = []
        parent = ["root"]
        if self.rate:
            # burst holds one 64 KiB GSO segment of a veth; a queue of 50 ms delays bursts
            # rather than dropping them.
            commands.append([*prefix, "root", "handle", "1:", "tbf", "rate", self.rate,
                             "burst", "128kb", "latency", "50ms"])  # fmt: skip
            parent = ["parent", "1:1"]
        if self.delay:
            commands.append([*prefix, *parent, "handle", "10:", "netem", "delay", self.delay,
                             "limit", "100000"])  # fmt: skip
        return commands


def netem_available(netns: str) -> bool:
    """Whether this kernel has ``sch_netem`` (delays): tried on ``netns``'s loopback."""
    done = subprocess.run(
        ["tc", "-n", netns, "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "0ms"],
        capture_output=True, check=False,
    )  # fmt: skip
    subprocess.run(
        ["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False
    )
    return done.returncode == 0


def link_commands(
    switch: str, bridge: str, host_ns: str, peer: str, address: str
) -> list[list[str]]:
    """Commands joining ``host_ns`` to ``bridge`` (in the ``switch`` namespace) with a veth pair:
    ``eth0`` with ``address`` (CIDR) inside the host, ``peer`` on the bridge."""
    return [
        ["ip", "netns", "add", host_ns],
        ["ip", "-n", host_ns, "link", "set", "lo", "up"],
        ["ip", "-n", switch, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", host_ns],
        ["ip", "-n", switch, "link", "set", peer, "master", bridge, "up"],
        ["ip", "-n", host_ns, "addr", "add", address, "dev", "eth0"],
        ["ip", "-n", host_ns, "link", "set", "eth0", "up"],
    ]  # fmt: skip


def shaping_commands(switch: str, host_ns: str, peer: str, shaping: Shaping) -> list[list[str]]:
    """``tc`` on both ends of a host's link: egress of ``eth0`` is what the host sends, egress
    of its bridge-side ``peer`` what it receives, so the cap holds in both directions."""
    return [
        *shaping.qdiscs(["tc", "-n", host_ns, "qdisc", "replace", "dev", "eth0"]),
        *shaping.qdiscs(["tc", "-n", switch, "qdisc", "replace", "dev", peer]),
    ]


def counters_command(switch: str, peers: Sequence[str]) -> list[str]:
    """Prints ``PEER RX TX`` per line: the bridge-side counters of each host's link."""
    script = (
        'for d in "$@"; do s=/sys/class/net/$d/statistics; '
        'echo "$d $(cat $s/rx_bytes) $(cat $s/tx_bytes)"; done'
    )
    return [*exec_prefix(switch), "sh", "-c", script, "counters", *peers]


@dataclass(frozen=True)
class LinkBytes:
    """Bytes a host sent and received on its link, as counted at the bridge-side end."""

    sent: int
    received: int

    def __sub__(self, other: LinkBytes) -> LinkBytes:
        return LinkBytes(self.sent - other.sent, self.received - other.received)


def parse_counters(text: str) -> dict[str, LinkBytes]:
    """``{peer: LinkBytes}`` from ``counters_command``'s output. The bridge side receives what
    the host sends, so its rx is the host's sent bytes and its tx the host's received."""
    counters: dict[str, LinkBytes] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            raise ValueError(f"unexpected counters line {line!r}")
        counters[fields[0]] = LinkBytes(sent=int(fields[1]), received=int(fields[2]))
    return counters
