"""The cluster's central proxy: nginx's configuration, and its upstreams kept in step with
Consul's health listing.

``render_config`` and ``render_upstreams`` are pure. ``python -m harness.nginx watch …`` is
the small watch loop (what consul-template would do): a blocking query on
``/v1/health/service/NAME?passing`` at the local agent; on every change it rewrites the
upstreams file and runs ``nginx -s reload``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from discovery.backends import Backend
from discovery.consul import (
    ConsulFailure,
    ConsulResponse,
    build_health_service,
    next_index,
    parse_health_service,
)

UPSTREAM = "inference"
# nginx refuses an upstream block without a server: this one is marked down, so an empty
# listing answers 502 at once instead of failing the reload.
NO_SERVER = "    server 127.0.0.1:9 down;"


def render_upstreams(backends: Iterable[Backend], name: str = UPSTREAM) -> str:
    """The ``upstream`` block for the passing ``backends``, in a stable order."""
    servers = sorted({(b.address, b.port) for b in backends})
    lines = [f"upstream {name} {{", "    least_conn;", "    keepalive 64;"]
    # max_fails/fail_timeout: nginx's own passive ejection, the proxy's counterpart of the
    # client's: after one failure a server gets no requests for 1 s.
    lines += [f"    server {host}:{port} max_fails=1 fail_timeout=1s;" for host, port in servers]
    if not servers:
        lines.append(NO_SERVER)
    return "\n".join([*lines, "}", ""])


def render_config(run_dir: Path, listen: int, upstreams: Path) -> str:
    """nginx.conf for one worker proxying everything to ``UPSTREAM``: bodies kept in memory,
    keep-alive upstream connections, a failed or timed-out attempt retried on another server
    (inference calls are idempotent, hence ``non_idempotent``). An attempt waits 2 s for an
    answer: what the bench's client library allows one attempt (its 6 s deadline over 3)."""
    return f"""\
worker_processes 1;
user root;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 64m;
    client_body_buffer_size 16m;
    client_body_temp_path {run_dir}/body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    include {upstreams};
    server {{
        listen {listen};
        location / {{
            proxy_pass http://{UPSTREAM};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 64 64k;
            proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 1s;
            proxy_send_timeout 2s;
            proxy_read_timeout 2s;
        }}
    }}
}}
"""


def _get(consul: str, index: int, service: str, wait: float) -> ConsulResponse:
    request = build_health_service(service, passing=True, index=index, wait=wait)
    try:
        with urllib.request.urlopen(
            request.url(f"http://{consul}"), timeout=request.timeout(5.0)
        ) as answer:
            return ConsulResponse(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as e:
        return ConsulResponse(e.code, dict(e.headers), e.read())


def watch(
    consul: str, service: str, upstreams: Path, reload: list[str], wait: float = 30.0
) -> None:
    """Keep ``upstreams`` equal to the passing instances of ``service``; reload on change."""
    index, written, failures = 0, None, 0
    while True:
        try:
            returned, backends = parse_health_service(_get(consul, index, service, wait))
        except (OSError, ConsulFailure) as e:
            failures += 1
            delay = min(5.0, 0.2 * 2**failures) * random.uniform(0.5, 1.0)
            print(f"nginx watch: {e}; again in {delay:.1f} s", flush=True)
            time.sleep(delay)
            continue
        failures = 0
        index = next_index(index, returned)
        text = render_upstreams(backends)
        if text != written:
            upstreams.write_text(text)
            written = text
            done = subprocess.run(reload, capture_output=True, text=True, check=False)
            servers = [f"{b.address}:{b.port}" for b in backends]
            print(
                f"nginx watch: {len(servers)} passing {servers}; reload exit {done.returncode}"
                + (f": {done.stderr.strip()}" if done.returncode else ""),
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.nginx")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="keep the upstreams file in step with Consul")
    w.add_argument("--consul", default="127.0.0.1:8500")
    w.add_argument("--service", default="inference")
    w.add_argument("--upstreams", type=Path, required=True)
    w.add_argument("--config", type=Path, required=True)
    w.add_argument("--prefix", type=Path, required=True)
    args = parser.parse_args(argv)
    reload = ["nginx", "-p", str(args.prefix), "-c", str(args.config), "-s", "reload"]
    watch(args.consul, args.service, args.upstreams, reload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
