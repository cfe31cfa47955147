"""Model lifecycle in a real ``twistd -n inference``: hot swaps, config reloads, failed loads,
labels, memory over load/unload cycles and Consul tags.

Versions are told apart by their answers: ``make_linear`` with scale s answers x = [1, 1, 1]
with [9 s + 0.5, 12 s - 0.5] (exact in float32), so every answer is checked to be exactly one
version's. Load generators (threads looping requests) run across each change and keep every
answer; the assertions are about those answers (none failed, none from a version that should
no longer serve), never about how long anything took. The servers most tests need are started
together by one module fixture, one per test, since each spends seconds importing TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from harness.consul import ConsulAgent
from harness.twistd import REPO, TWISTD, TwistdServer
from harness.twistd import poll as poll_until
from tests import models
from tests.consul_agent import consul_agent  # noqa: F401
from tests.test_frozen_graph_integration import picture
from tests.test_images_integration import upload

pytestmark = pytest.mark.integration

STARTUP = 240.0  # six TensorFlow processes starting at once on a busy 2-core machine
DEADLINE = 60.0  # for any one state change; each takes a second or two when idle
poll = partial(poll_until, timeout=DEADLINE)
X = [[1.0, 1.0, 1.0]]


def linear_y(scale: float) -> list[list[float]]:
    """What ``make_linear(scale=scale)`` answers for X."""
    return [[9 * scale + 0.5, 12 * scale - 0.5]]


V1, V2 = linear_y(1), linear_y(2)


# --- config files ---------------------------------------------------------------------------


def model_entry(
    name: str, base: Path, versions: tuple[int, ...] = (), labels: dict[str, int] | None = None
) -> str:
    """One ``config { … }`` of a ModelServerConfig text proto."""
    lines = [f"name: '{name}'", f"base_path: '{base}'", "model_platform: 'tensorflow'"]
    if versions:
        listed = " ".join(f"versions: {v}" for v in versions)
        lines.append(f"model_version_policy {{ specific {{ {listed} }} }}")
    lines += [f"version_labels {{ key: '{k}' value: {v} }}" for k, v in (labels or {}).items()]
    return "  config {\n" + "".join(f"    {line}\n" for line in lines) + "  }\n"


def write_config(path: Path, *entries: str) -> None:
    """Replace the config file in one step, as an editor or a deploy tool does."""
    staged = path.with_name(path.name + ".new")
    staged.write_text("model_config_list {\n" + "".join(entries) + "}\n")
    os.replace(staged, path)


def sighup(server: TwistdServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGHUP)


# --- readbacks ------------------------------------------------------------------------------


def predict(server: TwistdServer, path: str, instances: Any = X) -> tuple[int, Any]:
    """POST a predict to ``/v1/models/{path}:predict``."""
    return server.post_json(f"/v1/models/{path}:predict", {"instances": instances})


def states(server: TwistdServer, model: str) -> dict[int, str]:
    """version -> state from the status endpoint ({} if the model is unknown)."""
    code, doc = server.get(f"/v1/models/{model}")
    if code != 200:
        return {}
    return {int(v["version"]): v["state"] for v in doc["model_version_status"]}


def version_status(server: TwistdServer, model: str, version: int) -> dict[str, Any]:
    code, doc = server.get(f"/v1/models/{model}/versions/{version}")
    return doc["model_version_status"][0] if code == 200 else {}


def rss_mib(server: TwistdServer) -> float:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def log_lines(server: TwistdServer, marker: str, text: str) -> list[str]:
    """Lines of the server's log carrying ``marker`` (e.g. ``#critical]``) and ``text``."""
    return [line for line in server.log().splitlines() if marker in line and text in line]


# --- load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() just before the request went out
    received: float
    status: int  # 0: no HTTP answer at all (connection refused or reset)
    body: Any


class Load:
    """``threads`` threads sending ``request()`` back to back until the block ends; keeps
    every answer. A request that gets no HTTP answer is kept as status 0."""

    def __init__(self, request: Callable[[], tuple[int, Any]], threads: int) -> None:
        self.answers: list[Answer] = []  # list.append is atomic: threads share it
        self._request = request
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._done.is_set():
            sent = time.monotonic()
            try:
                status, body = self._request()
            except OSError as e:
                status, body = 0, repr(e)
            self.answers.append(Answer(sent, time.monotonic(), status, body))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(90)

    def count(self, until: Callable[[Answer], bool] = lambda a: True) -> int:
        return sum(1 for a in list(self.answers) if until(a))

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]


