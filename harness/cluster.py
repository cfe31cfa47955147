"""A small multi-host kleinserve fleet on one machine, each host a Linux network namespace.

Topology (``scripts/cluster``; docs/scaleout.md draws it): a switch namespace ``ks-net``
holds one bridge; every host is a namespace ``ks-HOST`` joined to it by a veth pair
(``eth0`` inside the host, ``v-HOST`` on the bridge) with an address on 10.213.0.0/24 and
``tc netem`` on both ends of its link (rate and delay, each direction). Hosts:

    consul   the Consul server (10.213.0.2)
    proxy    nginx on port 80, its upstreams rendered from its agent's health listing
             (10.213.0.3; ``harness.nginx``)
    client   where load comes from (10.213.0.4); its link is not capped by default, since it
             stands for many clients
    srvN     kleinserve N (10.213.0.1N), ``twistd -n inference`` on port 8501 registering
             through its own agent

Every host but ``consul`` runs a Consul client agent joined to the server, its HTTP API on
the host's 127.0.0.1:8500. Nothing is routed out of the namespaces: the root namespace has no
address on the bridge. ``Cluster.down`` (and ``cleanup``, run first by ``up``) stops what
was started and deletes every ``ks-`` namespace, which takes the bridge and veths with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.consul import CONSUL_BINARY, HostAgent
from harness.netns import (
    LinkBytes,
    Shaping,
    call_in,
    counters_command,
    exec_prefix,
    link_commands,
    missing_privileges,
    namespaces,
    netem_available,
    parse_counters,
    pids_in,
    run,
    shaping_commands,
)
from harness.nginx import render_config, render_upstreams
from harness.processes import Proc, http_get
from harness.twistd import REPO, TWISTD, unexpected_errors

PREFIX = "ks-"
SWITCH = "ks-net"
BRIDGE = "br0"
SUBNET = "10.213.0"
SERVICE = "inference"
SERVER_PORT = 8501
PROXY_PORT = 80
AGENT = "127.0.0.1:8500"  # every host's own agent, seen from inside the host


@dataclass(frozen=True)
class Host:
    name: str  # "consul", "proxy", "client", "srv1", …
    address: str

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    @property
    def peer(self) -> str:
        """The bridge-side end of its link, in the switch namespace."""
        return "v-" + self.name


def plan_hosts(servers: int) -> list[Host]:
    """The hosts of a cluster with ``servers`` kleinserve hosts, with their addresses."""
    if not 1 <= servers <= 80:
        raise ValueError(f"servers must be between 1 and 80, not {servers}")
    fixed = [
        Host("consul", f"{SUBNET}.2"),
        Host("proxy", f"{SUBNET}.3"),
        Host("client", f"{SUBNET}.4"),
    ]
    return fixed + [Host(f"srv{i}", f"{SUBNET}.{10 + i}") for i in range(1, servers + 1)]


def cleanup(say: Callable[[str], object] = print) -> None:
    """Remove whatever an earlier run left: the processes in ``ks-`` namespaces, then the
    namespaces (the bridge and veths go with the switch namespace)."""
    if missing_privileges():
        return
    for netns in namespaces(PREFIX):
        for pid in pids_in(netns):
            try:
                os.kill(pid, signal.SIGKILL)  # started in our namespace by an earlier run
            except ProcessLookupError:
                pass
        run(["ip", "netns", "del", netns], check=False)
        say(f"cluster: removed namespace {netns}")


@dataclass
class Cluster:
    """Build with ``up()``; ``start_server(name)`` for each kleinserve; ``down()`` at the end."""

    servers: int = 3
    shaping: Shaping = Shaping("200mbit", "1ms")
    client_shaping: Shaping = Shaping(None, "1ms")
    workdir: Path = REPO / ".cache" / "cluster"
    model_base: Path = REPO / "models" / "digits"
    model_name: str = "digits"
    say: Callable[[str], object] = print
    hosts: list[Host] = field(init=False)
    agents: dict[str, HostAgent] = field(init=False, default_factory=dict)
    procs: dict[str, Proc] = field(init=False, default_factory=dict)  # kleinserves, nginx, watch

    def __post_init__(self) -> None:
        self.hosts = plan_hosts(self.servers)

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    @property
    def server_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.name.startswith("srv")]

    def up(self) -> None:
        """Network, Consul (server and agents), nginx and its watch; no kleinserve yet."""
        why = missing_privileges()
        if why:
            raise PermissionError(why)
        if not self.model_base.is_dir():
            raise FileNotFoundError(f"no model at {self.model_base} (scripts/export-demo-model)")
        if shutil.which("nginx") is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
        cleanup(self.say)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self._network()
        server = self.host("consul")
        self.agents["consul"] = HostAgent(
            CONSUL_BINARY,
            self.workdir,
            node="consul",
            netns=server.netns,
            address=server.address,
            join=None,
        )
        for host in self.hosts[1:]:
            self.agents[host.name] = HostAgent(
                CONSUL_BINARY, self.workdir, node=host.name, netns=host.netns, address=host.address, join=server.address
            )  # fmt: skip
        for agent in self.agents.values():  # the server first: the others join it
            agent.start(timeout=60)
        self.say(f"cluster: Consul server and {len(self.agents) - 1} agents up")
        self._proxy()

    def _network(self) -> None:
        run(["ip", "netns", "add", SWITCH])
        run(["ip", "-n", SWITCH, "link", "set", "lo", "up"])
        if (self.shaping.delay or self.client_shaping.delay) and not netem_available(SWITCH):
            self.say(
                "cluster: this kernel has no sch_netem (tc's delay): links are capped, not delayed"
            )
            self.shaping = Shaping(self.shaping.rate, None)
            self.client_shaping = Shaping(self.client_shaping.rate, None)
        run(["ip", "-n", SWITCH, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", SWITCH, "link", "set", BRIDGE, "up"])
        for host in self.hosts:
            for command in link_commands(
                SWITCH, BRIDGE, host.netns, host.peer, f"{host.address}/24"
            ):
                run(command)
            shaping = self.client_shaping if host.name == "client" else self.shaping
            for command in shaping_commands(SWITCH, host.netns, host.peer, shaping):
                run(command)
        self.say(
            f"cluster: {len(self.hosts)} hosts on {SUBNET}.0/24 (bridge {BRIDGE} in {SWITCH}); "
            f"links {self.shaping.rate or 'uncapped'}, delay {self.shaping.delay or 'none'} each way; "
            f"client link {self.client_shaping.rate or 'uncapped'}"
        )

    def _proxy(self) -> None:
        proxy = self.host("proxy")
        run_dir = self.workdir / "nginx"
        run_dir.mkdir()
        upstreams, config = run_dir / "upstreams.conf", run_dir / "nginx.conf"
        upstreams.write_text(render_upstreams([]))
        config.write_text(render_config(run_dir, PROXY_PORT, upstreams))
        nginx = [
            *exec_prefix(proxy.netns),
            "nginx",
            "-p",
            str(run_dir),
            "-c",
            str(config),
            "-g",
            "daemon off;",
        ]
        self._start("nginx", nginx, PROXY_PORT)
        watch = [
            *exec_prefix(proxy.netns), sys.executable, "-m", "harness.nginx", "watch",
            "--consul", AGENT, "--service", SERVICE, "--upstreams", str(upstreams),
            "--config", str(config), "--prefix", str(run_dir),
        ]  # fmt: skip
        self._start("nginx-watch", watch, 0)
        self.say(f"cluster: nginx on {proxy.address}:{PROXY_PORT}, upstreams from Consul")

    def _start(self, name: str, command: list[str], port: int) -> Proc:
        proc = Proc(name, command, port, self.workdir / f"{name}.log").start()
        self.procs[name] = proc
        return proc

    def server_command(self, host: Host) -> list[str]:
        return [
            *exec_prefix(host.netns), str(TWISTD), "-n", "--pidfile=", "inference",
            f"--model_name={self.model_name}", f"--model_base_path={self.model_base}",
            f"--rest_api_port={SERVER_PORT}", "--port=0",  # REST on every interface, no gRPC
            f"--consul={AGENT}", "--consul_check_interval=1", "--drain_delay=1",
            # Everything shares the machine's cores: one TensorFlow thread per server.
            "--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=1",
        ]  # fmt: skip

    def start_server(self, name: str) -> Proc:
        """Start kleinserve on host ``name`` (not waiting for it)."""
        return self._start(name, self.server_command(self.host(name)), SERVER_PORT)

    def wait_server(self, name: str, timeout: float = 300.0) -> float:
        """Wait until host ``name``'s kleinserve answers /readyz; the seconds it took."""
        proc = self.procs[name]
        return call_in(self.host(name).netns, lambda: proc.wait_ready(timeout=timeout))

    def stop_server(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def passing(self, via: str = "client") -> list[str]:
        """``address:port`` of the passing instances, as host ``via``'s agent lists them."""
        status, _, entries = self.agents[via].get(f"/v1/health/service/{SERVICE}?passing=1")
        if status != 200 or not isinstance(entries, list):
            return []
        return sorted(f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries)

    def wait_passing(self, count: int, timeout: float = 120.0, via: str = "client") -> list[str]:
        """Wait until ``count`` instances pass at ``via``'s agent; them (``TimeoutError`` if not)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.passing(via)
            if len(seen) == count:
                return seen
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(seen)} passing instances ({seen}), not {count}, after {timeout:.0f} s"
                )
            time.sleep(0.2)

    def proxy_serves(self, count: int, timeout: float = 30.0) -> None:
        """Wait until nginx's upstreams list ``count`` servers (its watch reloaded it)."""
        upstreams = self.workdir / "nginx" / "upstreams.conf"
        deadline = time.monotonic() + timeout
        while upstreams.read_text().count("max_fails") != count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nginx upstreams never listed {count} servers:\n{upstreams.read_text()}"
                )
            time.sleep(0.2)
        time.sleep(0.5)  # the reload's new worker takes over

    def get(self, host: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``url`` from inside host ``host``."""
        return call_in(self.host(host).netns, lambda: http_get(url, timeout))

    def counters(self) -> dict[str, LinkBytes]:
        """Bytes each host has sent and received on its link so far, by host name."""
        by_peer = parse_counters(run(counters_command(SWITCH, [h.peer for h in self.hosts])))
        return {h.name: by_peer[h.peer] for h in self.hosts}

    def set_link(self, name: str, up: bool) -> None:
        """Take host ``name``'s link down (both ends) or bring it back."""
        host = self.host(name)
        state = "up" if up else "down"
        run(["ip", "-n", SWITCH, "link", "set", host.peer, state])
        run(["ip", "-n", host.netns, "link", "set", "eth0", state])

    def set_delay(self, name: str, delay: str) -> None:
        """Change the one-way delay of host ``name``'s link, keeping its rate."""
        self.set_shaping(name, Shaping(self.shaping.rate, delay))

    def set_rate(self, name: str, rate: str | None) -> None:
        """Change the rate cap of host ``name``'s link (None: the cluster's own), keeping its
        delay."""
        self.set_shaping(name, Shaping(rate or self.shaping.rate, self.shaping.delay))

    def set_shaping(self, name: str, shaping: Shaping) -> None:
        host = self.host(name)
        for command in shaping_commands(SWITCH, host.netns, host.peer, shaping):
            run(command)

    def server_errors(self) -> list[str]:
        """Tracebacks and unhandled errors in the kleinserve logs so far."""
        found: list[str] = []
        for name, proc in self.procs.items():
            if name.startswith("srv") and proc.log_path.exists():
                found += unexpected_errors(proc.log_path.read_text(errors="replace"), [])
        return found

    def down(self) -> None:
        """Stop every process (kleinserves first: they leave Consul), then remove the namespaces."""
        for name in sorted(self.procs, key=lambda n: not n.startswith("srv")):
            self.procs[name].stop(timeout=10)
        self.procs.clear()
        for agent in reversed(list(self.agents.values())):
            agent.stop()
        self.agents.clear()
        cleanup(lambda line: None)

    def describe(self) -> str:
        lines = [
            f"  {h.name:<7} {h.address:<13} namespace {h.netns}, link {h.peer}" for h in self.hosts
        ]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="build the cluster and keep it until Ctrl-C (the default)")
    sub.add_parser("down", help="remove what an earlier run left behind")
    for p in (parser, up):
        p.add_argument("--servers", type=int, default=3, help="kleinserve hosts (default 3)")
        p.add_argument(
            "--rate", default="200mbit", help="each link's cap, tc's form (default 200mbit)"
        )
        p.add_argument("--delay", default="1ms", help="each link's one-way delay (default 1ms)")
        p.add_argument("--client-rate", default=None, help="the client host's cap (default: none)")
    args = parser.parse_args(argv)
    why = missing_privileges()
    if why:
        print(f"cluster: {why}", file=sys.stderr)
        return 2
    if args.command == "down":
        cleanup()
        return 0
    cluster = Cluster(
        servers=args.servers,
        shaping=Shaping(args.rate, args.delay),
        client_shaping=Shaping(args.client_rate, args.delay),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.up()
        for host in cluster.server_hosts:
            cluster.start_server(host.name)
        for host in cluster.server_hosts:
            cluster.say(f"cluster: {host.name} ready in {cluster.wait_server(host.name):.1f} s")
        cluster.wait_passing(len(cluster.server_hosts))
        cluster.proxy_serves(len(cluster.server_hosts))
        print(_usage(cluster), flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        cluster.say("cluster: tearing down")
        cluster.down()
    return 0


def _usage(cluster: Cluster) -> str:
    proxy = cluster.host("proxy")
    return (
        f"cluster: ready; hosts:\n{cluster.describe()}\n"
        f"  try:  ip netns exec {cluster.host('client').netns} curl -s "
        f"{proxy.address}/v1/models/{cluster.model_name}\n"
        f"        ip netns exec {cluster.host('client').netns} curl -s "
        f"'{AGENT}/v1/health/service/{SERVICE}?passing'\n"
        "Ctrl-C tears it all down."
    )


if __name__ == "__main__":
    sys.exit(main())
