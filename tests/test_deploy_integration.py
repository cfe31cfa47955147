"""deploy/ for real where this machine can: a twistd started with the Kubernetes Deployment's
flags (as far as they apply here) and its ConfigMap's files, asked each probe's path; and a
server registering under deploy/consul's ACL policy with a real agent denying by default."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.twistd import TwistdServer, poll
from tests import deploy_files as files
from tests.test_consul_address_integration import all_interfaces_server

pytestmark = pytest.mark.integration

# Flags left out here, and why: the registration needs the node's Consul agent and the pod's
# IP (tests/test_consul_address_integration.py and the discovery tests register real servers
# with a real agent); the ports are the harness's free loopback ones, not 8501 and 8500.
NOT_HERE = ("--consul", "--advertise", "--listen", "--rest_api_port", "--port", "--grpc_listen")

DEMO_MODELS = files.REPO / "models"


def local_volumes(
    deployment: dict[str, Any], container: dict[str, Any], root: Path
) -> dict[str, Path]:
    """Each mount path of the container, mapped to a folder here: a PersistentVolumeClaim to
    the demo models (models/, from scripts/export-demo-model), a ConfigMap to its files."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_maps = {c["metadata"]["name"]: c for c in files.of_kind("ConfigMap")}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            mounts[mount["mountPath"]] = DEMO_MODELS
        elif "configMap" in volume:
            folder = root / mount["name"]
            folder.mkdir()
            for name, text in config_maps[volume["configMap"]["name"]]["data"].items():
                (folder / name).write_text(text)
            mounts[mount["mountPath"]] = folder
        else:
            raise ValueError(f"a volume this test cannot map: {volume}")
    for folder in {p for p in mounts.values() if p != DEMO_MODELS}:
        for file in folder.iterdir():
            file.write_text(localized(file.read_text(), mounts))
    return mounts


def localized(text: str, mounts: dict[str, Path]) -> str:
    """``text`` with each mount path replaced by its folder here."""
    for path in sorted(mounts, key=len, reverse=True):
        text = text.replace(path.rstrip("/") + "/", f"{mounts[path]}/")
    return text


@pytest.fixture(scope="module")
def manifest_server(tmp_path_factory):
    """The server of the manifest's Deployment, started with its flags and files."""
    if not (DEMO_MODELS / "digits").is_dir():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")
    (deployment,) = files.of_kind("Deployment")
    (container,) = files.server_containers(deployment)
    root = tmp_path_factory.mktemp("deploy")
    mounts = local_volumes(deployment, container, root)
    args = [
        localized(arg, mounts)
        for arg in files.server_args(files.container_argv(container))
        if not arg.startswith(NOT_HERE)
    ]
    server = TwistdServer(args, root).start()
    try:
        server.wait_ready()
        yield server, files.http_probes(container)
    finally:
        server.stop()


def test_every_probe_path_answers_200_once_ready(manifest_server) -> None:
    """Each probe's path, and the Dockerfile HEALTHCHECK's, answers 200 on a ready server
    started with the manifest's flags and ConfigMap."""
    server, probes = manifest_server
    paths = {path for path, _ in probes.values()}
    paths.add("/" + files.healthcheck_url().split("/", 3)[3])
    assert {path: server.get(path)[0] for path in sorted(paths)} == dict.fromkeys(
        sorted(paths), 200
    )


def test_the_configmap_models_are_served(manifest_server) -> None:
    """The ConfigMap's model config loads: its model is AVAILABLE under its label."""
    server, _ = manifest_server
    status, body = server.get("/v1/models/digits/labels/stable")
    assert status == 200, body
    assert [v["state"] for v in body["model_version_status"]] == ["AVAILABLE"]


def test_readiness_fails_through_the_drain_while_liveness_holds(manifest_server) -> None:
    """On SIGTERM the readiness probe's path answers 503 while the port still serves and
    the liveness path 200 (what lets the grace period go without a preStop sleep); the
    server then exits with the signal. Last in this module: it stops the server."""
    server, probes = manifest_server
    ready_path = probes["readinessProbe"][0]
    live_path = probes["livenessProbe"][0]
    server.process.send_signal(signal.SIGTERM)

    def read() -> tuple[int | None, int | None]:
        try:
            return server.get(ready_path)[0], server.get(live_path)[0]
        except OSError:  # the port closed: the drain delay is over
            return None, None

    assert poll(read, lambda seen: seen[0] != 200, timeout=30) == (503, 200)
    assert server.process.wait(60) == -signal.SIGTERM


# -- the Consul ACL policy -------------------------------------------------------------------

MASTER_TOKEN = "deploy-test-master-token"


class AclAgent(ConsulAgent):
    """A dev agent with ACLs on and denying by default, as deploy/consul/client-agent.hcl."""

    def command(self) -> list[str]:
        acl = (
            'acl { enabled = true, default_policy = "deny", '
            f'tokens {{ master = "{MASTER_TOKEN}", agent = "{MASTER_TOKEN}" }} }}'
        )
        return [*super().command(), "-hcl", acl]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request with the master token (the harness's readbacks send none)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.http_addr}{path}",
            data,
            method=method,
            headers={"X-Consul-Token": MASTER_TOKEN},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


@pytest.fixture
def acl_agent(tmp_path):
    """A running AclAgent, killed after the test."""
    if not CONSUL_BINARY.exists():
        pytest.skip(f"no consul binary at {CONSUL_BINARY}: run scripts/bootstrap to install it")
    agent = AclAgent(CONSUL_BINARY, tmp_path)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(kill=True)


def policy_token(agent: AclAgent) -> str:
    """A token of deploy/consul/inference-policy.hcl, made as its comment says."""
    rules = (files.DEPLOY / "consul" / "inference-policy.hcl").read_text()
    status, answer = agent.call("PUT", "/v1/acl/policy", {"Name": "inference", "Rules": rules})
    assert status == 200, answer
    status, answer = agent.call("PUT", "/v1/acl/token", {"Policies": [{"Name": "inference"}]})
    assert status == 200, answer
    secret: str = answer["SecretID"]
    return secret


def test_the_server_policy_lets_a_server_register_and_pass(
    acl_agent, tmp_path, monkeypatch
) -> None:
    """With a token of the server ACL policy (CONSUL_HTTP_TOKEN) and ACLs denying by default,
    a server on all interfaces without --advertise (the case that needs most: it reads the
    agent's own address before it registers) registers and its checks turn passing."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", policy_token(acl_agent))
    server = all_interfaces_server(tmp_path, acl_agent.http_addr)
    try:
        server.wait_ready()

        def passing() -> Any:
            return acl_agent.call("GET", "/v1/health/service/inference?passing")

        status, entries = poll(passing, lambda seen: seen[0] == 200 and bool(seen[1]), timeout=60)
        assert status == 200 and [e["Service"]["Port"] for e in entries] == [server.port], (
            server.log()
        )
    finally:
        server.stop()
