"""The client against the real thing: a Consul dev agent and three ``twistd`` servers of
``make_linear``, registered as they are in production.

Load runs through ``AsyncInferenceClient`` on crochet's reactor thread while the test
thread kills servers or restarts Consul. Nothing here asserts a duration: deadlines are
generous polls, and times are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crochet
import numpy as np
import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred

from client import AsyncInferenceClient, Attempt, InferenceClient, InferenceError, InvalidRequest
from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.ports import free_port
from harness.twistd import REPO, TwistdServer
from tests import models

pytestmark = pytest.mark.integration

X = np.ones((1, 3), np.float32)
Y = np.array([[9.5, 11.5]], np.float32)  # make_linear's answer to X
DIGITS = REPO / "models" / "digits"
PATIENCE = 90.0  # seconds to wait for servers and Consul on a busy machine


def reactor() -> Any:
    from twisted.internet import reactor as the_reactor

    return the_reactor


def in_reactor(fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
    """Run ``fn`` on the reactor thread and wait for its result (a Deferred is waited for)."""
    return crochet.run_in_reactor(fn)(*args).wait(timeout)


def poll(what: str, check: Callable[[], bool], timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s for {what}")
        time.sleep(0.2)


class Fleet:
    """The Consul agent and the servers of model "linear" registered in it."""

    def __init__(self, consul: ConsulAgent, model_dir: Path, logs: Path) -> None:
        self.consul = consul
        self.model_dir = model_dir
        self.logs = logs
        self.servers: list[TwistdServer] = []

    def flags(self, model_dir: Path) -> list[str]:
        return [
            "--model_name=linear",
            f"--model_base_path={model_dir}",
            f"--consul={self.consul.http_addr}",
            "--consul_check_interval=1",
            "--drain_delay=1",
        ]

    def start(self, count: int = 1, model_dir: Path | None = None) -> list[TwistdServer]:
        started = [
            TwistdServer(self.flags(model_dir or self.model_dir), self.logs).start()
            for _ in range(count)
        ]
        self.servers += started
        return started

    def remove(self, server: TwistdServer, sig: int) -> None:
        server.stop(sig)
        self.servers.remove(server)

    def passing_ports(self) -> set[int]:
        try:
            status, _, entries = self.consul.get("/v1/health/service/inference?passing")
        except OSError:
            return set()
        return {e["Service"]["Port"] for e in entries} if status == 200 else set()

    def settle(self, count: int = 3) -> list[TwistdServer]:
        """Start servers up to ``count``, then wait until each is ready and passing in Consul."""
        if len(self.servers) < count:
            self.start(count - len(self.servers))
        for server in self.servers:
            server.wait_ready(PATIENCE)
        ports = {s.port for s in self.servers}
        poll("every server passing in Consul", lambda: self.passing_ports() == ports)
        return list(self.servers)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A Consul dev agent and three make_linear servers registered in it."""
    if not CONSUL_BINARY.exists():
        pytest.skip(f"no consul binary at {CONSUL_BINARY}: run scripts/bootstrap")
    crochet.setup()
    root = tmp_path_factory.mktemp("client-models")
    models.make_linear(root / "linear")
    models.make_slow(root / "slow", seconds=0.1)
    consul = ConsulAgent(CONSUL_BINARY, tmp_path_factory.mktemp("client-consul"))
    fleet = Fleet(consul, root / "linear", tmp_path_factory.mktemp("client-logs"))
    try:
        consul.start()
        fleet.start(3)
        fleet.settle()
        yield fleet
    finally:
        fleet.stop()
        consul.stop(kill=True)


