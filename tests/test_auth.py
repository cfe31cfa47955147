"""Bearer tokens without sockets: the token file, the check, the constant-time comparison,
the SIGHUP re-read, which HTTP requests are open, and the channel refusing a request before
its body is read (``service.auth``, ``wire.auth``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python import usage

from service.access_log import AccessLog
from service.auth import (
    CHALLENGE,
    INVALID_REQUEST,
    INVALID_TOKEN,
    BearerTokens,
    HTTPAuth,
    TokenFileError,
    read_tokens,
)
from service.errors import Unauthenticated
from service.model_hooks import HookRequest
from service.options import Options
from service.reload import ConfigReloader
from tests.conftest import CapturedLogs
from tests.test_access_log import access_lines
from tests.test_http_limits import PREDICT, PREDICTED, Connection, request
from wire.auth import parse_tokens, token_problem

FILE = "# the team's tokens\nfirst-token\n\n   # rotated in on Monday\nsecond-token\n"


def tokens_file(tmp_path: Path, text: str = FILE) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    return path


def refusal(tokens: BearerTokens, *values: bytes | str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        tokens.check(list(values))
    return raised.value


# -- the token file -------------------------------------------------------------------------------


def test_a_token_file_is_one_token_a_line_without_blanks_and_comments() -> None:
    """Blank lines and # comments are left out, surrounding spaces stripped, order kept."""
    assert parse_tokens(FILE) == ["first-token", "second-token"]
    assert parse_tokens("\n# only a comment\n") == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("good\nhas space\n", "line 2: the token is not visible ASCII"),
        ("tab\there\n", "line 1: the token is not visible ASCII"),
        ("ünïcode\n", "line 1: the token is not visible ASCII"),
        ("x" * 4097 + "\n", "line 1: the token is longer than 4096 characters"),
    ],
)
def test_a_bad_line_is_named_by_its_number_never_its_text(text: str, says: str) -> None:
    """A line that cannot be a token is refused by its number; the message holds no token."""
    with pytest.raises(ValueError, match=says) as raised:
        parse_tokens(text)
    assert "has space" not in str(raised.value) and "here" not in str(raised.value)


def test_token_problem_takes_b64token_characters() -> None:
    """RFC 6750's b64token characters (letters, digits, -._~+/ and =) make a token."""
    assert token_problem("Az09-._~+/==") is None
    assert token_problem("") == "empty"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "holds no token"),
        ("# nothing but a comment\n\n", "holds no token"),
        ("a b\n", "line 1"),
    ],
)
def test_a_file_without_a_usable_token_is_refused(tmp_path: Path, text: str, says: str) -> None:
    """An empty file, only comments, or a bad line: TokenFileError naming the file."""
    path = tokens_file(tmp_path, text)
    with pytest.raises(TokenFileError, match=says) as raised:
        read_tokens(path)
    assert str(path) in str(raised.value)


