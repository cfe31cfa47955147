"""The files of ``deploy/`` read as data, for tests/test_deploy.py and its integration half.

Each reader returns what the file says, with no judgement: the Kubernetes documents, the
Dockerfile's instructions, the compose services, the systemd unit's keys, and from each the
server's command line (the flags after ``twistd … inference``), parsed against the server's
own flag table.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from service.options import DEFAULT_GRPC_PORT, Options

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "kleinserve@.service"
# The example /etc/kleinserve/%i.env files, each meant for the instance kleinserve@digits.
SYSTEMD_ENV_FILES = sorted((DEPLOY / "systemd").glob("*.env"))
SYSTEMD_INSTANCE = "digits"
KUBERNETES = DEPLOY / "kubernetes"
# The plain manifests (kustomize's base) and the overlays built on them, by name.
KUBERNETES_BASE = KUBERNETES / "base"
KUBERNETES_FILES = sorted(
    p for p in KUBERNETES_BASE.glob("*.yaml") if p.name != "kustomization.yaml"
)
KUBERNETES_OVERLAYS = {"secure": KUBERNETES / "secure"}

# The image's name in the manifests: containers of it run the server.
IMAGE = "kleinserve"


class ServerFlags(Options):
    """The server's flag table (names, flag or value, int/float coercion) without the checks
    that need the deployed host: model folders, config files, a Consul agent."""

    def postOptions(self) -> None:
        pass


def parse_flags(args: list[str]) -> ServerFlags:
    """``args`` (what follows ``inference``) parsed by the server's flag table; a misspelt
    flag or a bad number raises ``usage.UsageError`` naming it."""
    flags = ServerFlags()
    flags.parseOptions(list(args))
    return flags


def server_args(argv: list[str]) -> list[str]:
    """What follows ``inference`` in a ``twistd … inference …`` command line."""
    if not argv or Path(argv[0]).name != "twistd" or "inference" not in argv:
        raise ValueError(f"not a 'twistd … inference …' command line: {argv}")
    return argv[argv.index("inference") + 1 :]


def stop_seconds(flags: ServerFlags) -> float:
    """The longest an ordered stop takes: --drain_delay + --drain_timeout (given or default)."""
    return float(flags["drain_delay"]) + float(flags["drain_timeout"])


def listen_port(flags: ServerFlags) -> int:
    """The REST port of --rest_api_port or a ``tcp:PORT…``/``ssl:PORT…`` --listen."""
    if flags["rest_api_port"] is not None:
        return int(flags["rest_api_port"])
    listen = flags["listen"]
    match = re.match(r"(?:tcp|ssl):(?:port=)?(\d+)(?::|$)", listen or "")
    if match is None:
        raise ValueError(f"--listen={listen} names no TCP port")
    return int(match[1])


def grpc_port(flags: ServerFlags) -> int | None:
    """The gRPC port: --grpc_listen's, else --port (default TF Serving's 8500); None if off."""
    if flags["grpc_listen"] is not None:
        return int(flags["grpc_listen"].rpartition(":")[2])
    port = int(flags["port"] if flags["port"] is not None else DEFAULT_GRPC_PORT)
    return port or None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|h|m|s)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 1.0}


def seconds(duration: str | int | float) -> float:
    """A duration as systemd (``45``, ``45s``, ``1min 30s``) or compose (``1m30s``) writes it."""
    if isinstance(duration, int | float):
        return float(duration)
    text = duration.strip()
    parts = list(_DURATION.finditer(text))
    if not parts or "".join(p[0] for p in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(p[1]) * _UNIT_SECONDS[p[2]] for p in parts)


# -- Kubernetes ------------------------------------------------------------------------------


def kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every document of every plain manifest, with its file."""
    documents = []
    for path in KUBERNETES_FILES:
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


def kubectl() -> str | None:
    """The kubectl on PATH (kustomize is built in; ``kubectl kustomize`` needs no cluster)."""
    return shutil.which("kubectl")


