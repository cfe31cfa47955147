"""Consul's address convention, with a real agent and a real ``twistd``: a server listening on
all interfaces the TF Serving way (``--rest_api_port``) registers, without ``--advertise``,
under the address its local agent advertises, and the client library reaches it there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import InferenceClient
from harness.consul import ConsulAgent
from harness.ports import free_port
from harness.twistd import TwistdServer, poll
from tests import models
from tests.consul_agent import new_agent

pytestmark = pytest.mark.integration


def test_a_server_on_all_interfaces_registers_the_agents_address(tmp_path: Path) -> None:
    consul_agent = new_agent(tmp_path)
    consul_agent.start()
    try:
        serve_on_all_interfaces(tmp_path, consul_agent)
    finally:
        consul_agent.stop(kill=True)


def all_interfaces_server(tmp_path: Path, consul_http_addr: str) -> TwistdServer:
    """A started server of the linear test model on all interfaces (``--rest_api_port``),
    registering through the agent at ``consul_http_addr`` without ``--advertise``."""
    models.make_linear(tmp_path / "linear")
    port = free_port()
    return TwistdServer(
        [
            f"--rest_api_port={port}",  # all interfaces; no --advertise
            "--model_name=linear",
            f"--model_base_path={tmp_path / 'linear'}",
            f"--consul={consul_http_addr}",
            "--consul_check_interval=1",
            "--drain_delay=1",
        ],
        tmp_path,
        port=port,
    ).start()


def serve_on_all_interfaces(tmp_path: Path, consul_agent: ConsulAgent) -> None:
    server = all_interfaces_server(tmp_path, consul_agent.http_addr)
    port = server.port
    try:
        server.wait_ready()
        status, _, agent = consul_agent.get("/v1/agent/self")
        assert status == 200
        advertised = agent["Member"]["Addr"]

        def passing() -> list[dict]:
            status, _, entries = consul_agent.get("/v1/health/service/inference?passing")
            return entries if status == 200 else []

        (entry,) = poll(passing, bool, timeout=60)
        assert entry["Service"]["Address"] == advertised
        assert entry["Service"]["Port"] == port
        assert entry["Service"]["ID"] == f"inference-{advertised}-{port}"
        with InferenceClient(consul=consul_agent.http_addr, timeout=30) as client:
            y = client.predict("linear", [[1.0, 1.0, 1.0]])
            np.testing.assert_array_equal(y, np.array([[9.5, 11.5]], np.float32))
            (info,) = client.backends("linear")
            assert (info.backend.address, info.backend.port) == (advertised, port)
    finally:
        server.stop()