def test_an_unreadable_or_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing file and a file that is not UTF-8 say so."""
    with pytest.raises(TokenFileError, match="cannot read the token file"):
        read_tokens(tmp_path / "missing")
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenFileError, match="not UTF-8"):
        read_tokens(path)


def test_a_world_readable_file_is_warned_about(tmp_path: Path, logs: CapturedLogs) -> None:
    """Loading a token file every user can read logs a warning that says to chmod 600 it."""
    path = tokens_file(tmp_path)
    BearerTokens.load(path)
    assert logs.messages(LogLevel.warn, "service.auth") == []
    path.chmod(0o644)
    BearerTokens.load(path)
    (warning,) = logs.messages(LogLevel.warn, "service.auth")
    assert "readable by every user" in warning and "chmod 600" in warning


# -- the check ------------------------------------------------------------------------------------


def test_each_token_of_the_file_is_accepted(tmp_path: Path) -> None:
    """Both tokens of the file pass, as bytes (HTTP) or text (gRPC metadata), the scheme in
    any case and with extra spaces around the token."""
    tokens = BearerTokens.load(tokens_file(tmp_path))
    assert tokens.count == 2
    tokens.check([b"Bearer first-token"])
    tokens.check(["Bearer second-token"])
    tokens.check([b"bearer   second-token "])
    tokens.check([b"BEARER first-token"])


def test_no_token_is_401_with_a_bare_challenge() -> None:
    """No Authorization at all, or another scheme: 401, ``Bearer realm="kleinserve"`` with
    no error code (RFC 6750 3.1), a message saying what to send."""
    tokens = BearerTokens(["t0k3n"])
    missing = refusal(tokens)
    assert (missing.status, missing.code, missing.challenge) == (401, "UNAUTHENTICATED", CHALLENGE)
    assert CHALLENGE == 'Bearer realm="kleinserve"'
    assert "needs a bearer token" in missing.message
    assert "Authorization: Bearer <token>" in missing.message
    basic = refusal(tokens, b"Basic dXNlcjp0MGszbg==")
    assert (basic.status, basic.challenge) == (401, CHALLENGE)
    assert "not a Bearer token" in basic.message and "dXNlcjp0MGszbg" not in basic.message


def test_a_wrong_token_is_401_invalid_token_without_echoing_it() -> None:
    """A token the file does not hold: 401 with error="invalid_token"; the message says the
    token is not valid and never repeats it."""
    tokens = BearerTokens(["t0k3n"])
    wrong = refusal(tokens, b"Bearer guessed-secret")
    assert (wrong.status, wrong.challenge) == (401, INVALID_TOKEN)
    assert INVALID_TOKEN == 'Bearer realm="kleinserve", error="invalid_token"'
    assert "not valid" in wrong.message
    assert "guessed-secret" not in wrong.message and "t0k3n" not in wrong.message
    assert dict(wrong.response_headers()) == {b"WWW-Authenticate": INVALID_TOKEN.encode()}


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ((b"Bearer t0k3n", b"Bearer t0k3n"), "2 Authorization headers"),
        ((b"Bearer",), "one token"),
        ((b"Bearer t0k3n extra",), "one token"),
    ],
)
def test_a_malformed_authorization_is_400_invalid_request(values: tuple[bytes], says: str) -> None:
    """Two Authorization values, or Bearer without exactly one token: 400 invalid_request."""
    malformed = refusal(BearerTokens(["t0k3n"]), *values)
    assert (malformed.status, malformed.challenge) == (400, INVALID_REQUEST)
    assert says in malformed.message and "t0k3n" not in malformed.message


class CountingCompare:
    """hmac.compare_digest, counting its calls and what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes]] = []
        self._compare = hmac.compare_digest  # the real one, even while it is patched

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return self._compare(a, b)


@pytest.mark.parametrize("sent", [b"one", b"two", b"three", b"nope", b"o"])
def test_every_token_is_compared_whichever_matches(sent: bytes) -> None:
    """The comparator runs once per token held, whether the first, the last or none matches,
    always on two SHA-256 digests (equal lengths, so the comparison's time says nothing
    about the token's length either)."""
    compare = CountingCompare()
    tokens = BearerTokens(["one", "two", "three"], compare=compare)
    try:
        tokens.check([b"Bearer " + sent])
    except Unauthenticated:
        assert sent not in (b"one", b"two", b"three")
    assert len(compare.calls) == 3
    given = hashlib.sha256(sent).digest()
    assert all(a == given and len(b) == 32 for a, b in compare.calls)
    assert {b for _, b in compare.calls} == {
        hashlib.sha256(t).digest() for t in (b"one", b"two", b"three")
    }


