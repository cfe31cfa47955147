"""``inference-client``: the command line of the client library.

    inference-client backends                       healthy backends, their models and load
    inference-client predict digits --json '{"instances": [...]}' [--protocol rest|grpc|v2|auto]
    inference-client classify --model digits samples/*.png photos/
    inference-client metadata digits
    inference-client status digits

Backends come from Consul (``--consul``, default ``$CONSUL_HTTP_ADDR`` or
``127.0.0.1:8500``) or from ``--backend HOST:PORT`` given once per server. ``--protocol``
says how ``predict`` travels, as ``AsyncInferenceClient(protocol=…)`` does: ``rest`` sends the
TF Serving body as is and prints the server's answer; ``auto`` (the default), ``v2`` and
``grpc`` send the body's tensors (``client.cli_tensors``) and print the answer as TF Serving
writes it. ``--ca-file PEM`` verifies TLS servers (those registered with ``scheme: https``, and
every ``--backend`` when given) against that CA. The other commands are TF Serving REST calls whatever the protocol. The command
runs the ``AsyncInferenceClient`` on its own reactor; exit status 0 is success, 1 a
failed call (or any failed file), 2 a usage error.

For servers started with ``--auth_token_file``, the bearer token comes from ``--token-file
PATH`` (a file holding one token; blank lines and ``#`` comments are left out) or from
``$KLEINSERVE_TOKEN``; the file wins when both are given. It is sent with every call,
``backends``'s reads of ``/metrics`` included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from client import cli_tensors
from client.async_client import PROTOCOLS, AsyncInferenceClient, BackendInfo
from client.errors import InferenceError
from client.progress import Progress
from client.report import (
    FileResult,
    collect_images,
    metric_sum,
    output_format,
    summary,
    write_results,
)
from client.transport import HTTPRequest, TreqTransport, describe
from discovery.consul import ConsulAddress
from wire.auth import AUTHORIZATION_HEADER, bearer, parse_tokens, token_problem
from wire.consul_tags import scheme_of

__all__ = ["build_parser", "main", "make_client", "parse_backend", "read_token", "token_of"]

#: The environment variable holding the bearer token, when --token-file is not given.
TOKEN_ENV = "KLEINSERVE_TOKEN"


def parse_backend(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; ``argparse.ArgumentTypeError`` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8501)")
    return host, int(port)


def read_token(path: Path) -> str:
    """The one token of a token file (``wire.auth``'s format); ValueError or OSError saying
    what is wrong with the file, never what is in it."""
    try:
        tokens = parse_tokens(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if len(tokens) != 1:
        raise ValueError(f"{path} holds {len(tokens)} tokens; a client's token file holds one")
    return tokens[0]


def token_of(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token to send: ``--token-file``'s, else ``$KLEINSERVE_TOKEN``, else None."""
    if token_file:
        return read_token(Path(token_file))
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    problem = token_problem(token)
    if problem is not None:
        raise ValueError(f"${TOKEN_ENV} is not a bearer token: it is {problem}")
    return token


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes. They are accepted before and after the command; a
    command's own parser leaves them unset unless given, so the top-level value stands."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--consul",
        default=default(os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"),
        help="Consul agent, host:port or http[s]://host:port (default: $CONSUL_HTTP_ADDR "
        "or 127.0.0.1:8500)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        type=parse_backend,
        default=default(None),
        metavar="HOST:PORT",
        help="a server to call instead of asking Consul (repeat for several)",
    )
    parser.add_argument(
        "--service", default=default("inference"), help="Consul service name (default inference)"
    )
    parser.add_argument(
        "--ca-file",
        default=default(None),
        metavar="PEM",
        help="verify TLS servers' certificates against the CA certificates in this PEM file "
        "(default: the system's trusted CAs); with --backend, call the servers over https",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=default(30.0),
        help="seconds per call, retries included (default 30)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=default("auto"),
        help="how predict travels: auto (default) the Open Inference Protocol with binary "
        "tensors to servers whose Consul tags say api:v2 and TF Serving REST JSON to the "
        "others; rest TF Serving REST JSON (the body as is); v2 the Open Inference Protocol; "
        "grpc TF Serving's gRPC API (needs tensorflow-serving-api). Other commands use REST",
    )
    parser.add_argument(
        "--token-file",
        default=default(None),
        metavar="PATH",
        help=f"a file holding the bearer token for servers started with --auth_token_file "
        f"(default: ${TOKEN_ENV}, if set; the file wins over it)",
    )
    parser.add_argument(
        "--attempt-timeout",
        type=_seconds,
        default=default(None),
        metavar="SECONDS",
        help="seconds one attempt waits for an answer before it is cancelled and retried on "
        "another server (default: the --timeout divided by the 3 attempts a call may make)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-client",
        description="Call kleinserve servers found in Consul (or listed with --backend).",
    )
    _global_options(parser, defaults=True)
    parser.set_defaults(token=None)  # main() reads it from --token-file or the environment
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backends = commands.add_parser(
        "backends", parents=[common], help="list healthy backends, models and load"
    )
    backends.add_argument("--model", help="only backends serving this model")
    backends.add_argument("--json", action="store_true", help="print JSON instead of a table")

    predict = commands.add_parser(
        "predict", parents=[common], help="send a TF Serving :predict body"
    )
    predict.add_argument("model")
    predict.add_argument(
        "--json",
        dest="body",
        required=True,
        metavar="BODY",
        help='the JSON body ({"instances": …} or {"inputs": …}), @FILE to read it, - for stdin',
    )
    predict.add_argument("--version", type=int)

    classify = commands.add_parser(
        "classify", parents=[common], help="classify image files and folders"
    )
    classify.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    classify.add_argument("--model", required=True)
    classify.add_argument("--version", type=int)
    classify.add_argument("--top-k", type=_positive_int, default=1, help="labels per image")
    classify.add_argument(
        "--concurrency", type=_positive_int, default=8, help="files in flight at once"
    )
    classify.add_argument("--out", help="write results to this file instead of stdout")
    classify.add_argument("--format", choices=("csv", "json"), help="default: from --out, else csv")

    for name, text in (("metadata", "a model's signatures"), ("status", "a model's versions")):
        sub = commands.add_parser(name, parents=[common], help=f"show {text}")
        sub.add_argument("model")
        sub.add_argument("--version", type=int)
    return parser


def _read_body(text: str) -> Any:
    if text == "-":
        raw = sys.stdin.read()
    elif text.startswith("@"):
        raw = Path(text[1:]).read_text()
    else:
        raw = text
    return json.loads(raw)


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


async def _backends(reactor: Any, client: AsyncInferenceClient, args: argparse.Namespace) -> int:
    infos = await client.backends(args.model)
    probe = TreqTransport.create(
        reactor, connections_per_backend=1, connect_timeout=2.0, ca_file=args.ca_file
    )
    headers = {AUTHORIZATION_HEADER: bearer(args.token)} if args.token else {}
    try:
        loads = await defer.gatherResults([_server_load(probe, info, headers) for info in infos])
    finally:
        await probe.close()
    if args.json:
        _print_json(
            [
                {
                    "id": i.backend.service_id,
                    "address": f"{i.backend.address}:{i.backend.port}",
                    "status": i.backend.status,
                    "models": list(i.models),
                    **load,
                }
                for i, load in zip(infos, loads, strict=True)
            ]
        )
        return 0
    if not infos:
        print("no healthy backends", file=sys.stderr)
        return 1
    rows = [("ID", "ADDRESS", "MODELS", "QUEUED ROWS", "REQUESTS SERVED")]
    for info, load in zip(infos, loads, strict=True):
        rows.append(
            (
                info.backend.service_id,
                f"{info.backend.address}:{info.backend.port}",
                ",".join(info.models) or "-",
                _number(load.get("queued_rows")),
                _number(load.get("requests_served")),
            )
        )
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _number(value: Any) -> str:
    return "?" if value is None else f"{value:g}"


def _server_load(
    probe: TreqTransport, info: BackendInfo, headers: Mapping[str, str]
) -> Deferred[dict[str, Any]]:
    """Rows waiting in the server's batching queues and requests it answered, from /metrics
    (asked with ``headers``: the bearer token, for a server with --auth_metrics)."""

    async def read() -> dict[str, Any]:
        try:
            metrics = HTTPRequest(
                "GET", "/metrics", None, headers, scheme=scheme_of(info.backend.meta)
            )
            response = await probe.send(info.backend.address, info.backend.port, metrics)
        except Exception as e:  # a listing shows what it can: one dead backend is a cell
            return {"error": describe(e)}
        if response.code != 200:
            return {"error": f"/metrics answered {response.code}"}
        text = response.body.decode("utf-8", "replace")
        return {
            "queued_rows": metric_sum(text, "kleinserve_queued_rows"),
            "requests_served": metric_sum(text, "kleinserve_requests_total"),
        }

    return Deferred.fromCoroutine(read())


async def _classify(reactor: Any, client: AsyncInferenceClient, args: argparse.Namespace) -> int:
    files, problems = collect_images(args.paths)
    for problem in problems:
        print(f"inference-client: {problem}", file=sys.stderr)
    if not files:
        print("inference-client: no image files to classify", file=sys.stderr)
        return 1
    progress = Progress(len(files), sys.stderr, reactor, enabled=sys.stderr.isatty())
    results: list[FileResult | None] = [None] * len(files)
    readers = ThreadPool(minthreads=1, maxthreads=4, name="inference-client-files")
    readers.start()
    semaphore = defer.DeferredSemaphore(args.concurrency)

    async def one(index: int, path: Path) -> None:
        try:
            data = await deferToThreadPool(reactor, readers, path.read_bytes)
            ranked = await client.classify_image(
                args.model, (path.name, data), top_k=args.top_k, version=args.version
            )
            results[index] = FileResult(str(path), tuple(ranked))
        except (InferenceError, OSError, ValueError) as e:
            results[index] = FileResult(str(path), error=str(e), error_type=type(e).__name__)
        progress.advance(failed=not results[index].ok)  # type: ignore[union-attr]

    def start(index: int, path: Path) -> Deferred[None]:
        return Deferred.fromCoroutine(one(index, path))

    try:
        await defer.gatherResults([semaphore.run(start, i, p) for i, p in enumerate(files)])
    finally:
        readers.stop()
        progress.finish()
    done = [r for r in results if r is not None]
    fmt = output_format(args.format, args.out)
    if args.out:
        with open(args.out, "w", newline="") as stream:
            write_results(done, stream, fmt)
    else:
        write_results(done, sys.stdout, fmt)
    print(summary(done, progress.elapsed()), file=sys.stderr)
    if problems:
        print(
            f"  {len(problems)} path(s) skipped: not a file or a folder of images", file=sys.stderr
        )
    return 1 if problems or any(not r.ok for r in done) else 0


def make_client(reactor: Any, args: argparse.Namespace) -> AsyncInferenceClient:
    """The client the parsed global options describe (``--protocol`` for ``predict`` only:
    the other commands are TF Serving REST calls)."""
    protocol = args.protocol if args.command == "predict" else "rest"
    return AsyncInferenceClient(
        None if args.backend else args.consul,
        args.service,
        protocol=protocol,
        backends=args.backend,
        reactor=reactor,
        timeout=args.timeout,
        attempt_timeout=args.attempt_timeout,
        connections_per_backend=getattr(args, "concurrency", 8),
        token=args.token,
        ca_file=args.ca_file,
    )


async def _predict(client: AsyncInferenceClient, args: argparse.Namespace) -> None:
    if client.protocol == "rest":
        _print_json(await client.predict_json(args.model, args.body, version=args.version))
        return
    body = args.tensors
    outputs = await client.predict(
        args.model, body.inputs, version=args.version, signature_name=body.signature_name
    )
    print(cli_tensors.dumps(cli_tensors.answer_doc(outputs, body.rows)).decode())


async def run(reactor: Any, args: argparse.Namespace) -> int:
    """Run one parsed command on ``reactor``; the exit status."""
    client = make_client(reactor, args)
    try:
        if args.command == "backends":
            return await _backends(reactor, client, args)
        if args.command == "classify":
            return await _classify(reactor, client, args)
        if args.command == "predict":
            await _predict(client, args)
        elif args.command == "metadata":
            _print_json(await client.metadata(args.model, version=args.version))
        else:
            _print_json(await client.status(args.model, version=args.version))
        return 0
    except InferenceError as e:
        print(f"inference-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: parse, run on the global reactor, exit with the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "predict":
        try:
            args.body = _read_body(args.body)
            if args.protocol != "rest":
                args.tensors = cli_tensors.tensors_of(args.body)
        except (OSError, ValueError) as e:
            parser.error(f"--json: {e}")
    try:
        args.token = token_of(args.token_file, os.environ)
    except (OSError, ValueError) as e:
        parser.error(f"--token-file: {e}" if args.token_file else str(e))
    if args.ca_file is not None and not Path(args.ca_file).is_file():
        parser.error(f"--ca-file: {args.ca_file} is not a file")
    if not args.backend:
        try:
            ConsulAddress.parse(args.consul)
        except ValueError as e:
            parser.error(f"--consul: {e}")

    async def start(reactor: Any) -> None:
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(start(reactor)))


if __name__ == "__main__":
    main()
