"""service.model_hooks on its own: the hook pool (deadlines, cancellation, its bound), importing
a hooks file, the inputs a hook returns, hook metrics, and what a client is told when a hook
fails. Time is a ``task.Clock``; the pool's calls run when a test says so."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from service.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from service.hook_pool import HookPool, HookThreads
from service.model_hooks import (
    HOOKS_FILE,
    HookRequest,
    HooksFailed,
    ModelHooks,
    coerce_inputs,
    hook_failure,
    import_hooks,
)
from service.signature import Signature, TensorInfo
from tests.deferreds import result_of

SIGNATURE = Signature(
    "serving_default",
    {
        "x": TensorInfo("x", "DT_FLOAT", (None, 2)),
        "words": TensorInfo("words", "DT_STRING", (None,)),
    },
    {"y": TensorInfo("y", "DT_FLOAT", (None, 1))},
)


class FakeServable:
    signatures = {"serving_default": SIGNATURE}

    def signature(self, name: str | None) -> Signature:
        if name not in (None, "serving_default"):
            raise NotFound(f"no signature {name!r}")
        return SIGNATURE


class Calls:
    """A pool's ``submit`` that keeps each call until the test runs it."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, Deferred]] = []

    def submit(self, f: Any) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((f, d))
        return d

    def run_next(self) -> None:
        f, d = self.waiting.pop(0)
        try:
            d.callback(f())
        except Exception:
            d.errback(Failure())


def make_pool(clock: task.Clock, calls: Calls, max_waiting: int = 4) -> HookPool:
    return HookPool(reactor=clock, threads=1, max_waiting=max_waiting, submit=calls.submit)


def test_a_call_answers_with_what_the_hook_returned() -> None:
    calls = Calls()
    pool = make_pool(task.Clock(), calls)
    d = pool.call("hook preprocess", lambda a, b: a + b, 2, 3)
    assert not d.called
    calls.run_next()
    assert result_of(d) == 5
    assert pool.pending == 0


def test_a_hook_past_its_deadline_is_answered_504_and_its_late_result_dropped(logs: Any) -> None:
    clock, calls = task.Clock(), Calls()
    pool = make_pool(clock, calls)
    d = pool.call("hook preprocess of model 'm' version 1", lambda: "late", deadline=0.5)
    clock.advance(0.5)
    with pytest.raises(DeadlineExceeded, match="hook preprocess of model 'm' version 1 did not"):
        result_of(d)
    assert pool.pending == 1  # the thread is still taken until the hook returns
    calls.run_next()  # the call was abandoned: it is skipped, not run
    assert pool.pending == 0
    assert not logs.messages(LogLevel.critical, "service.model_hooks")


def test_a_hook_that_fails_after_its_deadline_is_logged(logs: Any) -> None:
    clock, calls = task.Clock(), Calls()
    pool = make_pool(clock, calls)
    started: list[bool] = []

    def hook() -> None:
        started.append(True)
        raise RuntimeError("too late to tell the client")

    d = pool.call("hook postprocess", hook, deadline=1.0)
    f, running = calls.waiting.pop(0)
    clock.advance(1.0)
    with pytest.raises(DeadlineExceeded):
        result_of(d)
    # The hook had started before the deadline (its thread was running it): it still ends.
    running.errback(Failure(RuntimeError("too late to tell the client")))
    assert any(
        "hook postprocess failed after its request was answered" in m
        for m in logs.messages(LogLevel.critical, "service.model_hooks")
    )


def test_a_call_whose_client_left_is_skipped_unrun() -> None:
    calls = Calls()
    pool = make_pool(task.Clock(), calls)
    ran: list[bool] = []
    d = pool.call("hook preprocess", lambda: ran.append(True))
    d.addErrback(lambda _: None)
    d.cancel()
    calls.run_next()
    assert ran == []
    assert pool.pending == 0


