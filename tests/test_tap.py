"""twistd options as plain data: flags named as TF Serving's, bad ones refused with a helpful message."""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.python import usage

from service.tap import Options, _advertised
from tests.server import TWISTD


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
    assert config.model_name == "digits"
    assert config.model_base_path == tmp_path.resolve()
    assert config.batching.enabled


def test_listen_takes_an_endpoint_string(tmp_path) -> None:
    """--listen passes any Twisted endpoint string through; the default is tcp:8501."""
    assert (
        parse(f"--model_base_path={tmp_path}", "--listen=unix:/tmp/x.sock").config.listen
        == "unix:/tmp/x.sock"
    )
    assert parse(f"--model_base_path={tmp_path}").config.listen == "tcp:8501"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--model_base_path is required"),
        (("--model_base_path=/nonexistent/x",), "is not a folder"),
        (("--model_base_path={tmp}", "--rest_api_port=70000"), "between 0 and 65535"),
        (("--model_base_path={tmp}", "--rest_api_port=1", "--listen=tcp:2"), "not both"),
        (("--model_base_path={tmp}", "--model_name=a/b"), "may not contain"),
        (("--model_base_path={tmp}", "--max_request_bytes=0"), "must be positive"),
        (("--model_base_path={tmp}", "--rest_api_port=http"), "rest_api_port"),
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


@pytest.mark.parametrize(
    ("advertise", "listen", "expected"),
    [
        (None, "tcp:8501:interface=127.0.0.1", ("127.0.0.1", None)),
        (None, r"tcp:8501:interface=\:\:1", ("::1", None)),
        ("10.0.0.5", "tcp:8501", ("10.0.0.5", None)),
        ("10.0.0.5:9000", "tcp:8501", ("10.0.0.5", 9000)),
        ("[::1]:9000", "tcp:8501", ("::1", 9000)),
    ],
)
def test_advertised_address(advertise, listen, expected) -> None:
    """The registered address comes from --advertise, else from --listen's interface (escapes undone)."""
    assert _advertised(advertise, listen) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--consul=127.0.0.1:8500", "--listen=tcp:8501"), "needs --advertise"),
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
