"""A real Consul agent (``consul agent -dev``) on free loopback ports, for tests and the demo.

``restart()`` replaces the agent by a fresh, empty one on the same ports -- what a server
sees when its local agent is restarted. Readbacks (``get``) use urllib, not the code under
test, so they check what the agent really holds. The pytest fixtures around it are in
``tests/consul_agent.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from discovery.consul import ConsulAddress
from harness.netns import call_in, exec_prefix
from harness.ports import LOOPBACK, free_port

REPO = Path(__file__).resolve().parent.parent
CONSUL_BINARY = REPO / ".tools" / "bin" / "consul"


class ConsulAgent:
    """One dev-mode agent process: in-memory state, its own ports, its log in ``workdir``."""

    def __init__(self, binary: Path, workdir: Path, config: dict[str, Any] | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.config = config  # more agent configuration, written to a -config-file
        self.http_port = free_port()
        self.server_port = free_port()
        self.serf_lan_port = free_port(udp=True)
        self.serf_wan_port = free_port(udp=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def http_addr(self) -> str:
        """``host:port``, the ``CONSUL_HTTP_ADDR`` form."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def address(self) -> ConsulAddress:
        return ConsulAddress.parse(self.http_addr)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"consul-agent-{self.starts}.log"

    def log_text(self) -> str:
        """The current agent's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self) -> list[str]:
        # Consul 1.8.7 accepts -1 to disable the DNS and gRPC listeners.
        return [
            str(self.binary), "agent", "-dev",
            "-bind", LOOPBACK, "-client", LOOPBACK,
            "-node", "kleinserve-test",
            "-http-port", str(self.http_port),
            "-dns-port", "-1", "-grpc-port", "-1",
            "-server-port", str(self.server_port),
            "-serf-lan-port", str(self.serf_lan_port),
            "-serf-wan-port", str(self.serf_wan_port),
        ] + self._config_file()  # fmt: skip

    def _config_file(self) -> list[str]:
        if not self.config:
            return []
        path = self.workdir / "agent-config.json"
        path.write_text(json.dumps(self.config))
        return ["-config-file", str(path)]

    def start(self, timeout: float = 30.0) -> None:
        """Start the agent and wait until it has elected itself leader."""
        if self.running:
            raise RuntimeError("the agent is already running")
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"consul exited early; its log:\n{self.log_text()[-3000:]}")
            try:
                status, _, leader = self.get("/v1/status/leader")
            except OSError:
                status, leader = 0, ""
            if status == 200 and leader:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"consul had no leader after {timeout} s; log:\n{self.log_text()[-3000:]}"
        )

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """Stop the agent (SIGTERM, or SIGKILL if ``kill``); its state goes with it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def restart(self, timeout: float = 30.0) -> None:
        """A fresh, empty agent on the same ports, as after an agent restart."""
        self.stop()
        self.start(timeout)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
        """``(status, headers, decoded JSON or text)`` of a GET, straight with urllib."""
        request = urllib.request.Request(f"http://{self.http_addr}{path}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, body = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, dict(e.headers), e.read()
        try:
            return status, headers, json.loads(body)
        except ValueError:
            return status, headers, body.decode(errors="replace")

    def put(self, path: str, body: Any = None, timeout: float = 5.0) -> int:
        """PUT ``body`` as JSON; returns the status."""
        data = b"" if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.http_addr}{path}", data, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code


class HostAgent(ConsulAgent):
    """A Consul agent on one host of ``harness.cluster``: inside the network namespace
    ``netns``, bound to the host's ``address``, with Consul's default ports (each namespace has
    its own), its HTTP API on the host's loopback. ``join`` is the server's address for a
    client agent; without it the agent is the cluster's one server (``-bootstrap-expect=1``).

    State lives in ``workdir/data-NODE``; ``get``/``put`` run inside the namespace.
    """

    def __init__(
        self, binary: Path, workdir: Path, *, node: str, netns: str, address: str, join: str | None
    ) -> None:
        self.binary, self.workdir = binary, workdir
        self.node, self.netns, self.bind, self.join = node, netns, address, join
        self.http_port, self.process, self.starts = 8500, None, 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"consul-{self.node}-{self.starts}.log"

    def command(self) -> list[str]:
        role = ["-retry-join", self.join] if self.join else ["-server", "-bootstrap-expect=1"]
        return [
            *exec_prefix(self.netns), str(self.binary), "agent", *role,
            "-node", self.node, "-bind", self.bind, "-client", LOOPBACK,
            "-data-dir", str(self.workdir / f"data-{self.node}"),
            # Agents of one machine would all derive the same node ID from it.
            "-disable-host-node-id",
            "-dns-port", "-1", "-grpc-port", "-1",
            "-hcl", "performance { raft_multiplier = 1 }",
        ]  # fmt: skip

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
        return call_in(self.netns, lambda: ConsulAgent.get(self, path, timeout))

    def put(self, path: str, body: Any = None, timeout: float = 5.0) -> int:
        return call_in(self.netns, lambda: ConsulAgent.put(self, path, body, timeout))