# --- models and servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every model the tests serve, made once."""
    root = tmp_path_factory.mktemp("lifecycle")
    for version in (1, 2, 3):
        models.make_linear(root / "linear", version=version, scale=version)
    models.make_linear(root / "swap", version=1, scale=1)
    models.make_linear(root / "staging", version=2, scale=2)  # copied into swap/ by a test
    models.make_linear(root / "corrupt", version=1, scale=1)
    for name, scale in (("a", 1), ("b", 3), ("c", 4)):
        models.make_linear(root / name, scale=scale)
    for version in (1, 2):
        models.make_frozen_jpeg_graph(root / "flowers", version=version)
    # 12 MiB of weights: one version left behind per cycle would add 240 MiB (+39%) by cycle 20,
    # while glibc keeping one freed block around now and then moves RSS by only ~2%.
    models.make_wide(root / "wide", units=1024)
    return root


@pytest.fixture(scope="module")
def servers(
    root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TwistdServer]]:
    """One server per test, all started at once; each test waits for its own to be ready."""
    logs = tmp_path_factory.mktemp("logs")
    write_config(root / "reload.conf", model_entry("a", root / "a"), model_entry("b", root / "b"))
    write_config(
        root / "poll.conf",
        model_entry("linear", root / "linear", versions=(1, 2), labels={"stable": 1}),
    )
    # The example, with the paths of this test and make_linear standing in for the
    # digits model, so that each version's answer shows which version gave it.
    write_config(
        root / "labels.conf",
        model_entry("linear", root / "linear", versions=(1, 2), labels={"stable": 1, "canary": 2}),
        model_entry("flowers", root / "flowers", labels={"canary": 2}),
    )
    write_config(root / "cycles.conf", model_entry("keep", root / "a"))
    args = {
        "swap": [
            "--model_name=m",
            f"--model_base_path={root / 'swap'}",
            "--file_system_poll_wait_seconds=0.5",
            "--enable_batching",
        ],
        "reload": [f"--model_config_file={root / 'reload.conf'}"],
        "poll": [
            f"--model_config_file={root / 'poll.conf'}",
            "--model_config_file_poll_wait_seconds=1",
        ],
        "corrupt": [
            "--model_name=d",
            f"--model_base_path={root / 'corrupt'}",
            "--file_system_poll_wait_seconds=0.5",
            "--max_num_load_retries=1",
            "--load_retry_interval_micros=200000",
        ],
        "labels": [f"--model_config_file={root / 'labels.conf'}"],
        "cycles": [f"--model_config_file={root / 'cycles.conf'}"],
    }
    started = {name: TwistdServer(a, logs).start() for name, a in args.items()}
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def ready(servers: dict[str, TwistdServer], name: str) -> TwistdServer:
    return servers[name].wait_ready(STARTUP)


# --- tests ----------------------------------------------------------------------------------


