"""The whole path over TLS: a real ``twistd`` serving https with a certificate the test made,
a real Consul agent whose https check of it turns passing, and the client library (and its
command line) finding it in Consul and predicting over https, verifying the certificate
against the test's CA; without that CA, a clear ``CertificateError`` after one attempt.

How the Consul agent trusts the test's CA: Consul 1.8.7's HTTP checks verify certificates
against the system's CAs, unless the agent has ``enable_agent_tls_for_checks``, which makes
them use the agent's own ``ca_file`` (and verify the server name the agent's ``server_name``
gives, else its node name). That is what this test configures (``ca_file`` = the test's CA,
``server_name`` = ``localhost``, a DNS subjectAltName of the server's certificate), so the
check really verifies the certificate: the other way, ``--consul_check_tls_skip_verify``,
would pass with any certificate and prove nothing about it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import CertificateError, InferenceClient
from harness.consul import ConsulAgent
from harness.ports import LOOPBACK, free_port
from harness.twistd import TwistdServer, poll
from tests import models
from tests.certificates import ServerFiles, make_ca, make_server_files
from tests.consul_agent import new_agent

pytestmark = pytest.mark.integration

INPUTS = np.array([[1.0, 1.0, 1.0], [0.5, 0.0, -1.0]], np.float32)
# y = x @ [[1, 2], [3, 4], [5, 6]] + [0.5, -0.5]
OUTPUTS = np.array([[9.5, 11.5], [-4.0, -5.5]], np.float32)
CLI = Path(sys.executable).parent / "inference-client"


class TLSFleet:
    def __init__(self, files: ServerFiles, agent: ConsulAgent, server: TwistdServer) -> None:
        self.files = files
        self.agent = agent
        self.server = server


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSFleet]:
    files = make_server_files(tmp_path_factory.mktemp("pki"))
    agent = new_agent(
        tmp_path_factory.mktemp("consul"),
        {
            "enable_agent_tls_for_checks": True,
            "ca_file": str(files.ca),
            "server_name": "localhost",
        },
    )
    root = tmp_path_factory.mktemp("models")
    models.make_linear(root / "linear")
    port = free_port()
    listen = (
        f"--listen=ssl:{port}:interface={LOOPBACK}"
        f":privateKey={files.key}:certKey={files.certificate}"
    )
    server = TwistdServer(
        [
            "--model_name=linear",
            f"--model_base_path={root / 'linear'}",
            listen,
            f"--consul={agent.http_addr}",
            "--consul_check_interval=1",
            "--drain_delay=1",
        ],
        tmp_path_factory.mktemp("logs"),
        port=port,
        ca_file=files.ca,
    )
    agent.start()
    try:
        server.start().wait_ready()
        yield TLSFleet(files, agent, server)
    finally:
        server.stop()
        agent.stop(kill=True)


def passing(agent: ConsulAgent) -> list[Any]:
    status, _, entries = agent.get("/v1/health/service/inference?passing")
    assert status == 200
    return list(entries)


def test_the_https_check_verifies_the_certificate_and_turns_passing(fleet: TLSFleet) -> None:
    """The server registers an https readiness check (not skipping verification) and
    ``scheme: https`` in its meta; the agent, trusting the test's CA, finds it passing."""
    entries = poll(lambda: passing(fleet.agent), lambda found: len(found) == 1, timeout=60)
    assert len(entries) == 1, fleet.agent.log_text()[-3000:]
    service = entries[0]["Service"]
    assert (service["Address"], service["Port"]) == (LOOPBACK, fleet.server.port)
    assert service["Meta"]["scheme"] == "https"
    (check,) = [c for c in entries[0]["Checks"] if c["Type"] == "http"]
    url = f"https://{LOOPBACK}:{fleet.server.port}/readyz"
    assert check["Status"] == "passing" and check["Output"].startswith(f"HTTP GET {url}: 200")