class Recorder:
    """Every attempt the client reports (appended on the reactor thread)."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def __call__(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    def by_port(self, outcome: str = "ok") -> Counter[int]:
        return Counter(a.backend.port for a in self.attempts if a.outcome == outcome)


def make_client(fleet: Fleet, recorder: Recorder | None = None, **options: Any) -> Any:
    return in_reactor(
        lambda: AsyncInferenceClient(
            fleet.consul.http_addr, reactor=reactor(), on_attempt=recorder, **options
        )
    )


class Load:
    """Calls predict from ``concurrency`` workers on the reactor thread until stopped."""

    def __init__(
        self,
        client: AsyncInferenceClient,
        concurrency: int,
        check: bool = True,
        timeout: float = 15.0,
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.check = check
        self.timeout = timeout
        self.ok = 0
        self.failures: list[BaseException] = []
        self._budget: int | None = None
        self._stop_at: float | None = None

    def run(self, *, calls: int | None = None, seconds: float | None = None) -> Any:
        """Start; returns crochet's EventualResult, fired when every worker is done."""
        self._budget = calls
        self._stop_at = None if seconds is None else time.time() + seconds
        return crochet.run_in_reactor(self._all)()

    def _all(self) -> Deferred[Any]:
        workers = [Deferred.fromCoroutine(self._worker()) for _ in range(self.concurrency)]
        return defer.gatherResults(workers)

    def stop(self) -> None:
        """Start no more calls; each worker ends after its call in flight (reactor thread)."""
        self._budget = 0
        self._stop_at = None

    def _more(self) -> bool:
        if self._budget is not None:
            self._budget -= 1
            return self._budget >= 0
        return self._stop_at is not None and time.time() < self._stop_at

    async def _worker(self) -> None:
        while self._more():
            try:
                y = await self.client.predict("linear", X, timeout=self.timeout)
            except InferenceError as e:
                self.failures.append(e)
                continue
            if self.check and not np.array_equal(y, Y):
                self.failures.append(AssertionError(f"wrong answer {y!r}"))
            else:
                self.ok += 1


def predict_200s(server: TwistdServer, routes: tuple[str, ...] = ("predict", "v2_infer")) -> float:
    """The server's own count of inference requests answered 200: TF Serving's ``:predict``
    and the Open Inference Protocol's ``infer`` (the client's default protocol, ``auto``,
    sends v2 to these servers, which announce ``api:v2``)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("kleinserve_requests_total{") and 'code="200"' in line:
            if any(f'route="{route}"' in line for route in routes):
                total += float(line.rsplit(None, 1)[1])
    return total


# --- the blocking face and the command line --------------------------------------------------------


def test_blocking_client_predicts_through_consul(fleet: Fleet) -> None:
    """InferenceClient finds the servers in Consul and answers with float32 numpy arrays;
    its options (attempt_timeout) reach the async core."""
    fleet.settle()
    with InferenceClient(consul=fleet.consul.http_addr, timeout=30, attempt_timeout=12) as client:
        assert client.async_client.attempt_timeout == 12
        y = client.predict("linear", [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, np.array([[9.5, 11.5], [1.5, 1.5]], np.float32))
        assert client.status("linear")["model_version_status"][0]["state"] == "AVAILABLE"
        ports = {info.backend.port for info in client.backends("linear")}
        assert ports == {s.port for s in fleet.servers}
        with pytest.raises(InvalidRequest) as raised:
            client.predict("linear", [[1.0, 2.0]])
        assert raised.value.status == 400


def test_grpc_protocol_reaches_each_server_on_the_grpc_port_consul_announces(
    fleet: Fleet,
) -> None:
    """protocol="grpc": the same balancing over Consul's servers, each on its grpc_port meta;
    float32 arrays in and out; a refused call is an InvalidRequest with the server's words."""
    fleet.settle()
    recorder = Recorder()
    client = make_client(fleet, recorder, protocol="grpc")
    try:
        answers = in_reactor(
            lambda: defer.gatherResults([client.predict("linear", X) for _ in range(30)])
        )
        for y in answers:
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, Y)
        grpc_ports = {s.grpc_port for s in fleet.servers}
        assert set(recorder.by_port()) == grpc_ports  # every server, and only on gRPC
        status = in_reactor(lambda: client.status("linear"))  # REST, on the REST ports
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        with pytest.raises(InvalidRequest) as raised:
            in_reactor(lambda: client.predict("linear", np.ones((1, 4), np.float32)))
        assert raised.value.status == 400
        assert "INVALID_ARGUMENT" in raised.value.server_message
        assert "dimension 1" in raised.value.server_message
    finally:
        in_reactor(client.close)


def test_grpc_protocol_with_static_backends_sends_around_one_that_is_down(fleet: Fleet) -> None:
    """A static list names gRPC ports; a port nobody listens on is never sent to twice in a
    row, and no call fails (the blocking client, as a script would use it)."""
    fleet.settle()
    dead = ("127.0.0.1", free_port())
    live = ("127.0.0.1", fleet.servers[0].grpc_port)
    with InferenceClient(backends=[dead, live], protocol="grpc", timeout=30) as client:
        for _ in range(10):
            np.testing.assert_array_equal(client.predict("linear", [[1.0, 1.0, 1.0]]), Y)
        with pytest.raises(InvalidRequest) as raised:
            client.predict("nope", X)
        assert raised.value.status == 404


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "client.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_lists_backends_and_predicts(fleet: Fleet) -> None:
    """inference-client backends shows every server; predict --json prints the answer."""
    fleet.settle()
    listed = cli("--consul", fleet.consul.http_addr, "backends", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {int(r["address"].rsplit(":", 1)[1]) for r in rows} == {s.port for s in fleet.servers}
    assert all(r["models"] == ["linear:1"] for r in rows)
    body = json.dumps({"instances": [[1, 1, 1]]})
    answer = cli("predict", "linear", "--json", body, "--consul", fleet.consul.http_addr)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"predictions": [[9.5, 11.5]]}
    wrong = cli("--backend", f"127.0.0.1:{fleet.servers[0].port}", "status", "nosuch")
    assert wrong.returncode == 1 and "InvalidRequest" in wrong.stderr


