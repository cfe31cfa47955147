"""twistd options as plain data: flags named as TF Serving's, bad ones refused with a helpful message."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
from twisted.python import usage

from harness.twistd import TWISTD
from service.model_config import VersionPolicy
from service.options import DEFAULT_PORT, DiscoveryConfig, Options, ServerConfig, _advertised


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_tf_serving_flags_build_the_config(tmp_path) -> None:
    """--model_name, --model_base_path, --rest_api_port and --enable_batching land in the config."""
    config = parse(
        f"--model_base_path={tmp_path}",
        "--model_name=digits",
        "--rest_api_port=9000",
        "--enable_batching",
    ).config
    assert config.listen == "tcp:9000"
    ((model),) = config.models
    assert (model.name, model.base_path) == ("digits", tmp_path.resolve())
    assert model.policy == VersionPolicy("latest", num_versions=1)
    assert config.batching.enabled and model.batching.enabled
    assert config.model_config_file is None


def test_http_limit_flags_land_in_the_config(tmp_path) -> None:
    """--request_header_timeout (default 30 s) and --max_request_bytes land in the config."""
    assert parse(f"--model_base_path={tmp_path}").config.request_header_timeout == 30.0
    config = parse(
        f"--model_base_path={tmp_path}", "--request_header_timeout=2.5", "--max_request_bytes=10"
    ).config
    assert (config.request_header_timeout, config.max_request_bytes) == (2.5, 10)


def test_read_timeout_and_connection_limit_flags_land_in_the_config(tmp_path) -> None:
    """--request_read_timeout (default 60 s) and --max_connections (default 1024) land in
    the config."""
    defaults = parse(f"--model_base_path={tmp_path}").config
    assert (defaults.request_read_timeout, defaults.max_connections) == (60.0, 1024)
    config = parse(
        f"--model_base_path={tmp_path}", "--request_read_timeout=7.5", "--max_connections=3"
    ).config
    assert (config.request_read_timeout, config.max_connections) == (7.5, 3)


def test_a_model_config_file_configures_several_models(tmp_path) -> None:
    """--model_config_file brings TF Serving's models, policies and labels, with each model's
    own batching_parameters.txt, and the poll/retry flags land in the config."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "batching_parameters.txt").write_text("max_batch_size { value: 8 }\n")
    config_file = tmp_path / "models.config"
    config_file.write_text(
        f"""model_config_list {{
          config {{ name: 'a' base_path: '{tmp_path / "a"}' model_platform: 'tensorflow'
                   model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
                   version_labels {{ key: 'stable' value: 1 }} }}
          config {{ name: 'b' base_path: '{tmp_path / "b"}' model_platform: 'tensorflow' }}
        }}"""
    )
    config = parse(
        f"--model_config_file={config_file}",
        "--enable_batching",
        "--model_config_file_poll_wait_seconds=30",
        "--file_system_poll_wait_seconds=5",
        "--max_num_load_retries=2",
        "--load_retry_interval_micros=500000",
        "--default_model=b",
    ).config
    a, b = config.models
    assert a.name == "a" and a.policy == VersionPolicy("specific", versions=frozenset({1, 2}))
    assert dict(a.labels) == {"stable": 1}
    assert a.batching.max_batch_size == 32 and b.batching.max_batch_size == 8
    assert config.model_config_file == config_file.resolve()
    assert (config.model_config_file_poll_wait, config.file_system_poll_wait) == (30, 5)
    assert (config.max_load_retries, config.load_retry_interval) == (2, 0.5)
    assert config.default_model == "b"


def test_listen_takes_an_endpoint_string(tmp_path) -> None:
    """--listen passes any Twisted endpoint string through; the default is tcp:8501."""
    assert (
        parse(f"--model_base_path={tmp_path}", "--listen=unix:/tmp/x.sock").config.listen
        == "unix:/tmp/x.sock"
    )
    assert parse(f"--model_base_path={tmp_path}").config.listen == "tcp:8501"


def test_http_processes_default_to_one(tmp_path) -> None:
    """--http_processes is 1 (this process alone) unless given."""
    base = f"--model_base_path={tmp_path}"
    assert parse(base).config.http_processes == 1
    assert parse(base, "--http_processes=3").config.http_processes == 3


