"""The client over the Open Inference Protocol against the real thing: a Consul dev agent, two
``twistd`` servers registered in it (tags ``api:v2`` …) and a third outside it, each serving
``linear`` (``make_linear``), ``dtypes`` (``make_all_dtypes``: an input of every dtype,
echoed) and ``strings`` (``make_strings``).

Which protocol carried each call is read from the servers' own ``/metrics`` (route
``v2_infer`` or ``predict``). Nothing here asserts a duration.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import crochet
import numpy as np
import pytest
from twisted.internet import defer

from client import AsyncInferenceClient, InferenceClient, InvalidRequest
from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.twistd import TwistdServer
from tests import models
from tests.test_client_integration import (
    PATIENCE,
    Load,
    Recorder,
    X,
    Y,
    cli,
    in_reactor,
    poll,
    predict_200s,
    reactor,
)
from wire.consul_tags import API_TAG, model_tag

pytestmark = pytest.mark.integration

MODELS = ("linear", "dtypes", "strings")
T = TypeVar("T")


class Servers:
    """The Consul agent, the servers registered in it, and one server outside it."""

    def __init__(self, consul: ConsulAgent, registered: list[TwistdServer], other: TwistdServer):
        self.consul = consul
        self.registered = registered
        self.other = other

    def passing_ports(self) -> set[int]:
        try:
            status, _, entries = self.consul.get("/v1/health/service/inference?passing")
        except OSError:
            return set()
        return {e["Service"]["Port"] for e in entries} if status == 200 else set()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    if not CONSUL_BINARY.exists():
        pytest.skip(f"no consul binary at {CONSUL_BINARY}: run scripts/bootstrap")
    crochet.setup()
    root = tmp_path_factory.mktemp("client-v2-models")
    models.make_linear(root / "linear")
    models.make_all_dtypes(root / "dtypes")
    models.make_strings(root / "strings")
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        + "".join(
            f"  config {{ name: '{name}' base_path: '{root / name}' model_platform: 'tensorflow' }}\n"
            for name in MODELS
        )
        + "}\n"
    )
    logs = tmp_path_factory.mktemp("client-v2-logs")
    consul = ConsulAgent(CONSUL_BINARY, tmp_path_factory.mktemp("client-v2-consul"))
    flags = [f"--model_config_file={config}", "--enable_batching"]
    in_consul = [
        *flags,
        f"--consul={consul.http_addr}",
        "--consul_check_interval=1",
        "--drain_delay=1",
    ]
    started: list[TwistdServer] = []
    try:
        consul.start()
        registered = [TwistdServer(in_consul, logs).start() for _ in range(2)]
        other = TwistdServer(flags, logs).start()
        started = [*registered, other]
        for server in started:
            server.wait_ready(PATIENCE)
        fleet = Servers(consul, registered, other)
        ports = {s.port for s in registered}
        poll("both servers passing in Consul", lambda: fleet.passing_ports() == ports)
        yield fleet
    finally:
        for server in started:
            server.stop()
        consul.stop(kill=True)


def counts(servers: list[TwistdServer], route: str) -> dict[int, float]:
    """Each server's own count of ``route`` requests answered 200, by port."""
    return {s.port: predict_200s(s, (route,)) for s in servers}