@pytest.fixture(scope="module")
def digits(fleet: Fleet) -> Iterator[TwistdServer]:
    """A server of the demo digits model (models/digits), outside Consul, for image uploads."""
    if not (DIGITS / "1" / "saved_model.pb").exists() or not (REPO / "samples").is_dir():
        pytest.skip("no demo model in models/digits: run scripts/export-demo-model")
    server = TwistdServer(
        ["--model_name=digits", f"--model_base_path={DIGITS}"], fleet.logs
    ).start()
    try:
        server.wait_ready(PATIENCE)
        status, answer = server.post_json("/v1/models/digits:classify_image", {})
        if status == 404 or (status == 400 and "supports :predict" in str(answer)):
            pytest.skip(f"the server has no :classify_image route (answers {status})")
        yield server
    finally:
        server.stop()


def test_classify_image_reads_a_sample_digit(digits: TwistdServer) -> None:
    """classify_image uploads samples/seven.png and gets "7" first; several files at once too."""
    samples = REPO / "samples"
    with InferenceClient(backends=[("127.0.0.1", digits.port)]) as client:
        top = client.classify_image("digits", samples / "seven.png", top_k=3)
        assert [len(top), top[0].label] == [3, "7"]
        assert top[0].score >= top[1].score >= top[2].score
        several = client.classify_images("digits", [samples / "one.png", samples / "two.png"])
        assert [ranked[0].label for ranked in several] == ["1", "2"]
        with pytest.raises(InvalidRequest) as raised:
            client.classify_image("digits", b"not an image")
        assert raised.value.status == 415