def test_hot_swap_under_load_answers_every_request_from_one_whole_version(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """v2 copied in under load takes over: no failure, only exact v1/v2 answers, no v1 after v2."""
    server = ready(servers, "swap")
    with Load(partial(predict, server, "m"), threads=8) as load:
        poll(load.count, lambda n: n >= 50)
        shutil.copytree(root / "staging" / "2", root / "swap" / "2")  # as a user does
        swapped = poll(lambda: states(server, "m"), lambda s: s == {2: "AVAILABLE", 1: "END"})
        ended = time.monotonic()
        poll(lambda: load.count(lambda a: a.sent > ended), lambda n: n >= 50)
    answers = load.answers
    assert swapped == {2: "AVAILABLE", 1: "END"}, server.log()
    assert load.failures() == []
    bodies = [a.body["predictions"] for a in answers]
    assert {str(b) for b in bodies} == {str(V1), str(V2)}  # both served, and nothing else
    first_v2 = min(a.received for a in answers if a.body["predictions"] == V2)
    late = [a.body["predictions"] for a in answers if a.sent > first_v2]
    assert late and all(b == V2 for b in late), "v1 answered after v2 had"
    assert all(a.body["predictions"] == V2 for a in answers if a.sent > ended)
    print(f"\nhot swap: {len(answers)} answers, {bodies.count(V2)} from v2, none failed")


def test_config_reload_adds_and_removes_models_without_failing_the_one_that_stays(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """SIGHUP with a+c instead of a+b: c serves, b is 404, and a and /readyz never failed."""
    server = ready(servers, "reload")
    assert predict(server, "b") == (200, {"predictions": linear_y(3)})
    with (
        Load(partial(predict, server, "a"), threads=4) as load,
        Load(partial(server.get, "/readyz"), threads=1) as readiness,
    ):
        poll(load.count, lambda n: n >= 30)
        write_config(
            root / "reload.conf", model_entry("a", root / "a"), model_entry("c", root / "c")
        )
        sighup(server)
        answered = poll(lambda: predict(server, "c"), lambda r: r[0] == 200)
        gone = poll(lambda: predict(server, "b")[0], lambda code: code == 404)
        poll(lambda: states(server, "b"), lambda s: s == {})  # b fully unloaded
        after = time.monotonic()
        poll(lambda: load.count(lambda a: a.sent > after), lambda n: n >= 30)
    assert answered == (200, {"predictions": linear_y(4)}), server.log()
    assert gone == 404
    assert load.failures() == [] and readiness.failures() == []
    assert {str(a.body["predictions"]) for a in load.answers} == {str(V1)}
    assert readiness.count() > 0
    assert log_lines(server, "#info]", "reloaded (SIGHUP): a, c")


def test_polled_config_file_moves_and_adds_labels_without_sighup(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """--model_config_file_poll_wait_seconds=1 applies an edited file: stable moves to 2, canary appears."""
    server = ready(servers, "poll")
    assert predict(server, "linear/labels/stable") == (200, {"predictions": V1})
    write_config(
        root / "poll.conf",
        model_entry("linear", root / "linear", versions=(1, 2), labels={"stable": 2, "canary": 1}),
    )
    moved = poll(
        lambda: predict(server, "linear/labels/stable"), lambda r: r == (200, {"predictions": V2})
    )
    assert moved == (200, {"predictions": V2}), server.log()
    assert predict(server, "linear/labels/canary") == (200, {"predictions": V1})
    assert (
        server.get("/v1/models/linear/labels/stable")[1]["model_version_status"][0]["version"]
        == "2"
    )
    assert log_lines(server, "#info]", "reloaded (poll)")


def test_corrupt_version_folder_leaves_the_old_version_serving_and_reports_the_error(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """A garbage v2 ends END with its error after one retry, logged loudly; v1 serves throughout."""
    server = ready(servers, "corrupt")
    bad = root / "bad" / "2"
    (bad / "variables").mkdir(parents=True)
    (bad / "saved_model.pb").write_bytes(b"this is not a SavedModel" * 100)
    (bad / "variables" / "variables.index").write_bytes(b"nor is this an index")
    with Load(partial(predict, server, "d"), threads=2) as load:
        poll(load.count, lambda n: n >= 10)
        shutil.copytree(bad, root / "corrupt" / "2")
        failed = poll(lambda: version_status(server, "d", 2), lambda s: s.get("state") == "END")
        after = time.monotonic()
        poll(lambda: load.count(lambda a: a.sent > after), lambda n: n >= 10)
    assert failed["state"] == "END", server.log()
    assert failed["status"]["error_code"] == "UNKNOWN"
    assert failed["status"]["error_message"].startswith("failed to load after 2 attempts: ")
    assert states(server, "d") == {2: "END", 1: "AVAILABLE"}
    assert load.failures() == []
    assert {str(a.body["predictions"]) for a in load.answers} == {str(V1)}
    assert log_lines(server, "#critical]", "model d version 2 failed to load from")
    assert log_lines(server, "#critical]", "failed to load after 2 attempts")


def test_labels_route_predict_metadata_status_and_classify_image(
    servers: dict[str, TwistdServer],
) -> None:
    """stable -> 1 and canary -> 2 route every kind of request; an unknown label is a 400."""
    server = ready(servers, "labels")
    assert predict(server, "linear/labels/stable") == (200, {"predictions": V1})
    assert predict(server, "linear/labels/canary") == (200, {"predictions": V2})
    assert predict(server, "linear") == (200, {"predictions": V2})  # highest of {1, 2}
    assert predict(server, "linear/versions/3")[0] == 404  # on disk, not in the policy
    code, meta = server.get("/v1/models/linear/labels/canary/metadata")
    assert code == 200 and meta["model_spec"]["version"] == "2"
    code, status = server.get("/v1/models/linear/labels/stable")
    assert code == 200 and [(s["version"], s["state"]) for s in status["model_version_status"]] == [
        ("1", "AVAILABLE")
    ]
    code, refused = predict(server, "linear/labels/nope")
    assert (code, refused["error"]) == (
        400,
        "Unrecognized servable version label: nope (model 'linear' has labels: canary, stable)",
    )
    code, _, doc = upload(
        server,
        "/v1/models/flowers/labels/canary:classify_image",
        [("data", "red.jpg", picture((230, 20, 20)))],
        content_type="image/jpeg",
    )
    assert code == 200 and (doc["model"], doc["version"]) == ("flowers", "2")
    assert doc["predictions"][0]["label"] == "daisy"


def test_start_up_fails_on_a_config_with_an_unknown_field_and_names_it(tmp_path: Path) -> None:
    """twistd exits non-zero at option parsing and its message names the field and its line."""
    config = tmp_path / "bad.conf"
    write_config(
        config,
        "  config {\n    name: 'x'\n    base_path: '/models/x'\n    bogus_field: 3\n  }\n",
    )
    done = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "inference", f"--model_config_file={config}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert 'has no field named "bogus_field"' in output
    assert f"{config}: 5:5" in output


def test_twenty_load_unload_cycles_keep_rss_within_15_percent(
    servers: dict[str, TwistdServer], root: Path
) -> None:
    """Loading and unloading a 12 MiB model 20 times by config + SIGHUP leaves RSS within 15%."""
    server = ready(servers, "cycles")
    config, keep = root / "cycles.conf", model_entry("keep", root / "a")
    wide_x = [[0.5] * 1024]
    rss = []
    for _ in range(20):
        write_config(config, keep, model_entry("w", root / "wide"))
        sighup(server)
        answer = poll(lambda: predict(server, "w", wide_x), lambda r: r[0] == 200)
        assert answer[0] == 200 and len(answer[1]["predictions"][0]) == 1024, server.log()
        write_config(config, keep)
        sighup(server)
        assert poll(lambda: predict(server, "w", wide_x)[0], lambda c: c == 404) == 404
        assert poll(lambda: server.get("/v1/models/w")[0], lambda c: c == 404) == 404
        rss.append(round(rss_mib(server), 1))
    print(f"\nRSS after each cycle (MiB): {rss}")
    assert rss[-1] <= 1.15 * rss[0], rss
    assert len(log_lines(server, "#info]", "model w version 1: END (unloaded)")) == 20


def test_consul_tags_and_meta_follow_the_served_models(
    consul_agent: ConsulAgent,  # noqa: F811
    root: Path,
    tmp_path: Path,
) -> None:
    """Adding b by config + SIGHUP adds model:b tags and meta; removing a takes model:a away."""
    config = tmp_path / "consul.conf"
    write_config(config, model_entry("a", root / "a"))
    server = TwistdServer(
        [
            f"--model_config_file={config}",
            f"--consul={consul_agent.http_addr}",
            "--consul_check_interval=1",
            "--consul_ttl=3",
            "--drain_delay=0",
        ],
        tmp_path,
    ).start()
    sid = f"inference-127.0.0.1-{server.port}"

    def registered() -> tuple[list[str], dict[str, str]]:
        status, _, services = consul_agent.get("/v1/agent/services")
        held = services.get(sid, {}) if status == 200 else {}
        return held.get("Tags", []), held.get("Meta", {})

    try:
        server.wait_ready(STARTUP)
        first = poll(registered, lambda r: "model:a" in r[0])
        write_config(config, model_entry("a", root / "a"), model_entry("b", root / "b"))
        sighup(server)
        both = poll(registered, lambda r: "model:b" in r[0])
        write_config(config, model_entry("b", root / "b"))
        sighup(server)
        only_b = poll(registered, lambda r: "model:a" not in r[0])
    finally:
        server.stop()
    grpc = {"grpc_port": str(server.grpc_port)}  # every test server serves gRPC too
    rest_and_grpc = ["api:tfserving-rest", "api:v2", "api:tfserving-grpc", "api:v2-grpc"]
    assert first == (
        [*rest_and_grpc, "model:a", "model:a:1"],
        {"api": "tfserving-rest", "models": "a:1", **grpc},
    ), server.log()
    assert both == (
        [*rest_and_grpc, "model:a", "model:a:1", "model:b", "model:b:1"],
        {"api": "tfserving-rest", "models": "a:1,b:1", **grpc},
    )
    assert only_b == (
        [*rest_and_grpc, "model:b", "model:b:1"],
        {"api": "tfserving-rest", "models": "b:1", **grpc},
    )