def test_the_real_comparison_is_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected comparator, hmac.compare_digest compares, once per token held,
    for a good token and for a wrong one."""
    compare = CountingCompare()
    monkeypatch.setattr(hmac, "compare_digest", compare)
    tokens = BearerTokens(["one", "two"])
    tokens.check([b"Bearer two"])
    refusal(tokens, b"Bearer three")
    assert len(compare.calls) == 4


# -- re-reading on SIGHUP -------------------------------------------------------------------------


def test_reload_takes_added_tokens_and_drops_removed_ones(tmp_path: Path) -> None:
    """After reload() a token added to the file passes and one removed from it is refused."""
    path = tokens_file(tmp_path, "old-token\n")
    tokens = BearerTokens.load(path)
    path.write_text("new-token\n")
    assert tokens.reload() is True
    tokens.check([b"Bearer new-token"])
    assert refusal(tokens, b"Bearer old-token").challenge == INVALID_TOKEN


@pytest.mark.parametrize("damage", ["empty", "comments", "bad line", "deleted", "a folder"])
def test_a_reload_of_a_bad_file_keeps_the_tokens(
    tmp_path: Path, logs: CapturedLogs, damage: str
) -> None:
    """A file emptied, left with only comments, given a bad line, deleted or replaced by
    something unreadable (a folder) keeps the tokens read before (nobody is locked out)
    and logs an error saying why, which names no token."""
    path = tokens_file(tmp_path, "kept-token\n")
    tokens = BearerTokens.load(path)
    if damage == "empty":
        path.write_text("")
    elif damage == "comments":
        path.write_text("# all gone\n")
    elif damage == "bad line":
        path.write_text("kept-token\nnew token\n")
    elif damage == "deleted":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    assert tokens.reload() is False
    tokens.check([b"Bearer kept-token"])
    (error,) = logs.messages(LogLevel.error, "service.auth")
    assert "1 token(s) read before stay valid" in error and str(path) in error
    assert "kept-token" not in error and "new token" not in error


class Reactor(Clock):
    """A clock whose callFromThread runs at once (as the reactor would, soon after)."""

    def callFromThread(self, f, *args, **kw):  # noqa: N802 (Twisted's name)
        f(*args, **kw)


def test_a_real_sighup_rereads_the_tokens_before_the_models(tmp_path: Path) -> None:
    """SIGHUP runs the reloader's on_sighup re-reads (the token file) and then its own
    rescan; a re-read that raises is logged and does not stop the rescan."""
    path = tokens_file(tmp_path, "old-token\n")
    tokens = BearerTokens.load(path)
    done: list[str] = []

    def broken() -> None:
        done.append("broken")
        raise RuntimeError("a bug")

    def reread() -> None:
        done.append("tokens")
        tokens.reload()

    reloader = ConfigReloader(
        None,
        lambda _: [],
        lambda _: None,
        reactor=Reactor(),
        rescan=lambda: done.append("rescan"),
        on_sighup=(broken, reread),
    )
    reloader.startService()
    try:
        path.write_text("new-token\n")
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        reloader.stopService()
    assert done == ["broken", "tokens", "rescan"]
    tokens.check([b"Bearer new-token"])
    refusal(tokens, b"Bearer old-token")


# -- which HTTP requests need a token -------------------------------------------------------------


def test_health_is_open_to_get_and_head_only() -> None:
    """GET and HEAD of /healthz, /readyz and the v2 health paths need no token; any other
    method, and every other path (the v2 server metadata, models, a health path with more
    after it), does."""
    auth = HTTPAuth(BearerTokens(["t"]))
    for path in (b"/healthz", b"/readyz", b"/v2/health/live", b"/v2/health/ready"):
        assert auth.is_open(b"GET", path) and auth.is_open(b"HEAD", path)
        assert not auth.is_open(b"POST", path)
    for path in (b"/v2", b"/v2/models/m", b"/v2/models/m/ready", b"/healthz/x", b"/", b""):
        assert not auth.is_open(b"GET", path)


def test_metrics_are_open_unless_protected() -> None:
    """/metrics and the monitoring config's path (with or without a trailing slash, as it is
    served) are open by default, and need a token with protect_metrics (--auth_metrics)."""
    tokens = BearerTokens(["t"])
    open_ = HTTPAuth(tokens, prometheus_path="/monitoring/prometheus/metrics")
    closed = HTTPAuth(
        tokens, prometheus_path="/monitoring/prometheus/metrics", protect_metrics=True
    )
    for path in (
        b"/metrics",
        b"/monitoring/prometheus/metrics",
        b"/monitoring/prometheus/metrics/",
    ):
        assert open_.is_open(b"GET", path)
        assert not closed.is_open(b"GET", path)
    assert not open_.is_open(b"GET", b"/monitoring/prometheus")
    assert not HTTPAuth(tokens).is_open(b"GET", b"/monitoring/prometheus/metrics")


# -- the channel: refused before the body -------------------------------------------------------


def connection(**kwargs) -> Connection:
    return Connection(auth=HTTPAuth(BearerTokens(["t0k3n"])), **kwargs)


def test_a_predict_with_a_token_is_answered() -> None:
    """A predict carrying a good token is answered as without auth."""
    served = connection()
    served.send(request(b"/v1/models/m:predict", PREDICT, b"Authorization: Bearer t0k3n"))
    status, _, body = served.answer()
    assert (status, json.loads(body)) == (200, PREDICTED)


def test_no_token_is_refused_at_the_headers_without_100_continue(logs: CapturedLogs) -> None:
    """A predict without a token announcing a body larger than the limit with Expect:
    100-continue: 401 (not 413) at the end of its headers, no 100 Continue, the challenge,
    the request id in header and body; the body sent after it is not read (its access-log
    line counts no byte in)."""
    refused = connection(max_body_bytes=1000, access_log=AccessLog("json"))
    refused.send(
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Expect: 100-continue\r\nX-Request-Id: no-token-1\r\n\r\n"
    )
    assert b"100 Continue" not in refused.transport.value()
    refused.send(b"x" * 5000)
    status, headers, body = refused.answer()
    assert status == 401
    assert headers[b"www-authenticate"] == CHALLENGE.encode()
    assert headers[b"x-request-id"] == b"no-token-1" and headers[b"connection"] == b"close"
    assert json.loads(body) == {
        "error": refusal(BearerTokens(["t0k3n"])).message,
        "request_id": "no-token-1",
    }
    (line,) = access_lines(logs)
    assert (line["status"], line["route"], line["bytes_in"]) == (401, "predict", 0)


def test_a_wrong_token_is_refused_and_not_logged(logs: CapturedLogs) -> None:
    """A wrong token: 401 invalid_token; neither it nor the good one is in any log event."""
    refused = connection(access_log=AccessLog("text"))
    refused.send(request(b"/v1/models/m", b"", b"Authorization: Bearer guessed-secret"))
    status, headers, _ = refused.answer()
    assert (status, headers[b"www-authenticate"]) == (401, INVALID_TOKEN.encode())
    served = connection(access_log=AccessLog("text"))
    served.send(request(b"/v1/models/m/metadata", b"", b"Authorization: Bearer t0k3n"))
    assert served.answer()[0] != 401
    events = repr(list(logs))
    assert "guessed-secret" not in events and "t0k3n" not in events


def test_health_and_metrics_are_answered_without_a_token() -> None:
    """GET /healthz and /metrics need no token; GET /v2 (server metadata) does."""
    for path, status in ((b"/healthz", 200), (b"/metrics", 200), (b"/v2", 401)):
        asked = connection()
        asked.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert asked.answer()[0] == status, path


# -- the flags ------------------------------------------------------------------------------------


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_the_auth_flags_land_in_the_config(tmp_path: Path) -> None:
    """--auth_token_file (resolved) and --auth_metrics land in the config; without them,
    no auth."""
    path = tokens_file(tmp_path)
    config = parse(f"--model_base_path={tmp_path}").config
    assert (config.auth_token_file, config.auth_metrics) == (None, False)
    config = parse(
        f"--model_base_path={tmp_path}", f"--auth_token_file={path}", "--auth_metrics"
    ).config
    assert (config.auth_token_file, config.auth_metrics) == (path.resolve(), True)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "--auth_token_file: cannot read the token file"),
        ("", "--auth_token_file: the token file .* holds no token"),
        ("# no token yet\n", "holds no token"),
        ("two words\n", "line 1: the token is not visible ASCII"),
    ],
)
def test_a_token_file_that_cannot_be_used_stops_start_up(
    tmp_path: Path, text: str | None, says: str
) -> None:
    """A missing, empty, comment-only or bad token file is a usage error saying why."""
    path = tmp_path / "tokens"
    if text is not None:
        path.write_text(text)
    with pytest.raises(usage.UsageError, match=says):
        parse(f"--model_base_path={tmp_path}", f"--auth_token_file={path}")


def test_auth_metrics_needs_a_token_file(tmp_path: Path) -> None:
    """--auth_metrics alone is a usage error: there would be no token to ask for."""
    with pytest.raises(usage.UsageError, match="--auth_metrics needs --auth_token_file"):
        parse(f"--model_base_path={tmp_path}", "--auth_metrics")


# -- hooks ----------------------------------------------------------------------------------------


def test_hooks_never_see_the_authorization_header() -> None:
    """A hook's request.headers holds every header but Authorization (whatever its case)."""
    request = HookRequest(
        "m", 1, "predict", b"", headers={"authorization": "Bearer t", "x-trace": "1"}
    )
    assert dict(request.headers) == {"x-trace": "1"}
    assert dict(HookRequest("m", 1, "Predict", b"", headers={"Authorization": "x"}).headers) == {}