def test_a_call_is_skipped_when_cancelled_says_so_before_it_starts() -> None:
    calls = Calls()
    pool = make_pool(task.Clock(), calls)
    ran: list[bool] = []
    gone = [False]
    d = pool.call("hook preprocess", lambda: ran.append(True), cancelled=lambda: gone[0])
    d.addErrback(lambda _: None)
    gone[0] = True
    calls.run_next()
    assert ran == []


def test_the_pool_refuses_past_its_waiting_bound_and_takes_calls_again_after() -> None:
    calls = Calls()
    pool = make_pool(task.Clock(), calls, max_waiting=2)
    first = pool.call("hook a", lambda: 1)
    pool.call("hook b", lambda: 2)
    with pytest.raises(ResourceExhausted, match="2 hook calls are waiting"):
        pool.call("hook c", lambda: 3)
    calls.run_next()
    assert result_of(first) == 1
    third = pool.call("hook c", lambda: 3)
    calls.run_next()
    calls.run_next()
    assert result_of(third) == 3


class ThreadReactor:
    """``callFromThread`` as the reactor's: the calls, run when the test says (on its thread)."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))

    def run_one(self) -> None:
        f, args = self.calls.get(timeout=30)
        f(*args)


def test_hook_threads_run_calls_and_fire_their_deferreds_on_the_reactor() -> None:
    reactor = ThreadReactor()
    threads = HookThreads(reactor, 2)
    release = threading.Event()
    names: list[str] = []

    def slow() -> str:
        release.wait(30)
        return threading.current_thread().name

    first = threads.submit(slow)
    second = threads.submit(lambda: 1 / 0)
    reactor.run_one()  # the failing call ended first; the slow one still runs
    while not second.called:
        reactor.run_one()
    with pytest.raises(ZeroDivisionError):
        result_of(second)
    assert not first.called
    release.set()
    while not first.called:
        reactor.run_one()
    names.append(result_of(first))
    assert names[0].startswith("model-hooks-")
    threads.stop()


def test_stopping_the_hook_threads_does_not_wait_for_a_stuck_hook() -> None:
    reactor = ThreadReactor()
    threads = HookThreads(reactor, 1)
    started, stuck = threading.Event(), threading.Event()

    def hook() -> None:
        started.set()
        stuck.wait(30)

    threads.submit(hook)
    assert started.wait(30)
    threads.stop()  # returns at once; the daemon thread ends when its hook does
    running = [t for t in threading.enumerate() if t.name == "model-hooks-0"]
    assert running and all(t.is_alive() and t.daemon for t in running)
    stuck.set()


# -- inputs a hook returns -------------------------------------------------------------------


def test_inputs_are_converted_to_the_signatures_dtypes() -> None:
    inputs = coerce_inputs(SIGNATURE, {"x": [[1, 2]], "words": ["a", b"b"]})
    assert inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(inputs["x"], [[1.0, 2.0]])
    assert inputs["words"].dtype == object
    assert list(inputs["words"]) == [b"a", b"b"]


def test_arrays_of_the_right_dtype_are_passed_as_they_are() -> None:
    x = np.zeros((3, 2), np.float32)
    assert coerce_inputs(SIGNATURE, {"x": x})["x"] is x


def test_inputs_that_are_not_a_mapping_are_the_hooks_bug() -> None:
    with pytest.raises(Internal, match="the inputs are a list, not a dict of the signature's"):
        coerce_inputs(SIGNATURE, [1, 2])


def test_a_value_that_does_not_convert_is_a_400() -> None:
    with pytest.raises(InvalidArgument, match="input 'x' does not convert to DT_FLOAT"):
        coerce_inputs(SIGNATURE, {"x": [["one", "two"]]})


# -- importing a hooks file -------------------------------------------------------------------


def write_hooks(folder: Path, text: str) -> Path:
    file = folder / HOOKS_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return folder


def test_import_finds_the_functions_and_runs_setup_with_the_context(tmp_path: Path) -> None:
    folder = write_hooks(
        tmp_path,
        "def setup(ctx):\n"
        "    ctx.state['greeting'] = f'{ctx.model} v{ctx.version} {ctx.signature.name}'\n"
        "def postprocess(outputs, request, ctx):\n"
        "    return ctx.state['greeting']\n",
    )
    (folder / "labels.txt").write_text("cat\ndog\n")
    hooks = import_hooks("m", 3, folder, FakeServable())
    assert set(hooks.functions) == {"setup", "postprocess"}
    assert hooks.context.state["greeting"] == "m v3 serving_default"
    assert hooks.context.labels == ("cat", "dog")
    assert not hooks.takes_raw_bodies
    assert hooks.name("postprocess") == "hook postprocess of model 'm' version 3"


def test_each_version_gets_a_module_of_its_own(tmp_path: Path) -> None:
    text = "seen = []\ndef preprocess(request, ctx):\n    seen.append(1)\n    return seen\n"
    one = import_hooks("m", 1, write_hooks(tmp_path / "1", text), FakeServable())
    two = import_hooks("m", 2, write_hooks(tmp_path / "2", text), FakeServable())
    one.module.seen.append("only mine")
    assert two.module.seen == []
    assert one.takes_raw_bodies


def test_a_hook_name_bound_to_something_not_callable_fails_the_import(tmp_path: Path) -> None:
    folder = write_hooks(tmp_path, "preprocess = 3\n")
    with pytest.raises(TypeError, match="preprocess is a int, not a function"):
        import_hooks("m", 1, folder, FakeServable())


def test_decode_json_decodes_as_predict_does(tmp_path: Path) -> None:
    hooks = import_hooks("m", 1, write_hooks(tmp_path, ""), FakeServable())
    request = HookRequest("m", 1, "predict", b'{"instances": [{"x": [1, 2], "words": "a"}]}')
    inputs = hooks.context.decode_json(request)
    np.testing.assert_array_equal(inputs["x"], np.array([[1, 2]], np.float32))
    with pytest.raises(InvalidArgument):
        hooks.context.decode_json(HookRequest("m", 1, "predict", b"not json"))


# -- the server's hooks: opening, closing, metrics ------------------------------------------


def open_hooks(model_hooks: ModelHooks, calls: Calls, folder: Path, version: int = 1) -> Any:
    d = Deferred.fromCoroutine(model_hooks.open("m", version, folder, FakeServable()))
    while calls.waiting:
        calls.run_next()
    return result_of(d)


def test_without_enable_a_hooks_file_is_ignored_with_a_warning(tmp_path: Path, logs: Any) -> None:
    calls = Calls()
    model_hooks = ModelHooks(
        pool=make_pool(task.Clock(), calls), registry=CollectorRegistry(), enabled=False
    )
    folder = write_hooks(tmp_path, "raise SystemExit('never imported')\n")
    assert open_hooks(model_hooks, calls, folder) is None
    warnings = logs.messages(LogLevel.warn, "service.model_hooks")
    assert len(warnings) == 1
    assert "without --enable_model_hooks" in warnings[0]


def test_a_version_without_a_hooks_file_has_no_hooks(tmp_path: Path) -> None:
    calls = Calls()
    model_hooks = ModelHooks(
        pool=make_pool(task.Clock(), calls), registry=CollectorRegistry(), enabled=True
    )
    assert open_hooks(model_hooks, calls, tmp_path) is None


def test_a_setup_that_raises_fails_the_open_naming_the_file(tmp_path: Path, logs: Any) -> None:
    calls = Calls()
    model_hooks = ModelHooks(
        pool=make_pool(task.Clock(), calls), registry=CollectorRegistry(), enabled=True
    )
    folder = write_hooks(tmp_path, "def setup(ctx):\n    raise OSError('no vocabulary')\n")
    with pytest.raises(HooksFailed, match=r"kleinserve_hooks.py failed .*OSError: no vocabulary"):
        open_hooks(model_hooks, calls, folder)


def metric_samples(registry: CollectorRegistry, name: str) -> list[Any]:
    text = generate_latest(registry).decode()
    return [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_total"
    ]


def test_hook_metrics_show_per_version_and_vanish_when_it_closes(tmp_path: Path) -> None:
    calls = Calls()
    registry = CollectorRegistry()
    model_hooks = ModelHooks(pool=make_pool(task.Clock(), calls), registry=registry, enabled=True)
    text = (
        "def setup(ctx):\n"
        "    ctx.state['seen'] = ctx.metrics.counter('seen', 'Rows seen', ('kind',))\n"
        "    ctx.state['seen'].labels(kind='cat').inc(ctx.version)\n"
        "def teardown(ctx):\n"
        "    ctx.state['closed'] = True\n"
    )
    one = open_hooks(model_hooks, calls, write_hooks(tmp_path / "1", text), version=1)
    open_hooks(model_hooks, calls, write_hooks(tmp_path / "2", text), version=2)
    samples = metric_samples(registry, "seen")
    assert sorted((s.labels["version"], s.value) for s in samples) == [("1", 1.0), ("2", 2.0)]
    assert {s.labels["model"] for s in samples} == {"m"}
    assert {s.labels["kind"] for s in samples} == {"cat"}
    closing = Deferred.fromCoroutine(model_hooks.close(one))
    calls.run_next()
    result_of(closing)
    assert one.context.state["closed"]
    assert [s.labels["version"] for s in metric_samples(registry, "seen")] == ["2"]


def test_hooks_cannot_declare_the_servers_labels(tmp_path: Path) -> None:
    hooks = import_hooks("m", 1, write_hooks(tmp_path, ""), FakeServable())
    with pytest.raises(ValueError, match="are the server's"):
        hooks.context.metrics.counter("seen", "Rows", ("model",))


# -- what the client is told ------------------------------------------------------------------


def failure_of(error: BaseException) -> Failure:
    try:
        raise error
    except BaseException:
        return Failure()


def test_a_hook_raising_a_serving_error_keeps_its_status_and_names_the_hook() -> None:
    error = hook_failure(
        "hook preprocess of model 'm' version 1", failure_of(InvalidArgument("too dark"))
    )
    assert isinstance(error, InvalidArgument)
    assert error.message == "hook preprocess of model 'm' version 1: too dark"


def test_any_other_exception_is_a_500_naming_hook_and_type_with_the_traceback_logged(
    logs: Any,
) -> None:
    error = hook_failure("hook handle of model 'm' version 2", failure_of(KeyError("secret")))
    assert isinstance(error, Internal)
    assert error.message == "hook handle of model 'm' version 2 raised KeyError; see the server log"
    assert "secret" not in error.message
    logged = logs.messages(LogLevel.critical, "service.model_hooks")
    assert any("hook handle of model 'm' version 2 raised" in m for m in logged)


def test_deadline_and_cancellation_pass_unchanged() -> None:
    late = DeadlineExceeded("hook x did not return before the deadline")
    assert hook_failure("hook x", failure_of(late)) is late
    assert isinstance(hook_failure("hook x", failure_of(Cancelled("gone"))), Cancelled)


def test_request_json_and_form_errors_are_400s() -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        HookRequest("m", 1, "invoke", b"{").json()
    with pytest.raises(InvalidArgument, match="expected a multipart/form-data body"):
        HookRequest("m", 1, "invoke", b"", content_type="text/csv").form()


def test_request_form_splits_the_fields() -> None:
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="a"\r\n\r\none\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="a"\r\n\r\ntwo\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="b"; filename="b.bin"\r\n\r\n\x00\x01\r\n'
        b"--XX--\r\n"
    )
    request = HookRequest(
        "m",
        1,
        "invoke",
        body,
        content_type="multipart/form-data",
        content_type_header="multipart/form-data; boundary=XX",
    )
    assert request.form() == {"a": [b"one", b"two"], "b": [b"\x00\x01"]}
