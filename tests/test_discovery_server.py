"""Real ``twistd -n inference`` servers registering in a real Consul agent (dev mode).

The servers run with short intervals (check every 1 s, TTL 3 s, drain 2 s). Most of them
are started together by one module fixture, since each spends seconds importing
TensorFlow; each test then waits for its own. Timing on the test machine is noisy, so
nothing asserts a duration: tests poll, with generous deadlines, until the state they
expect appears, then assert it. The two figures worth knowing (how long a killed
instance stays in ``?passing``, how long re-registration after an agent restart takes)
are printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness.consul import ConsulAgent
from harness.twistd import TwistdServer
from harness.twistd import poll as poll_until
from tests import models
from tests.consul_agent import new_agent

pytestmark = pytest.mark.integration


FAST = ["--consul_check_interval=1", "--consul_ttl=3", "--drain_delay=2"]
STARTUP = 240.0  # seven TensorFlow processes starting at once on a busy 2-core machine
DEADLINE = 60.0  # for any one state change; all of them take a few seconds when idle
poll = partial(poll_until, timeout=DEADLINE)
X = [[1.0, 2.0, 3.0]]
LINEAR_Y = [[22.5, 27.5]]  # x @ W + b for X (tests/models.py)
OVERLOAD_BATCHING = "max_batch_size { value: 1 }\nmax_enqueued_batches { value: 4 }\n"


# --- readbacks, straight from the agent with urllib ------------------------------------------


def service_id(server: TwistdServer) -> str:
    return f"inference-127.0.0.1-{server.port}"


def passing_ids(agent: ConsulAgent) -> set[str]:
    status, _, entries = agent.get("/v1/health/service/inference?passing")
    return {e["Service"]["ID"] for e in entries} if status == 200 else set()


def all_ids(agent: ConsulAgent) -> set[str]:
    status, _, entries = agent.get("/v1/health/service/inference")
    return {e["Service"]["ID"] for e in entries} if status == 200 else set()


def agent_services(agent: ConsulAgent) -> dict[str, Any]:
    status, _, services = agent.get("/v1/agent/services")
    return services if status == 200 else {}


def agent_checks(agent: ConsulAgent) -> dict[str, dict[str, Any]]:
    """The agent's own check view (the catalog only gets status changes promptly)."""
    status, _, checks = agent.get("/v1/agent/checks")
    return checks if status == 200 else {}


def check_status(agent: ConsulAgent, check_id: str) -> str | None:
    return agent_checks(agent).get(check_id, {}).get("Status")


def predict(server: TwistdServer, model: str) -> tuple[int, Any]:
    return server.post_json(f"/v1/models/{model}:predict", {"instances": X})


def log_lines(server: TwistdServer, marker: str, text: str) -> list[str]:
    """Lines of the server's log carrying ``marker`` (e.g. ``#warn]``) and mentioning ``text``."""
    return [line for line in server.log().splitlines() if marker in line and text in line]


def wait_passing(agent: ConsulAgent, server: TwistdServer) -> str:
    """Wait until the server is ready and passing in Consul; its service ID."""
    server.wait_ready(STARTUP)
    sid = service_id(server)
    assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids), server.log()
    return sid


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Fleet:
    """What the module's tests share.

    The agents come from ``tests.consul_agent.new_agent`` (as the ``consul_agent`` fixtures do,
    skipping without the binary): those fixtures are function-scoped and so cannot be
    known to a module-scoped fixture that starts every server at once.
    """

    models: Path
    logs: Path
    consul: ConsulAgent  # shared by most servers
    late_consul: ConsulAgent  # ports chosen, not started: test_registers_once_consul_comes_up
    restarted_consul: ConsulAgent  # restarted empty by test_reregisters_after_consul_restarts
    servers: dict[str, TwistdServer]


def server_args(model: str, base: Path, agent: ConsulAgent, *extra: str) -> list[str]:
    return [
        f"--model_name={model}",
        f"--model_base_path={base}",
        f"--consul={agent.http_addr}",
        *FAST,
        *extra,
    ]