def test_grpc_is_on_port_8500_by_default_as_in_tf_serving(tmp_path) -> None:
    """--port (TF Serving's gRPC flag, 8500) on all interfaces; 0 is off; --grpc_listen wins."""
    base = f"--model_base_path={tmp_path}"
    assert parse(base).config.grpc_listen == "0.0.0.0:8500"
    assert parse(base, "--port=9000").config.grpc_listen == "0.0.0.0:9000"
    assert parse(base, "--port=0").config.grpc_listen is None
    assert parse(base, "--grpc_listen=[::1]:7000").config.grpc_listen == "[::1]:7000"
    assert parse(base, "--grpc_max_receive_bytes=1000").config.grpc_max_receive_bytes == 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--model_base_path .* or --model_config_file is required"),
        (("--model_base_path={tmp}", "--model_config_file={tmp}/m.config"), "not both"),
        (("--model_config_file={tmp}/missing.config",), "cannot read"),
        (("--model_base_path={tmp}", "--default_model=other"), "not a served model"),
        (("--model_base_path={tmp}", "--max_num_load_retries=-1"), "0 or more"),
        (("--model_base_path={tmp}", "--model_config_file_poll_wait_seconds=-1"), "0 or more"),
        (("--model_base_path=/nonexistent/x",), "is not a folder"),
        (("--model_base_path={tmp}", "--rest_api_port=70000"), "between 0 and 65535"),
        (("--model_base_path={tmp}", "--rest_api_port=1", "--listen=tcp:2"), "not both"),
        (("--model_base_path={tmp}", "--listen="), "--listen is empty"),
        (("--model_base_path={tmp}", "--model_name=a/b"), "may not contain"),
        (("--model_base_path={tmp}", "--max_request_bytes=0"), "must be positive"),
        (("--model_base_path={tmp}", "--request_header_timeout=0"), "timeout must be positive"),
        (("--model_base_path={tmp}", "--request_read_timeout=0"), "timeout must be positive"),
        (("--model_base_path={tmp}", "--max_connections=0"), "connections must be positive"),
        (("--model_base_path={tmp}", "--max_connections=many"), "--max_connections takes"),
        (("--model_base_path={tmp}", "--rest_api_port=http"), "rest_api_port"),
        (("--model_base_path={tmp}", "--port=70000"), "--port must be between 0 and 65535"),
        (("--model_base_path={tmp}", "--grpc_listen=8500"), "--grpc_listen takes host:port"),
        (("--model_base_path={tmp}", "--grpc_listen=h:0"), "--grpc_listen takes host:port"),
        (("--model_base_path={tmp}", "--grpc_max_calls=0"), "--grpc_max_calls must be positive"),
        (("--model_base_path={tmp}", "--grpc_threads=64"), "--grpc_max_calls .default 256. bounds"),
        (
            ("--model_base_path={tmp}", "--num_request_iterations_for_warmup=-1"),
            "--num_request_iterations_for_warmup must be 0 or more",
        ),
        (("--model_base_path={tmp}", "--grpc_max_receive_bytes=-1"), "0 \\(unbounded\\)"),
        (("--model_base_path={tmp}", "--http_processes=0"), "between 1 and 64"),
        (
            ("--model_base_path={tmp}", "--http_processes=2", "--listen=unix:/tmp/x.sock"),
            "needs a TCP --listen",
        ),
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, args, message) -> None:
    """Each bad flag raises UsageError with a message saying what to change."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*(a.format(tmp=tmp_path) for a in args))


def test_twistd_help_does_not_import_tensorflow() -> None:
    """Loading the plugin and the options for --help never imports TensorFlow."""
    code = (
        "import sys; from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "maker = [p for p in getPlugins(IServiceMaker) if p.tapname == 'inference'][0];"
        "maker.options().getUsage(); print('tensorflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert TWISTD.exists()


def test_a_front_process_imports_no_tensorflow() -> None:
    """What a front process of --http_processes imports (service.front: the HTTP routes,
    the remote data plane) leaves TensorFlow and its protos out of sys.modules."""
    code = (
        "import sys, service.front; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'keras')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("advertise", "listen", "expected"),
    [
        (None, "tcp:8501:interface=127.0.0.1", ("127.0.0.1", None)),
        (None, r"tcp:8501:interface=\:\:1", ("::1", None)),
        # All interfaces: the local Consul agent's address is registered (None until asked).
        (None, "tcp:8501", (None, None)),
        (None, "ssl:8443:interface=0.0.0.0:privateKey=k.pem", (None, None)),
        (None, r"tcp:8501:interface=\:\:", (None, None)),
        ("10.0.0.5", "tcp:8501", ("10.0.0.5", None)),
        ("10.0.0.5:9000", "tcp:8501", ("10.0.0.5", 9000)),
        ("[::1]:9000", "tcp:8501", ("::1", 9000)),
    ],
)
def test_advertised_address(advertise, listen, expected) -> None:
    """The registered address comes from --advertise, else from --listen's interface (escapes undone)."""
    assert _advertised(advertise, listen) == expected


