"""deploy/ for real where this machine can: a twistd started with the Kubernetes Deployment's
flags (as far as they apply here) and its ConfigMap's files, asked each probe's path; and a
server registering under deploy/consul's ACL policy with a real agent denying by default."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.ports import LOOPBACK, free_port
from harness.twistd import TwistdServer, poll
from tests import deploy_files as files
from tests.certificates import make_server_files
from tests.test_consul_address_integration import all_interfaces_server

pytestmark = pytest.mark.integration

# Flags left out here, and why: the registration needs the node's Consul agent and the pod's
# IP (tests/test_consul_address_integration.py and the discovery tests register real servers
# with a real agent); the ports are the harness's free loopback ones, not 8501 and 8500.
NOT_HERE = ("--consul", "--advertise", "--listen", "--rest_api_port", "--port", "--grpc_listen")

DEMO_MODELS = files.REPO / "models"


def local_volumes(
    documents: list[dict[str, Any]],
    deployment: dict[str, Any],
    container: dict[str, Any],
    root: Path,
    secrets: dict[str, dict[str, bytes]] | None = None,
) -> dict[str, Path]:
    """Each mount path of the container, mapped to a folder here: a PersistentVolumeClaim to
    the demo models (models/, from scripts/export-demo-model), a ConfigMap to its files, a
    Secret to the files ``secrets`` gives it (by Secret name, then key)."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_maps = {c["metadata"]["name"]: c for c in files.of_kind("ConfigMap", documents)}
    secrets = secrets or {}
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
        elif "secret" in volume:
            folder = root / mount["name"]
            folder.mkdir()
            for name, data in secrets[volume["secret"]["secretName"]].items():
                (folder / name).write_bytes(data)
                (folder / name).chmod(volume["secret"].get("defaultMode", 0o644))
            mounts[mount["mountPath"]] = folder
        else:
            raise ValueError(f"a volume this test cannot map: {volume}")
    for folder in {
        mounts[m["mountPath"]]
        for m in container.get("volumeMounts", [])
        if "configMap" in volumes[m["name"]]
    }:
        for file in folder.iterdir():
            file.write_text(localized(file.read_text(), mounts))
    return mounts


def localized(text: str, mounts: dict[str, Path]) -> str:
    """``text`` with each mount path replaced by its folder here."""
    for path in sorted(mounts, key=len, reverse=True):
        text = text.replace(path.rstrip("/") + "/", f"{mounts[path]}/")
    return text


def start_server(
    documents: list[dict[str, Any]],
    root: Path,
    secrets: dict[str, dict[str, bytes]] | None = None,
    ca_file: Path | None = None,
) -> tuple[TwistdServer, dict[str, files.Probe]]:
    """The server of a variant's Deployment, started with its flags and files (its TLS
    --listen moved to a free loopback port, trusted through ``ca_file``)."""
    if not (DEMO_MODELS / "digits").is_dir():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")
    (deployment,) = files.of_kind("Deployment", documents)
    (container,) = files.server_containers(deployment)
    mounts = local_volumes(documents, deployment, container, root, secrets)
    given = files.server_args(files.container_argv(container))
    port = free_port()
    args = [localized(arg, mounts) for arg in given if not arg.startswith(NOT_HERE)]
    listen = files.parse_flags(given)["listen"]
    if listen.startswith("ssl:"):
        _, _, rest = listen.split(":", 2)
        args.append(localized(f"--listen=ssl:{port}:interface={LOOPBACK}:{rest}", mounts))
    server = TwistdServer(args, root, port=port, ca_file=ca_file).start()
    return server, files.http_probes(container)


@pytest.fixture(scope="module")
def manifest_server(tmp_path_factory):
    """The server of the plain manifest's Deployment, started with its flags and files."""
    documents = [d for _, d in files.kubernetes_documents()]
    server, probes = start_server(documents, tmp_path_factory.mktemp("deploy"))
    try:
        server.wait_ready()
        yield server, probes
    finally:
        server.stop()


def test_every_probe_path_answers_200_once_ready(manifest_server) -> None:
    """Each probe's path, and the Dockerfile HEALTHCHECK's, answers 200 on a ready server
    started with the manifest's flags and ConfigMap."""
    server, probes = manifest_server
    paths = {probe.path for probe in probes.values()}
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
    ready_path = probes["readinessProbe"].path
    live_path = probes["livenessProbe"].path
    server.process.send_signal(signal.SIGTERM)

    def read() -> tuple[int | None, int | None]:
        try:
            return server.get(ready_path)[0], server.get(live_path)[0]
        except OSError:  # the port closed: the drain delay is over
            return None, None

    assert poll(read, lambda seen: seen[0] != 200, timeout=30) == (503, 200)
    assert server.process.wait(60) == -signal.SIGTERM


# -- the secure overlay: TLS, bearer tokens, JSON logs ----------------------------------------

