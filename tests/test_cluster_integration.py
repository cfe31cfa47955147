"""scripts/cluster for real: a 2-server fleet in network namespaces (root only), reached through
its nginx proxy and directly with the client library, one link taken down under load, and
nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from harness.cluster import AGENT, PREFIX, PROXY_PORT, Cluster
from harness.netns import exec_prefix, missing_privileges, namespaces
from harness.twistd import REPO, unexpected_errors

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(missing_privileges() is not None, reason=str(missing_privileges())),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]


def load(cluster: Cluster, *where: str, calls: int, seconds: float = 60) -> subprocess.Popen[str]:
    """The bench's load generator on the client host: ``calls`` predicts, 8 in flight."""
    command = [
        *exec_prefix(cluster.host("client").netns), sys.executable, "-m",
        "scripts.benchmarks.scaleout_load", *where, "--model", "digits", "--shape", "4,28,28,1",
        "--concurrency", "8",
        "--calls", str(calls), "--seconds", str(seconds),
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def result(process: subprocess.Popen[str]) -> dict:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def test_two_server_cluster_serves_through_proxy_and_directly_and_leaves_nothing(tmp_path):
    """Both servers pass at the client host's agent; calls through nginx and direct calls are
    answered, by both servers; with one link down mid-run no direct call fails; teardown
    removes every namespace (bridge and veths with them) and stops every process."""
    cluster = Cluster(servers=2, workdir=tmp_path / "cluster", say=lambda line: None)
    try:
        cluster.up()
        for host in cluster.server_hosts:
            cluster.start_server(host.name)
        for host in cluster.server_hosts:
            cluster.wait_server(host.name)
        addresses = [f"{h.address}:8501" for h in cluster.server_hosts]
        assert cluster.wait_passing(2) == addresses
        cluster.proxy_serves(2)

        proxied = result(
            load(cluster, "--proxy", f"{cluster.host('proxy').address}:{PROXY_PORT}", calls=20)
        )
        assert (proxied["ok"], proxied["failed"]) == (20, 0)

        direct = result(load(cluster, "--consul", AGENT, calls=100))
        assert (direct["ok"], direct["failed"]) == (100, 0)
        assert sorted(direct["answered_by_server"]) == addresses

        running = load(cluster, "--consul", AGENT, calls=100_000, seconds=10)
        time.sleep(5)  # under way (it starts with a few calls before it counts)
        cluster.set_link("srv2", up=False)
        during = result(running)
        assert during["failed"] == 0, during["failures"]
        lost = sum(n for outcome, n in during["attempt_outcomes"].items() if outcome != "ok")
        assert lost > 0, "no attempt met the dead link: the test did not test it"
        procs = list(cluster.procs.values())
        agents = list(cluster.agents.values())
    finally:
        cluster.down()
    servers = [p for p in procs if p.name.startswith("srv")]
    for server in servers:  # their stops (leaving Consul, draining) included
        assert unexpected_errors(server.log_path.read_text(), []) == [], server.name
    assert namespaces(PREFIX) == []
    assert not any(p.running() for p in procs)
    assert not any(a.running for a in agents)