def expect(what: str, read: Callable[[], T], expected: T) -> None:
    """A server counts a request once its answer is written, a moment after the client has
    it: poll until ``read()`` is ``expected``, and fail with the last value read."""
    deadline = time.monotonic() + 30.0
    while (got := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got == expected, (what, got, expected)


def after(start: dict[int, float], now: dict[int, float]) -> dict[int, float]:
    return {port: now[port] - start[port] for port in start}


def total(
    servers: Servers | list[TwistdServer], route: str, start: dict[int, float]
) -> Callable[[], float]:
    """How many ``route`` calls the (registered) servers answered since ``start``."""
    listed = servers.registered if isinstance(servers, Servers) else servers
    return lambda: sum(after(start, counts(listed, route)).values())


def every_dtype() -> dict[str, np.ndarray]:
    """An array per input of ``dtypes``, with the extremes of each dtype and NaN, -0.0, and
    bytes that are not text."""
    arrays: dict[str, np.ndarray] = {}
    for name in models.ALL_DTYPES:
        if name == "string":
            array = np.array([[b"", b"\x00\xff"], ["é".encode(), b"a" * 300]], dtype=object)
        elif name == "bool":
            array = np.array([[True, False], [False, True]])
        elif np.dtype(name).kind == "f":
            info = np.finfo(name)
            array = np.array([[np.nan, -0.0], [info.max, info.tiny]], dtype=name)
        else:
            info = np.iinfo(name)
            array = np.array([[info.min, info.max], [0, 1]], dtype=name)
        arrays[f"in_{name}"] = array
    return arrays


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return a.tolist() == b.tolist()
    return a.tobytes() == b.tobytes()


def test_every_dtype_round_trips_exactly_over_v2_through_consul(servers: Servers) -> None:
    """protocol="v2" with the blocking client: an input of every dtype (extremes, NaN,
    -0.0, non-text bytes) comes back from the real model with the same dtype, shape and bytes,
    every call over v2 (none as REST); a refused input is an InvalidRequest naming v2
    datatypes."""
    arrays = every_dtype()
    v2_before = counts(servers.registered, "v2_infer")
    rest_before = counts(servers.registered, "predict")
    with InferenceClient(consul=servers.consul.http_addr, protocol="v2", timeout=60) as client:
        for _ in range(8):
            outputs = client.predict("dtypes", arrays)
            for name, array in arrays.items():
                got = outputs["out_" + name.removeprefix("in_")]
                assert same(got, array), (name, got, array)
        ints = {**arrays, "in_int32": np.array([[1.5, 2.5], [0.0, 1.0]])}
        with pytest.raises(InvalidRequest) as refused:
            client.predict("dtypes", ints)
        assert refused.value.status == 400
        assert refused.value.server_message == (
            "input 'in_int32': expects INT32 but FP64 was provided"
        )
        lengths = client.predict("strings", ["abc", b"\x00\xff", ""])
        assert lengths["length"].dtype == np.int32 and lengths["length"].tolist() == [3, 2, 0]
        assert lengths["upper_bytes"].tolist() == [b"ABC", b"\x00\xff", b""]
    expect("v2 calls answered", total(servers, "v2_infer", v2_before), 9)
    assert counts(servers.registered, "predict") == rest_before


def test_v2_with_a_static_list_and_its_signature_from_v2_metadata(servers: Servers) -> None:
    """protocol="v2" with static backends: v2 to each listed server (no Consul, no tags),
    the signature read from GET /v2/models/NAME, float64 cast to the model's FP32."""
    server = servers.other
    before = counts([server], "v2_infer")
    with InferenceClient(backends=[("127.0.0.1", server.port)], protocol="v2") as client:
        y = client.predict("linear", [[1.0, 1.0, 1.0]])
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, Y)
        with pytest.raises(InvalidRequest) as refused:
            client.predict("nosuch", X)
        assert refused.value.status == 404
    expect("one v2 call", lambda: after(before, counts([server], "v2_infer")), {server.port: 1})


def test_auto_speaks_v2_to_servers_tagged_api_v2_and_rest_to_one_without(
    servers: Servers,
) -> None:
    """protocol="auto" (the default) over a Consul listing of the two registered servers
    (tagged api:v2) and the third, registered by hand without api:v2: the third answers
    every call it gets over TF Serving's REST JSON, the others over v2, all correctly."""
    other = servers.other
    entry = {
        "ID": "inference-rest-only",
        "Name": "inference",
        "Address": "127.0.0.1",
        "Port": other.port,
        "Tags": [API_TAG, model_tag("linear"), model_tag("linear", 1)],
    }
    assert servers.consul.put("/v1/agent/service/register", entry) == 200
    everyone = {s.port for s in [*servers.registered, other]}
    try:
        poll("three servers passing in Consul", lambda: servers.passing_ports() == everyone)
        everything = [*servers.registered, other]
        rest_before, v2_before = counts(everything, "predict"), counts(everything, "v2_infer")
        metadata_before = counts(everything, "metadata")
        recorder = Recorder()
        client = in_reactor(
            lambda: AsyncInferenceClient(
                servers.consul.http_addr, reactor=reactor(), on_attempt=recorder
            )
        )
        try:
            assert client.protocol == "auto"
            answers = in_reactor(
                lambda: defer.gatherResults([client.predict("linear", X) for _ in range(60)])
            )
        finally:
            in_reactor(client.close)
    finally:
        servers.consul.put("/v1/agent/service/deregister/inference-rest-only")
    for y in answers:
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, Y)
    # Every attempt answered, by port: the 60 predicts and the one signature lookup (REST
    # /metadata), which went to one of the three.
    ok = recorder.by_port()
    assert set(ok) == everyone and sum(ok.values()) == 61, ok  # every server got calls
    expect("the signature looked up once", total(everything, "metadata", metadata_before), 1)
    lookups = after(metadata_before, counts(everything, "metadata"))
    predicts = {port: ok[port] - lookups[port] for port in everyone}
    expect(
        "REST calls only to the server without api:v2",
        lambda: after(rest_before, counts(everything, "predict")),
        {port: predicts[port] if port == other.port else 0 for port in everyone},
    )
    expect(
        "v2 calls only to the servers tagged api:v2",
        lambda: after(v2_before, counts(everything, "v2_infer")),
        {port: 0 if port == other.port else predicts[port] for port in everyone},
    )