TOKEN = "deploy-test-token-" + "5f0c2a9e" * 4
# One blank 28×28 digit (the demo model's input); samples/seven.json is written by scripts/demo
# only, not by the export that scripts/test runs.
DIGIT = json.dumps({"instances": [[[[0.0]] * 28] * 28]}).encode()


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    """The server of the secure overlay (kubectl kustomize deploy/kubernetes/secure), with its
    Secrets made here: a key and certificate signed by a test CA (kleinserve-tls) and a token
    file (kleinserve-tokens)."""
    if files.kubectl() is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders the overlay")
    documents = list(files.kustomized(files.KUBERNETES_OVERLAYS["secure"]))
    root = tmp_path_factory.mktemp("deploy-secure")
    pki = make_server_files(root / "pki")
    secrets = {
        "kleinserve-tls": {
            "tls.key": pki.key.read_bytes(),
            "tls.crt": pki.certificate.read_bytes(),
        },
        "kleinserve-tokens": {"tokens": f"# made by the test\n{TOKEN}\n".encode()},
    }
    server, probes = start_server(documents, root, secrets, ca_file=pki.ca)
    try:
        server.wait_ready()
        yield server, probes
    finally:
        server.stop()


def predict(
    server: TwistdServer, headers: dict[str, str], model: str = "digits/labels/stable"
) -> tuple[int, dict[str, str], Any]:
    status, answer_headers, body = server.request(
        "POST",
        f"/v1/models/{model}:predict",
        DIGIT,
        {"content-type": "application/json", **headers},
    )
    return status, answer_headers, json.loads(body)


def test_secure_probes_answer_over_https_without_a_token(secure_server) -> None:
    """Each probe of the secure overlay asks over https, and its path answers 200 there to a
    request that carries no token (the kubelet sends none)."""
    server, probes = secure_server
    assert {p.scheme for p in probes.values()} == {"https"}
    assert server.url.startswith("https://")
    paths = sorted({p.path for p in probes.values()})
    assert {path: server.get(path)[0] for path in paths} == dict.fromkeys(paths, 200)


def test_secure_inference_needs_the_token_from_the_secret(secure_server) -> None:
    """An inference call without a token is answered 401 with WWW-Authenticate, one with a
    token that is not in the Secret 401 too, and one with the Secret's token 200."""
    server, _ = secure_server
    status, headers, body = predict(server, {})
    assert status == 401, body
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    status, _, body = predict(server, {"Authorization": "Bearer not-the-token"})
    assert status == 401, body
    status, _, body = predict(server, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    assert len(body["predictions"]) == 1


def test_secure_metrics_are_open_for_scrapers(secure_server) -> None:
    """/metrics, which the Prometheus annotations name, answers without a token over https
    and counts the inference calls."""
    server, _ = secure_server
    predict(server, {"Authorization": f"Bearer {TOKEN}"})
    status, text = server.get("/metrics")
    assert status == 200
    assert 'kleinserve_model_requests_total{api="tfserving_rest",code="200"' in text


def test_secure_log_is_json_lines_with_access_entries(secure_server) -> None:
    """Standard output (what a log shipper reads) is one JSON object per line, and the
    inference calls' access entries are among them with their status."""
    server, _ = secure_server
    predict(server, {})
    predict(server, {"Authorization": f"Bearer {TOKEN}"})

    def access_statuses() -> set[int]:
        lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        return {
            e["access"]["status"]
            for e in lines
            if "access" in e and e["access"]["route"] == "predict"
        }

    assert poll(access_statuses, lambda seen: {200, 401} <= seen, timeout=10) >= {200, 401}


# -- the secure systemd instance ---------------------------------------------------------------


def test_the_secure_systemd_instance_serves_tls_and_rotates_tokens_on_reload(tmp_path) -> None:
    """ExecStart as systemd expands it with digits-secure.env (the files it names made here,
    its addresses moved to free loopback ports) serves https needing a token; after the token
    file changes, SIGHUP (what ExecReload sends) makes the new token work and the old one 401."""
    if not (DEMO_MODELS / "digits").is_dir():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")
    env = files.read_env_file(files.DEPLOY / "systemd" / "digits-secure.env")
    port = free_port()
    env["LISTEN"], moved = re.subn(
        r"^ssl:\d+:interface=[^:]+:", f"ssl:{port}:interface={LOOPBACK}:", env["LISTEN"]
    )
    assert moved == 1, env["LISTEN"]
    env["GRPC_LISTEN"] = f"{LOOPBACK}:{free_port()}"
    pki = make_server_files(tmp_path / "pki")
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o640)
    flags = files.parse_flags(files.server_args(files.systemd_argv(env)))
    here = {
        flags["auth_token_file"]: token_file,
        **dict(
            zip(
                (
                    p.split("=", 1)[1]
                    for p in flags["listen"].split(":")
                    if p.startswith(("privateKey=", "certKey="))
                ),
                (pki.key, pki.certificate),
                strict=True,
            )
        ),
        str(Path(flags["model_base_path"]).parent): DEMO_MODELS,
    }
    args = files.server_args(files.systemd_argv(env))
    for deployed, local in here.items():
        args = [arg.replace(deployed, str(local)) for arg in args]
    server = TwistdServer(args, tmp_path, port=port, ca_file=pki.ca).start()
    try:
        server.wait_ready()
        assert predict(server, {}, "digits")[0] == 401
        assert predict(server, {"Authorization": f"Bearer {TOKEN}"}, "digits")[0] == 200
        rotated = "deploy-test-rotated-" + "9e2a" * 8
        token_file.write_text(f"{rotated}\n")
        server.process.send_signal(signal.SIGHUP)

        def statuses() -> tuple[int, int]:
            new = predict(server, {"Authorization": f"Bearer {rotated}"}, "digits")[0]
            old = predict(server, {"Authorization": f"Bearer {TOKEN}"}, "digits")[0]
            return new, old

        assert poll(statuses, lambda seen: seen == (200, 401), timeout=30) == (200, 401)
    finally:
        server.stop()


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