def test_an_agent_trusting_another_ca_finds_the_check_critical(
    fleet: TLSFleet, tmp_path: Path
) -> None:
    """The same https check, run by an agent whose ca_file is another CA, is critical with
    Go's certificate error: the passing check above did verify the certificate."""
    other = new_agent(
        tmp_path / "consul",
        {
            "enable_agent_tls_for_checks": True,
            "ca_file": str(make_ca(tmp_path, "another CA")[0]),
            "server_name": "localhost",
        },
    )
    (tmp_path / "consul").mkdir()
    other.start()
    try:
        url = f"https://{LOOPBACK}:{fleet.server.port}/readyz"
        check = {"ID": "tls", "Name": "tls", "HTTP": url, "Interval": "1s"}
        assert other.put("/v1/agent/check/register", check) == 200

        def status() -> dict[str, Any]:
            return other.get("/v1/agent/checks")[2].get("tls", {})

        found = poll(status, lambda c: "certificate" in c.get("Output", ""), timeout=30)
    finally:
        other.stop(kill=True)
    assert found["Status"] == "critical" and "unknown authority" in found["Output"], found


@pytest.mark.parametrize("protocol", ["auto", "rest"])
def test_the_client_finds_the_server_in_consul_and_predicts_over_https(
    fleet: TLSFleet, protocol: str
) -> None:
    """The client library resolves the server from Consul and predicts over https, verifying
    its certificate (the IP address 127.0.0.1 Consul reports) against ``ca_file``."""
    poll(lambda: passing(fleet.agent), lambda found: len(found) == 1, timeout=60)
    with InferenceClient(
        consul=fleet.agent.http_addr, ca_file=str(fleet.files.ca), protocol=protocol
    ) as client:
        outputs = client.predict("linear", INPUTS)
    np.testing.assert_array_equal(outputs, OUTPUTS)


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_a_client_that_does_not_trust_the_ca_gets_a_certificate_error(
    fleet: TLSFleet, tmp_path: Path, trust: str
) -> None:
    """Without the CA (the system's trusted CAs), or with another CA, a call fails at once
    with CertificateError saying what to give, after a single attempt (not retried)."""
    poll(lambda: passing(fleet.agent), lambda found: len(found) == 1, timeout=60)
    ca_file = str(make_ca(tmp_path, "another CA")[0]) if trust == "another CA" else None
    with InferenceClient(consul=fleet.agent.http_addr, ca_file=ca_file) as client:
        with pytest.raises(CertificateError) as raised:
            client.predict("linear", INPUTS)
        attempts = client.async_client.stats.attempts
    message = str(raised.value)
    assert "certificate verify failed" in message and "ca_file" in message
    assert f"https://{LOOPBACK}:{fleet.server.port}" in message
    assert attempts == 1


def test_the_command_line_predicts_over_https_with_ca_file(fleet: TLSFleet) -> None:
    """``inference-client --ca-file`` predicts over https and lists the server with its load
    (read from its /metrics over https); without it a predict fails (status 1) naming the
    certificate error."""
    poll(lambda: passing(fleet.agent), lambda found: len(found) == 1, timeout=60)
    body = json.dumps({"instances": INPUTS.tolist()})
    common = [str(CLI), "--consul", fleet.agent.http_addr, "--timeout", "20"]
    done = subprocess.run(
        [*common, "--ca-file", str(fleet.files.ca), "predict", "linear", "--json", body],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"predictions": OUTPUTS.tolist()}
    listed = subprocess.run(
        [*common, "--ca-file", str(fleet.files.ca), "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    (backend,) = json.loads(listed.stdout)
    assert backend["address"] == f"{LOOPBACK}:{fleet.server.port}" and "error" not in backend
    assert backend["requests_served"] >= 1
    refused = subprocess.run(
        [*common, "predict", "linear", "--json", body], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "CertificateError" in refused.stderr, refused.stderr