def test_a_tls_server_is_checked_over_https_verified_unless_asked(tmp_path) -> None:
    """Consul's readiness check speaks the port's protocol: https for an ssl: --listen."""
    plain = parse(
        f"--model_base_path={tmp_path}", "--consul=127.0.0.1:8500", "--rest_api_port=8501"
    )
    assert plain.config.discovery.check_scheme == "http"
    assert plain.config.discovery.advertise_host is None  # the agent's, asked at start
    tls = parse(
        f"--model_base_path={tmp_path}",
        "--consul=127.0.0.1:8500",
        "--listen=ssl:8443:privateKey=key.pem:certKey=cert.pem",
        "--consul_check_tls_skip_verify",
    )
    assert tls.config.discovery.check_scheme == "https"
    assert tls.config.discovery.check_tls_skip_verify


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--consul=127.0.0.1:8500", "--listen=unix:/tmp/inference.sock"), "needs --advertise"),
        (("--consul=127.0.0.1:8500", "--advertise=a:b:c"), "expected HOST"),
        (
            ("--consul=127.0.0.1:8500", "--advertise=h", "--deregister_critical_after=0"),
            "must be positive",
        ),
        (
            ("--consul=127.0.0.1:8500", "--advertise=h", "--overload_fraction=1.5"),
            "overload_fraction",
        ),
    ],
)
def test_bad_discovery_flags_are_usage_errors(tmp_path, args, message) -> None:
    """Consul flags that cannot work stop start-up with a message naming the flag."""
    with pytest.raises(usage.UsageError, match=message):
        parse(f"--model_base_path={tmp_path}", *args)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model_config_list { config { nmae: 'a' base_path: '/x' } }", 'no field named "nmae"'),
        (
            "model_config_list { config { name: 'a' base_path: '/x' model_platform: 'pytorch' } }",
            "model_platform",
        ),
        ("model_config_list { }", "configures no model"),
    ],
)
def test_a_bad_model_config_file_stops_start_up_naming_the_field(tmp_path, text, message) -> None:
    """A config file TF Serving would refuse stops start-up with the field named."""
    config_file = tmp_path / "models.config"
    config_file.write_text(text)
    with pytest.raises(usage.UsageError, match=message):
        parse(f"--model_config_file={config_file}")


def test_flag_defaults_are_the_config_defaults(tmp_path) -> None:
    """With no flag given, every defaulted ServerConfig field holds its own default."""
    config = parse(f"--model_base_path={tmp_path}").config
    derived = {"models", "batching", "listen"}  # built from other flags, no default of their own
    for field in attrs.fields(ServerConfig):
        if field.name not in derived:
            assert getattr(config, field.name) == field.default, field.name
    assert config.listen == f"tcp:{DEFAULT_PORT}"


def test_consul_flag_defaults_are_the_discovery_config_defaults(tmp_path) -> None:
    """With only --consul and --advertise, the registration takes DiscoveryConfig's defaults."""
    discovery = parse(
        f"--model_base_path={tmp_path}", "--consul=127.0.0.1:8500", "--advertise=h"
    ).config.discovery
    for field in attrs.fields(DiscoveryConfig):
        if field.default is not attrs.NOTHING:
            assert getattr(discovery, field.name) == field.default, field.name