def test_classify_cli_reports_every_file_and_a_summary(
    digits: TwistdServer, tmp_path: Path
) -> None:
    """classify over files and a folder writes one result per file and summarizes failures."""
    (tmp_path / "more").mkdir()
    for name, sample in (("a.png", "seven.png"), ("more/b.png", "three.png")):
        (tmp_path / name).write_bytes((REPO / "samples" / sample).read_bytes())
    (tmp_path / "more" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "results.csv"
    done = cli(
        "classify",
        "--model",
        "digits",
        str(tmp_path / "a.png"),
        str(tmp_path / "more"),
        "--out",
        str(out),
        "--backend",
        f"127.0.0.1:{digits.port}",
    )
    assert done.returncode == 1, done.stderr  # one file failed
    rows = {(Path(row[0]).name, row[1]): row for row in csv.reader(out.open())}
    assert rows["a.png", "1"][2] == "7" and rows["b.png", "1"][2] == "3"
    assert "415" in rows["broken.png", ""][4]
    assert "classified 2 of 3 files" in done.stderr and "InvalidRequest: 1 file(s)" in done.stderr


# --- spreading and failing over ----------------------------------------------------------------------


def test_calls_spread_evenly_over_three_servers(fleet: Fleet) -> None:
    """3,000 concurrent predicts: each server answers between 25% and 42% of them."""
    servers = fleet.settle()
    client = make_client(fleet)
    try:
        before = [predict_200s(s) for s in servers]
        load = Load(client, concurrency=32)
        started = time.monotonic()
        load.run(calls=3000).wait(300)
        elapsed = time.monotonic() - started
        served = [predict_200s(s) - b for s, b in zip(servers, before, strict=True)]
    finally:
        in_reactor(client.close)
    assert load.failures == [] and load.ok == 3000
    shares = [n / sum(served) for n in served]
    print(f"\nspread of 3000 calls: {[f'{s:.1%}' for s in shares]} in {elapsed:.1f} s")
    assert sum(served) == 3000
    assert all(0.25 <= share <= 0.42 for share in shares), shares


def failover(fleet: Fleet, sig: int, seconds: float = 10.0) -> None:
    """Load for ``seconds``; kill one server with ``sig`` a third of the way in."""
    servers = fleet.settle()
    recorder = Recorder()
    client = make_client(fleet, recorder)
    victim = servers[0]
    try:
        load = Load(client, concurrency=32)
        running = load.run(seconds=seconds)
        time.sleep(seconds / 3)
        killed_at = time.time()
        fleet.remove(victim, sig)
        running.wait(seconds + 120)
        stats = client.stats
    finally:
        in_reactor(client.close)
        fleet.start()  # a replacement, so the next test has three servers again
    name = signal.Signals(sig).name
    assert load.failures == [], f"{len(load.failures)} failed calls, first: {load.failures[0]}"
    to_victim = [a for a in recorder.attempts if a.backend.port == victim.port]
    in_flight_at_kill = sum(1 for a in to_victim if a.sent_at < killed_at <= a.finished_at)
    after_kill = [a for a in to_victim if a.sent_at >= killed_at]
    failed = [a for a in to_victim if a.outcome != "ok" and a.finished_at >= killed_at]
    first_failure = min((a.finished_at for a in failed), default=None)
    after_ejection = [a for a in to_victim if first_failure and a.sent_at > first_failure]
    last_sent = max((a.sent_at for a in to_victim), default=killed_at)
    print(
        f"\n{name}: {load.ok} calls ok, 0 failed; {stats.retries} retries; in flight on the "
        f"victim at the kill: {in_flight_at_kill}; attempts sent to it after the kill: "
        f"{len(after_kill)} ({len(after_ejection)} after its first failure); last attempt "
        f"sent {last_sent - killed_at:+.3f} s after the kill"
    )
    # After the first failure ejects it, only probes (one at a time, 1 s, 2 s, 4 s apart)
    # reach the dead server, until Consul drops it from the passing list.
    assert len(after_ejection) <= 3, [(a.sent_at - killed_at, a.outcome) for a in after_ejection]
    assert load.ok > 0 and sum(1 for a in recorder.attempts if a.outcome == "ok") >= load.ok


def test_sigkill_of_a_server_mid_load_fails_no_call(fleet: Fleet) -> None:
    """SIGKILL one of three servers under load: every call still succeeds (retried elsewhere),
    and after its first failure the dead server gets no more than a few probes."""
    failover(fleet, signal.SIGKILL, seconds=30.0)  # the 30 s load


def test_sigterm_of_a_server_mid_load_fails_no_call(fleet: Fleet) -> None:
    """SIGTERM one of three servers under load (it leaves Consul, drains, exits): no failures."""
    failover(fleet, signal.SIGTERM)


@pytest.mark.parametrize("discovery", ["consul", "static"])
def test_sigstop_of_a_server_mid_load_fails_no_call(fleet: Fleet, discovery: str) -> None:
    """SIGSTOP one of three servers under load (connections open, no answers), SIGCONT
    seconds later: no call fails, since hung attempts are cancelled at the attempt timeout
    and retried elsewhere; once ejected, the server gets only probes, one at a time, until
    one succeeds after SIGCONT. (Through Consul, with the default attempt timeout -- a third
    of the 6 s call timeout -- its failing check may also drop the server for a while; with
    a static list and attempt_timeout=2 only the client keeps calls away, and a probe is
    seen to time out before SIGCONT.)"""
    servers = fleet.settle()
    recorder = Recorder()
    if discovery == "consul":
        client = make_client(fleet, recorder)
    else:
        client = in_reactor(
            lambda: AsyncInferenceClient(
                backends=[("127.0.0.1", s.port) for s in servers],
                reactor=reactor(),
                on_attempt=recorder,
                attempt_timeout=2.0,
            )
        )
    victim = servers[0]
    assert victim.process is not None

    def to_victim() -> list[Attempt]:
        return [a for a in list(recorder.attempts) if a.backend.port == victim.port]

    load = Load(client, concurrency=16, timeout=6.0 if discovery == "consul" else 15.0)
    running = load.run(calls=1_000_000)  # an upper bound; stopped below
    try:
        poll("calls flowing", lambda: load.ok >= 200)
        victim.process.send_signal(signal.SIGSTOP)
        try:
            poll("an attempt timing out", lambda: any(a.outcome == "timeout" for a in to_victim()))
            if discovery == "static":
                poll(
                    "a probe timing out",
                    lambda: any(a.probe and a.outcome == "timeout" for a in to_victim()),
                )
            else:
                time.sleep(4.0)  # paused well past the first ejection
        finally:
            victim.process.send_signal(signal.SIGCONT)
        resumed_at = time.time()
        poll(
            "the resumed server answering ordinary calls",
            lambda: any(
                a.outcome == "ok" and not a.probe and a.sent_at > resumed_at for a in to_victim()
            ),
        )
    finally:
        in_reactor(load.stop)
        running.wait(180)
        stats = client.stats
        in_reactor(client.close)
    assert load.failures == [], f"{len(load.failures)} failed calls, first: {load.failures[0]}"
    attempts = to_victim()
    first_timeout = min(a.finished_at for a in attempts if a.outcome == "timeout")
    probes = [a for a in attempts if a.probe]
    recovered_at = min(a.finished_at for a in probes if a.outcome == "ok")
    ordinary = [a for a in attempts if not a.probe and a.sent_at > first_timeout]
    print(
        f"\nSIGSTOP ({discovery}): {load.ok} calls ok, 0 failed; {stats.timeouts} attempts timed out, "
        f"{stats.retries} retries; the paused server got "
        f"{sum(1 for a in attempts if a.sent_at <= first_timeout)} attempts before its first "
        f"timeout, then {len(probes)} probes ({[a.outcome for a in probes]}), recovered "
        f"{recovered_at - resumed_at:+.1f} s after SIGCONT"
    )
    # One probe at a time: no other attempt to the server is in flight while a probe is.
    for p in probes:
        assert all(
            a is p or a.finished_at <= p.sent_at or a.sent_at >= p.finished_at for a in attempts
        ), p
    # Failed probes double the ejection (1, 2, 4 s …) and each waits the 2 s attempt
    # timeout, so a pause of under a minute costs a handful of probes.
    assert 1 <= len(probes) <= 8, [(a.sent_at - first_timeout, a.outcome) for a in probes]
    # Between its first timeout and a successful probe, it gets nothing but probes.
    assert all(a.sent_at >= recovered_at for a in ordinary)


def test_consul_restart_mid_load_fails_no_call(fleet: Fleet) -> None:
    """Consul restarted empty under load: calls go on to the known servers, none fails."""
    fleet.settle()
    client = make_client(fleet)
    try:
        load = Load(client, concurrency=16)
        running = load.run(seconds=10)
        time.sleep(3)
        fleet.consul.restart()
        running.wait(180)
    finally:
        in_reactor(client.close)
    assert load.failures == [] and load.ok > 0
    print(f"\nConsul restarted mid-load: {load.ok} calls ok, 0 failed")
    fleet.settle()  # the servers register again with the new agent


def test_calls_continue_on_known_backends_while_consul_is_down(fleet: Fleet) -> None:
    """Consul stopped: calls keep going to the last known backends, none fails."""
    servers = fleet.settle()
    recorder = Recorder()
    client = make_client(fleet, recorder)
    try:
        in_reactor(lambda: client.predict("linear", X))  # the watch has its snapshot
        fleet.consul.stop()
        load = Load(client, concurrency=8)
        load.run(calls=600).wait(180)
    finally:
        in_reactor(client.close)
        fleet.consul.start()
    assert load.failures == [] and load.ok == 600
    assert set(recorder.by_port()) == {s.port for s in servers}
    fleet.settle()


def test_a_slow_server_gets_less_under_p2c_and_peak_ewma_than_round_robin(fleet: Fleet) -> None:
    """With a 4th server 100 ms slower per call, P2C and Peak-EWMA send it a smaller share
    than round-robin."""
    fleet.settle()
    (slow,) = fleet.start(1, fleet.model_dir.parent / "slow")
    shares = {}
    try:
        fleet.settle(4)
        for balancer in ("round_robin", "p2c", "peak_ewma"):
            recorder = Recorder()
            client = make_client(fleet, recorder, balancer=balancer)
            try:
                load = Load(client, concurrency=16, check=False)
                load.run(calls=600).wait(300)
            finally:
                in_reactor(client.close)
            assert load.failures == [], load.failures[:3]
            counts = recorder.by_port()
            shares[balancer] = counts[slow.port] / sum(counts.values())
    finally:
        fleet.remove(slow, signal.SIGTERM)
    print("\nslow server's share: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    # Round-robin gives it a quarter whatever its speed; P2C less, by how much slower it is
    # than the others, which a busy machine narrows (observed 3% at 100 ms; at 50 ms, 5% to
    # 18%, too near the bound below);
    # Peak-EWMA less still, from the first slow answer on.
    assert shares["p2c"] < 0.85 * shares["round_robin"]
    assert shares["peak_ewma"] < 0.85 * shares["round_robin"]


def test_the_client_never_imports_tensorflow() -> None:
    """Importing the client and its command line loads no TensorFlow."""
    code = "import sys, client, client.cli; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
