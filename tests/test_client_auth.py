"""The client's bearer token without a network: sent on every attempt, a 401 never retried
and never ejecting a server, the command line's --token-file and $KLEINSERVE_TOKEN."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task

from client import InvalidRequest, Unauthenticated, cli
from client.async_client import AsyncInferenceClient
from tests.test_client_unit import (
    ABC,
    OK,
    FakeTransport,
    call,
    dispatcher,
    json_response,
    result_of,
)
from wire.http import REQUEST_ID_HEADER


def test_every_attempt_carries_the_token() -> None:
    """With a token, the first attempt and its retry (after a 503) both send
    Authorization: Bearer TOKEN; without one, no Authorization header is sent."""
    clock = task.Clock()
    answers = iter([json_response(503, {"error": "busy"}), OK])
    transport = FakeTransport(lambda where, r: next(answers))
    d = dispatcher(clock, transport, token="s3cret-token")
    result_of(clock, call(d, clock))
    assert [r.headers["authorization"] for _, r in transport.sent] == ["Bearer s3cret-token"] * 2
    plain = FakeTransport(lambda where, r: OK)
    result_of(clock, call(dispatcher(clock, plain), clock))
    assert "authorization" not in plain.sent[0][1].headers


def test_a_401_is_unauthenticated_not_retried_and_no_server_is_ejected() -> None:
    """A 401 is Unauthenticated (an InvalidRequest) after one attempt, with the server's
    message, the call's request id and what to do; no backend is ejected; the token is not
    in the error."""
    clock = task.Clock()
    transport = FakeTransport(
        lambda where, r: json_response(401, {"error": "the bearer token is not valid"})
    )
    d = dispatcher(clock, transport, token="wrong-token")
    with pytest.raises(Unauthenticated) as raised:
        result_of(clock, call(d, clock))
    error = raised.value
    assert isinstance(error, InvalidRequest) and error.status == 401
    assert error.server_message == "the bearer token is not valid"
    assert "--auth_token_file" in str(error) and "token=" in str(error)
    assert "wrong-token" not in str(error)
    assert error.request_id == transport.sent[0][1].headers[REQUEST_ID_HEADER.lower()]
    assert len(transport.sent) == 1
    assert not any(d.balancer.is_ejected(b) for b in ABC)


def test_a_token_that_cannot_be_sent_is_refused_at_once() -> None:
    """token= empty, with a space or a line break is a ValueError saying why, not naming it."""
    for bad in ("two words", "line\nbreak"):
        with pytest.raises(
            ValueError, match="bearer token; this one is not visible ASCII"
        ) as raised:
            AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), token=bad)
        assert bad not in str(raised.value)
    with pytest.raises(ValueError, match="this one is empty"):
        AsyncInferenceClient(backends=[("h", 1)], reactor=task.Clock(), token="")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_the_cli_token_comes_from_the_file_else_the_environment(tmp_path: Path) -> None:
    """--token-file's one token wins over $KLEINSERVE_TOKEN; the variable alone is used;
    neither: no token."""
    file = write(tmp_path / "token", "# for the staging fleet\nfrom-file\n")
    env = {"KLEINSERVE_TOKEN": " from-env \n"}
    assert cli.token_of(file, env) == "from-file"
    assert cli.token_of(None, env) == "from-env"
    assert cli.token_of(None, {}) is None
    assert cli.token_of(None, {"KLEINSERVE_TOKEN": ""}) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "holds 0 tokens"),
        ("one\ntwo\n", "holds 2 tokens; a client's token file holds one"),
        ("two words\n", "line 1: the token is not visible ASCII"),
    ],
)
def test_a_cli_token_file_must_hold_one_token(tmp_path: Path, text: str, says: str) -> None:
    """A client token file with no token, several, or a bad line: ValueError saying which."""
    with pytest.raises(ValueError, match=says):
        cli.token_of(write(tmp_path / "token", text), {})


def test_a_bad_token_in_the_environment_is_refused(tmp_path: Path) -> None:
    """$KLEINSERVE_TOKEN with a space inside is refused, without repeating it."""
    with pytest.raises(ValueError, match=r"\$KLEINSERVE_TOKEN is not a bearer token") as raised:
        cli.token_of(None, {"KLEINSERVE_TOKEN": "my secret"})
    assert "secret" not in str(raised.value)


def test_the_cli_token_options_parse_either_side_of_the_command(tmp_path: Path) -> None:
    """--token-file is a global option, accepted before or after the command; args.token
    is None until main() reads it."""
    parser = cli.build_parser()
    args = parser.parse_args(["--token-file", "t", "status", "m"])
    assert (args.token_file, args.token) == ("t", None)
    args = parser.parse_args(["status", "m", "--token-file", "u"])
    assert args.token_file == "u"


def test_cli_main_refuses_an_unreadable_token_file(tmp_path: Path, capsys) -> None:
    """A --token-file that cannot be read is a usage error (exit 2) naming the option."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["--backend", "h:1", "--token-file", str(tmp_path / "missing"), "status", "m"])
    assert raised.value.code == 2
    assert "--token-file" in capsys.readouterr().err