@functools.cache
def kustomized(folder: Path) -> tuple[dict[str, Any], ...]:
    """The documents ``kubectl kustomize folder`` renders: what ``kubectl apply -k`` sends."""
    command = kubectl()
    if command is None:
        raise FileNotFoundError("kubectl is not installed")
    result = subprocess.run(
        [command, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise ValueError(f"kubectl kustomize {folder} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d is not None)


def of_kind(kind: str, documents: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The documents of ``kind``: of ``documents``, else of the plain manifests."""
    if documents is None:
        documents = [d for _, d in kubernetes_documents()]
    return [d for d in documents if d["kind"] == kind]


def server_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a Deployment's pods that run the server image."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return [c for c in containers if c["image"].split(":")[0].rsplit("/", 1)[-1] == IMAGE]


def container_argv(container: dict[str, Any]) -> list[str]:
    """The command a container runs: its ``command`` or the image's ENTRYPOINT, then its args."""
    command = container.get("command") or dockerfile_entrypoint()
    return [*command, *container.get("args", [])]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port as a number: a name is looked up in the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    if port not in named:
        raise KeyError(f"container {container['name']!r} has no port named {port!r}")
    return int(named[port])


PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


class Probe(NamedTuple):
    path: str
    port: int
    scheme: str  # "http" or "https": the kubelet's httpGet scheme (HTTP unless given)


def http_probes(container: dict[str, Any]) -> dict[str, Probe]:
    """Each probe of a container; a probe of another kind raises."""
    found = {}
    for name in PROBES:
        probe = container.get(name)
        if probe is None:
            continue
        if "httpGet" not in probe:
            raise ValueError(
                f"{name} is not an httpGet probe; tests/test_deploy.py checks only those"
            )
        get = probe["httpGet"]
        port = container_port(container, get["port"])
        found[name] = Probe(get["path"], port, get.get("scheme", "HTTP").lower())
    return found


def listen_scheme(flags: ServerFlags) -> str:
    """``https`` for an ``ssl:`` --listen, else ``http`` (what the server registers)."""
    listen = flags["listen"] or "tcp"
    return "https" if listen.split(":", 1)[0] == "ssl" else "http"


def mounted_file(container: dict[str, Any], pod: dict[str, Any], path: str) -> tuple[str, str]:
    """The (Secret or ConfigMap name, key) whose file a container sees at ``path``."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(folder):
            continue
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            raise ValueError(f"{path} is on a volume holding no Secret or ConfigMap: {volume}")
        key = path[len(folder) :]
        paths = {item["path"]: item["key"] for item in source.get("items", [])}
        return source.get("secretName") or source["name"], paths.get(key, key)
    raise KeyError(f"no volume of container {container['name']!r} holds {path}")


def pre_stop_seconds(container: dict[str, Any]) -> float:
    """How long a container's preStop hook waits: its ``sleep`` action or an exec of
    ``sleep N`` (0 without a hook); another kind of hook raises, as its length is unknown."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) and len(command) == 3:
        command = shlex.split(command[2])
    if len(command) == 2 and Path(command[0]).name == "sleep":
        return seconds(command[1])
    raise ValueError(f"a preStop hook of unknown length: {hook}")


def env_references(args: list[str]) -> set[str]:
    """The ``$(NAME)`` variables Kubernetes expands in a container's args (``$$`` escapes)."""
    return set(re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(args)))


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_entrypoint() -> list[str]:
    (entrypoint,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    argv: list[str] = json.loads(entrypoint)
    return argv


def dockerfile_user() -> str:
    """The image's USER (``uid:gid``)."""
    (user,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    return user


def healthcheck_url() -> str:
    """The URL the Dockerfile's HEALTHCHECK asks."""
    (check,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    match = re.search(r"https?://[^'\"\s]+", check)
    if match is None:
        raise ValueError(f"HEALTHCHECK asks no URL: {check}")
    return match[0]


# -- compose and systemd ---------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def compose_server_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the server: built from deploy/Dockerfile or its image."""
    return {
        name: service
        for name, service in compose_services().items()
        if (service.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"
        or str(service.get("image", "")).split(":")[0].rsplit("/", 1)[-1] == IMAGE
    }


def compose_argv(service: dict[str, Any]) -> list[str]:
    """A compose service's command line: its entrypoint (or the image's) and command, with a
    ``sh -c`` script split into words and its command substitutions kept as one word."""
    entrypoint = service.get("entrypoint") or dockerfile_entrypoint()
    command = service.get("command") or []
    argv = [*_words(entrypoint), *_words(command)]
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        script = re.sub(r"\$\$?\([^)]*\)", "SUBSTITUTED", " ".join(argv[2:]))
        argv = shlex.split(script)
        if argv and argv[0] == "exec":
            argv = argv[1:]
    return argv


def _words(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def systemd_service_keys() -> dict[str, str]:
    """The [Service] section's keys (the last of a repeated key), continuation lines joined."""
    keys: dict[str, str] = {}
    section = ""
    pending = ""
    for line in SYSTEMD_UNIT.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith(("#", ";"))):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line.strip(), ""
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    return keys


def systemd_argv(env: dict[str, str] | None = None) -> list[str]:
    """ExecStart as words: as written (``%i`` and ``$VAR`` kept) without ``env``, else as
    systemd expands it for the instance SYSTEMD_INSTANCE with the environment ``env``."""
    return systemd_command("ExecStart", env)


def systemd_command(key: str, env: dict[str, str] | None = None) -> list[str]:
    """An Exec key's command as words, expanded as systemd does when ``env`` is given:
    ``%i`` the instance; ``${VAR}`` the value as it is (in a word, or one word, empty when
    unset); ``$VAR`` alone as a word, the value split at whitespace (no word when unset)."""
    words = shlex.split(systemd_service_keys()[key].lstrip("-@:+!"))
    if env is None:
        return words
    expanded: list[str] = []
    for word in words:
        word = word.replace("%i", SYSTEMD_INSTANCE)
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            expanded.extend(env.get(alone[1], "").split())
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word))
    return expanded


def systemd_braced_variables() -> set[str]:
    """The ``${VAR}`` variables ExecStart passes as they are (an unset one passes "")."""
    return set(re.findall(r"\$\{(\w+)\}", systemd_service_keys()["ExecStart"]))


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile's ``KEY=VALUE`` lines (comments and blank lines left out, one pair
    of surrounding quotes removed), as systemd reads it."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env