def stop_all(servers: Iterable[TwistdServer]) -> None:
    """SIGTERM every server at once: each spends the drain delay before it exits."""
    servers = list(servers)
    if servers:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.stop(), servers))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Consul agents and one server per test, all started together, stopped at the end."""
    root = tmp_path_factory.mktemp("models")
    logs = tmp_path_factory.mktemp("logs")
    models.make_linear(root / "linear")
    # Warm-up keeps /readyz at 503 for 6 s: wide enough to be sampled on a loaded CI machine.
    models.make_slow(root / "slowstart", seconds=6)
    models.make_slow(root / "wedge", seconds=8)
    models.make_slow(root / "busy", seconds=0.5)
    (root / "busy-batching.txt").write_text(OVERLOAD_BATCHING)
    consul, late, restarted = (
        new_agent(tmp_path_factory.mktemp(f"consul-{role}"))
        for role in ("shared", "late", "restarted")
    )
    servers: dict[str, TwistdServer] = {}
    try:
        consul.start()
        restarted.start()
        linear = root / "linear"
        servers = {
            # A drain delay wide enough for Consul to drop it and /healthz to be asked
            # within it on a loaded machine (the last --drain_delay given counts).
            "sigterm": TwistdServer(server_args("linear", linear, consul, "--drain_delay=6"), logs),
            # Below Consul's one-minute minimum, so the agent logs that it got the setting.
            "sigkill": TwistdServer(
                server_args("linear", linear, consul, "--deregister_critical_after=30"), logs
            ),
            "late": TwistdServer(server_args("linear", linear, late), logs),
            "restarted": TwistdServer(server_args("linear", linear, restarted), logs),
            "wedge": TwistdServer(
                server_args("wedge", root / "wedge", consul, "--inference_stall_seconds=2"), logs
            ),
            "busy": TwistdServer(
                server_args(
                    "busy",
                    root / "busy",
                    consul,
                    "--enable_batching",
                    f"--batching_parameters_file={root / 'busy-batching.txt'}",
                    "--overload_fraction=0.5",
                ),
                logs,
            ),
        }
        for server in servers.values():
            server.start()
        yield Fleet(root, logs, consul, late, restarted, servers)
    finally:
        stop_all(servers.values())
        for agent in (consul, late, restarted):
            agent.stop(kill=True)


# --- registration ---------------------------------------------------------------------------


def test_registers_exactly_as_specified_once_the_model_is_loaded(fleet: Fleet) -> None:
    """Absent from ?passing while /readyz says 503, then registered with its tags, meta and two checks."""
    agent = fleet.consul
    server = TwistdServer(
        server_args("slowstart", fleet.models / "slowstart", agent), fleet.logs
    ).start()
    try:
        sid = service_id(server)
        loading_samples = 0
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            assert server.process is not None and server.process.poll() is None, server.log()
            # Consul first, then /readyz: a 503 read afterwards means not loaded at the first read.
            in_passing, registered = sid in passing_ids(agent), sid in agent_services(agent)
            try:
                ready = server.get("/readyz")[0]
            except OSError:  # not listening yet
                ready = None
            if ready == 200:
                break
            assert not in_passing, f"in ?passing while /readyz is {ready}"
            assert not registered, f"registered while /readyz is {ready}"
            loading_samples += ready == 503
            time.sleep(0.05)
        assert loading_samples > 0, "never saw /readyz at 503 while the model loaded"

        assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids), server.log()
        held = agent_services(agent)[sid]
        assert held["Service"] == "inference"
        assert held["ID"] == sid
        assert (held["Address"], held["Port"]) == ("127.0.0.1", server.port)
        assert held["Tags"] == [
            "api:tfserving-rest",
            "api:v2",
            "api:tfserving-grpc",
            "api:v2-grpc",
            "model:slowstart",
            "model:slowstart:1",
        ]
        assert held["Meta"] == {
            "api": "tfserving-rest",
            "models": "slowstart:1",
            "grpc_port": str(server.grpc_port),
        }

        checks = {k: c for k, c in agent_checks(agent).items() if c["ServiceID"] == sid}
        readiness, liveness = f"service:{sid}:readiness", f"service:{sid}:liveness"
        assert set(checks) == {readiness, liveness}
        assert checks[readiness]["Type"] == "http"
        assert f"HTTP GET http://127.0.0.1:{server.port}/readyz: 200" in checks[readiness]["Output"]
        assert checks[liveness]["Type"] == "ttl"
        assert checks[liveness]["Output"] == "inference threads alive"
        assert {c["Status"] for c in checks.values()} == {"passing"}

        _, _, entries = agent.get("/v1/health/service/inference?passing&tag=model:slowstart:1")
        assert [e["Service"]["ID"] for e in entries] == [sid]
    finally:
        server.stop()


# --- stopping and dying ---------------------------------------------------------------------


def test_sigterm_leaves_consul_before_the_port_closes(fleet: Fleet) -> None:
    """On SIGTERM the instance leaves Consul while /healthz still answers, then twistd shuts down cleanly."""
    agent, server = fleet.consul, fleet.servers["sigterm"]
    sid = wait_passing(agent, server)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    assert sid not in poll(lambda: passing_ids(agent), lambda ids: sid not in ids), server.log()
    assert server.get("/healthz") == (200, {"status": "alive"})  # still within the drain delay
    assert sid not in agent_services(agent)  # deregistered, not merely critical
    # twistd stops the services in order, then re-raises the signal that stopped it
    # (twisted.application.app._exitWithSignal): a clean stop shows as "killed by SIGTERM".
    assert server.process.wait(DEADLINE) == -signal.SIGTERM
    log = server.log()
    assert "Server Shut Down." in log
    assert "Traceback" not in log
    deregistered = log.index(f"Deregistered {sid} from Consul")
    assert (
        deregistered
        < log.index("Waiting 6 s for clients")
        < log.index(f"Port {server.port} Closed")
    )


def test_sigkill_turns_the_instance_critical(fleet: Fleet) -> None:
    """A SIGKILLed instance turns critical (out of ?passing) and carries DeregisterCriticalServiceAfter."""
    agent, server = fleet.consul, fleet.servers["sigkill"]
    sid = wait_passing(agent, server)
    assert server.process is not None
    killed = time.monotonic()
    server.process.kill()
    assert sid not in poll(lambda: passing_ids(agent), lambda ids: sid not in ids)
    gone = time.monotonic() - killed
    print(
        f"\n[figure] SIGKILL -> gone from ?passing: {gone:.2f} s "
        "(--consul_check_interval=1 --consul_ttl=3)"
    )
    check_ids = [f"service:{sid}:readiness", f"service:{sid}:liveness"]
    checks = poll(
        lambda: agent_checks(agent),
        lambda c: all(c.get(i, {}).get("Status") == "critical" for i in check_ids),
    )
    assert [checks[i]["Status"] for i in check_ids] == ["critical", "critical"]
    assert sid in all_ids(agent)  # still registered: the agent drops it only later
    # Consul 1.8 logs a below-minimum DeregisterCriticalServiceAfter (ours: 30 s) per check.
    wanted = [f"check has deregister interval below minimum: check={i}" for i in check_ids]
    log = poll(agent.log_text, lambda text: all(w in text for w in wanted))
    assert all(w in log for w in wanted)


# --- Consul coming and going ----------------------------------------------------------------


def test_registers_once_consul_comes_up(fleet: Fleet) -> None:
    """With no agent yet the server serves, warns once about Consul, and registers when the agent starts."""
    agent, server = fleet.late_consul, fleet.servers["late"]
    server.wait_ready(STARTUP)
    assert predict(server, "linear") == (200, {"predictions": LINEAR_Y})
    attempts = poll(
        lambda: log_lines(server, "discovery.registration", "Cannot register"),
        lambda lines: len(lines) >= 3,
    )
    assert len(attempts) >= 3, server.log()  # kept retrying...
    warnings = log_lines(server, "#warn]", "Consul")
    assert len(warnings) == 1, warnings  # ...with one warning
    assert agent.http_addr in warnings[0]
    agent.start()
    sid = service_id(server)
    assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids), server.log()
    assert len(log_lines(server, "#warn]", "Consul")) == 1
    assert len(log_lines(server, "#info]", f"Registered {sid} ")) == 1
    assert "failed attempts" in log_lines(server, "#info]", f"Registered {sid} ")[0]


def test_reregisters_after_consul_restarts(fleet: Fleet) -> None:
    """An agent restarted empty gets the instance back, passing, with the same definition."""
    agent, server = fleet.restarted_consul, fleet.servers["restarted"]
    sid = wait_passing(agent, server)
    before = agent_services(agent)[sid]
    started = time.monotonic()
    agent.restart()
    up = time.monotonic()
    assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids), server.log()
    done = time.monotonic()
    print(
        f"\n[figure] Consul restart -> back in ?passing: {done - started:.2f} s from the restart, "
        f"{done - up:.2f} s after the new agent had a leader "
        "(--consul_check_interval=1 --consul_ttl=3, heartbeat every 1 s)"
    )
    after = agent_services(agent)[sid]
    fields = ("Service", "Address", "Port", "Tags", "Meta")
    assert {f: after[f] for f in fields} == {f: before[f] for f in fields}


# --- liveness and load ----------------------------------------------------------------------


def test_wedged_inference_thread_fails_liveness(fleet: Fleet) -> None:
    """A batch running past --inference_stall_seconds turns the TTL check critical and /healthz 503;
    both recover after."""
    agent, server = fleet.consul, fleet.servers["wedge"]
    sid = wait_passing(agent, server)
    liveness = f"service:{sid}:liveness"
    answer: list[tuple[int, Any]] = []
    worker = threading.Thread(target=lambda: answer.append(predict(server, "wedge")))
    worker.start()
    try:
        checks = poll(
            lambda: agent_checks(agent),
            lambda c: c.get(liveness, {}).get("Status") == "critical",
        )
        assert checks[liveness]["Status"] == "critical", checks.get(liveness)
        assert checks[liveness]["Output"] == "inference threads not alive"
        assert worker.is_alive()  # the 8 s call is what wedges the thread
        status, body = server.get("/healthz")
        assert status == 503 and "inference thread is stuck" in body["error"]
        assert sid not in poll(lambda: passing_ids(agent), lambda ids: sid not in ids)
    finally:
        worker.join(DEADLINE)
    assert answer == [(200, {"predictions": X})]
    assert server.get("/healthz") == (200, {"status": "alive"})
    assert poll(lambda: check_status(agent, liveness), lambda s: s == "passing") == "passing"
    assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids)


def test_overload_turns_readiness_warning_and_leaves_passing(fleet: Fleet) -> None:
    """A queue fuller than --overload_fraction makes /readyz 429: warning, out of ?passing, back after."""
    agent, server = fleet.consul, fleet.servers["busy"]
    sid = wait_passing(agent, server)
    readiness = f"service:{sid}:readiness"
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []
    body = b'{"instances": [[1.0, 2.0, 3.0]]}'

    def load() -> None:
        """Keep posting until told to stop (or the deadline): 1 runs, 4 wait, the rest are refused."""
        until = time.monotonic() + 2 * DEADLINE
        while not stop.is_set() and time.monotonic() < until:
            status, headers, _ = server.request(
                "POST", "/v1/models/busy:predict", body, {"content-type": "application/json"}
            )
            retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
            answers.append((status, retry_after))
            if status != 200:
                time.sleep(0.05)  # refused at once: do not spin

    workers = [threading.Thread(target=load) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        checks = poll(
            lambda: agent_checks(agent),
            lambda c: c.get(readiness, {}).get("Status") == "warning",
        )
        assert checks[readiness]["Status"] == "warning", checks.get(readiness)
        assert "429" in checks[readiness]["Output"]
        assert sid not in poll(lambda: passing_ids(agent), lambda ids: sid not in ids)
        assert sid in all_ids(agent)  # still registered, only left out of ?passing
    finally:
        stop.set()
        for worker in workers:
            worker.join(DEADLINE)
    assert poll(lambda: check_status(agent, readiness), lambda s: s == "passing") == "passing"
    assert sid in poll(lambda: passing_ids(agent), lambda ids: sid in ids)
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 503}, statuses
    assert 200 in statuses
    refused = [retry_after for status, retry_after in answers if status == 503]
    assert refused, "no request was refused"
    assert all(retry_after == "1" for retry_after in refused), set(refused)