def test_cli_predicts_over_each_protocol(servers: Servers) -> None:
    """inference-client predict --protocol v2, auto, rest and grpc print the same TF Serving
    answer; v2 and auto reach the servers over v2, rest sends the body as is."""
    addr = servers.consul.http_addr
    body = json.dumps({"instances": [[1, 1, 1]]})
    for protocol, route in (("v2", "v2_infer"), ("auto", "v2_infer"), ("rest", "predict")):
        before = counts(servers.registered, route)
        done = cli("--consul", addr, "predict", "linear", "--json", body, "--protocol", protocol)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"predictions": [[9.5, 11.5]]}, protocol
        expect(f"a {route} call for --protocol {protocol}", total(servers, route, before), 1)
    over_grpc = cli("--consul", addr, "--protocol", "grpc", "predict", "linear", "--json", body)
    assert over_grpc.returncode == 0, over_grpc.stderr
    assert json.loads(over_grpc.stdout) == {"predictions": [[9.5, 11.5]]}
    columns = json.dumps({"inputs": {"text": ["ab", "c"]}})
    done = cli("--consul", addr, "predict", "strings", "--json", columns, "--protocol", "v2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"outputs": {"length": [2, 1], "upper_bytes": ["AB", "C"]}}
    wrong = cli("--consul", addr, "predict", "linear", "--json", '{"inputs": [[1, 2]]}')
    assert wrong.returncode == 1 and "InvalidRequest" in wrong.stderr


def test_a_server_stopping_mid_run_moves_v2_calls_to_the_other(servers: Servers) -> None:
    """SIGKILL one of the two servers under v2 load: no call fails -- the calls it was
    answering move to the other server within the retry budget (none refused by it) -- and
    after its first failure the dead server gets no more than a few probes."""
    recorder = Recorder()
    client = in_reactor(
        lambda: AsyncInferenceClient(
            servers.consul.http_addr, reactor=reactor(), on_attempt=recorder, protocol="v2"
        )
    )
    victim, survivor = servers.registered
    try:
        load = Load(client, concurrency=16)
        running = load.run(calls=1_000_000)  # an upper bound; stopped below
        try:
            poll("calls flowing to both servers", lambda: len(recorder.by_port()) == 2)
            time.sleep(1.0)
            killed_at = time.time()
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            poll(
                "calls answered after the kill",
                lambda: (
                    sum(
                        1
                        for a in list(recorder.attempts)
                        if a.outcome == "ok" and a.sent_at > killed_at
                    )
                    >= 200
                ),
            )
        finally:
            in_reactor(load.stop)
            running.wait(180)
        stats = client.stats
    finally:
        in_reactor(client.close)
        victim.stop()
        servers.registered.remove(victim)  # it is gone; the fixture stops what is left
    assert load.failures == [], f"{len(load.failures)} failed calls, first: {load.failures[0]}"
    assert stats.budget_refusals == 0 and stats.retries > 0
    to_victim = [a for a in recorder.attempts if a.backend.port == victim.port]
    failed = [a for a in to_victim if a.outcome != "ok" and a.finished_at >= killed_at]
    assert failed, "no attempt to the killed server failed: was it killed mid-run?"
    first_failure = min(a.finished_at for a in failed)
    after = [a for a in to_victim if a.sent_at > first_failure]
    assert len(after) <= 3, [(a.sent_at - killed_at, a.outcome) for a in after]
    after_kill = [a for a in recorder.attempts if a.sent_at > first_failure and a.outcome == "ok"]
    assert after_kill and all(a.backend.port == survivor.port for a in after_kill)
    print(
        f"\nSIGKILL under v2 load: {load.ok} calls ok, 0 failed; {stats.retries} retries; "
        f"{len(after)} probes of the dead server after its first failure"
    )
