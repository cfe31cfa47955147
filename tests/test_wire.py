"""The wire contract: one definition that the server and the client both follow."""

from __future__ import annotations

import ast
import sys
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.signature import DTYPES as CLIENT_DTYPES
from service.dataplane import ModelTarget
from service.http import InferenceAPI
from service.signature import DTYPES as SERVER_DTYPES
from tests.test_http import call, make_api
from wire.consul_tags import model_tag, registration, scheme_of, served_models
from wire.http import DEADLINE_HEADER, error_body, error_text
from wire.paths import PREFIX, V2_PREFIX, is_name, model_path, v2_model_path

ROOT = Path(__file__).resolve().parent.parent
names = st.text(min_size=1, max_size=20).filter(is_name)


def test_server_and_client_read_dtypes_from_one_table() -> None:
    """Every DT_* name maps to the same numpy dtype on the server and in the client."""
    assert dict(SERVER_DTYPES) == dict(CLIENT_DTYPES)
    assert SERVER_DTYPES["DT_FLOAT"].name == "float32" and SERVER_DTYPES["DT_STRING"].kind == "O"


@given(names, st.one_of(st.none(), st.integers(0, 2**63 - 1)))
def test_the_server_parses_every_path_the_client_builds(name: str, version: int | None) -> None:
    """A path from model_path names, on the server, the model and version it was built from."""
    path = model_path(name, version, ":predict")
    routes = InferenceAPI.app.url_map.bind("server")
    endpoint, arguments = routes.match(urllib.parse.unquote(path), method="POST")
    assert endpoint.endswith("predict") and path.startswith(PREFIX)
    assert arguments["target"] == ModelTarget(name, version)


@given(names, st.one_of(st.none(), st.integers(0, 2**63 - 1)))
def test_the_server_routes_every_v2_path_the_client_builds(name: str, version: int | None) -> None:
    """A path from v2_model_path reaches the v2 infer route with that name and version."""
    path = v2_model_path(name, version, "/infer")
    routes = InferenceAPI.app.url_map.bind("server")
    endpoint, arguments = routes.match(urllib.parse.unquote(path), method="POST")
    assert endpoint.endswith("v2_infer") and path.startswith(V2_PREFIX)
    assert arguments["name"] == name
    assert arguments.get("version") == (None if version is None else str(version))


@pytest.mark.parametrize("name", ["", "a/b", "a:b"])
def test_model_path_refuses_what_the_name_rule_refuses(name: str) -> None:
    """Empty names and names holding '/' or ':' never become a path."""
    assert not is_name(name)
    with pytest.raises(ValueError, match="not a model name"):
        model_path(name)
    with pytest.raises(ValueError, match="not a model name"):
        v2_model_path(name)


def test_a_server_with_grpc_says_so_and_names_its_port() -> None:
    """api:tfserving-grpc beside the REST tag, and the gRPC port in meta."""
    tags, meta = registration({"a": [1]}, grpc_port=8500)
    assert tags == [
        "api:tfserving-rest",
        "api:v2",
        "api:tfserving-grpc",
        "api:v2-grpc",
        "model:a",
        "model:a:1",
    ]
    assert meta == {"api": "tfserving-rest", "models": "a:1", "grpc_port": "8500"}


def test_a_tls_server_says_https_in_its_meta() -> None:
    """scheme https adds the meta scheme: https that scheme_of reads; http adds nothing (a
    registration without it is http); another scheme is refused."""
    _, meta = registration({"a": [1]}, scheme="https")
    assert meta == {"api": "tfserving-rest", "models": "a:1", "scheme": "https"}
    assert scheme_of(meta) == "https"
    _, plain = registration({"a": [1]})
    assert "scheme" not in plain and scheme_of(plain) == "http"
    assert scheme_of({"scheme": "gopher"}) == "http"
    with pytest.raises(ValueError, match="scheme must be one of http, https"):
        registration({"a": [1]}, scheme="ftp")


def test_registration_tags_name_each_available_version() -> None:
    """Tags and meta list each model with versions, and each version; a model with none is left out."""
    tags, meta = registration({"b": [2, 1], "a": [3], "loading": []})
    assert tags == [
        "api:tfserving-rest",
        "api:v2",
        "model:a",
        "model:a:3",
        "model:b",
        "model:b:1",
        "model:b:2",
    ]
    assert meta == {"api": "tfserving-rest", "models": "a:3,b:1,b:2"}
    assert served_models(meta, tags) == ("a:3", "b:1", "b:2")
    assert model_tag("b") in tags and model_tag("b", 2) in tags


def test_served_models_reads_the_meta_or_else_the_tags() -> None:
    """A registration's versions come from its "models" meta, else its model:NAME:V tags."""
    assert served_models({"models": "a:1,b:2"}, ()) == ("a:1", "b:2")
    assert served_models({}, ("model:a", "model:a:3", "api:x")) == ("a:3",)


def test_error_body_round_trips() -> None:
    """error_text reads what error_body writes, and nothing else."""
    assert error_text(error_body("bad input")) == "bad input"
    with_id = error_body("bad input", "id-7")
    assert with_id == {"error": "bad input", "request_id": "id-7"}
    assert error_text(with_id) == "bad input"
    assert error_text({"message": "x"}) is None and error_text(["error"]) is None


def test_the_server_reads_the_deadline_header_the_client_sends() -> None:
    """The server reads the header wire.http names: a bad value there is a 400 naming it."""
    _, treq, _ = make_api()
    response, doc = call(
        treq, "POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}', {DEADLINE_HEADER: ["x"]}
    )
    assert response.code == 400 and DEADLINE_HEADER in error_text(doc)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_client_never_imports_the_server_and_wire_only_the_standard_library() -> None:
    """client/ imports nothing from service/; wire/ imports only the standard library, and
    numpy only in wire/v2_tensors.py (the tensor bytes both sides hold as numpy arrays)."""
    for path in sorted((ROOT / "client").glob("*.py")):
        assert "service" not in _imports(path), path
    for path in sorted((ROOT / "wire").glob("*.py")):
        allowed = {"__future__", "wire"} | ({"numpy"} if path.name == "v2_tensors.py" else set())
        outside = _imports(path) - sys.stdlib_module_names - allowed
        assert not outside, (path, outside)


def test_the_server_imports_discovery_only_where_it_is_wired() -> None:
    """service/ imports discovery/ only where Consul is configured and the tree is built (the
    flags, the registration, the composition root); the rest of the server does not know it."""
    wiring = {"options.py", "registration.py", "tap.py"}
    for path in sorted((ROOT / "service").rglob("*.py")):
        if path.name not in wiring or path.parent != ROOT / "service":
            assert "discovery" not in _imports(path), path
