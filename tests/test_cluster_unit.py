"""The pure pieces of scripts/cluster and ``scripts/bench scaleout``: nginx upstreams from a
Consul health listing, veth counters, tc commands, host addresses, the report's figures."""

from __future__ import annotations

import json

import pytest

from discovery.consul import ConsulResponse, parse_health_service
from harness.cluster import plan_hosts
from harness.netns import LinkBytes, Shaping, parse_counters, shaping_commands
from harness.nginx import NO_SERVER, render_config, render_upstreams
from scripts.benchmarks.scaleout import stopped_sending
from scripts.benchmarks.scaleout_report import link_capacity_rps, summary_line


def health_listing(*instances: tuple[str, str, int]) -> ConsulResponse:
    """A ``/v1/health/service`` answer: (node, service address, port) per instance."""
    entries = [
        {
            "Node": {"Node": node, "Address": "10.0.0.1"},
            "Service": {"ID": f"inference-{node}", "Address": address, "Port": port},
            "Checks": [{"Status": "passing"}],
        }
        for node, address, port in instances
    ]
    return ConsulResponse(200, {"X-Consul-Index": "7"}, json.dumps(entries).encode())


def test_upstreams_list_every_passing_instance_once_in_a_stable_order():
    """Each instance of the listing is one server line, sorted, whatever the listing's order."""
    _, backends = parse_health_service(
        health_listing(("b", "10.213.0.12", 8501), ("a", "10.213.0.11", 8501))
    )
    text = render_upstreams(backends)
    servers = [line.split()[1] for line in text.splitlines() if line.strip().startswith("server")]
    assert servers == ["10.213.0.11:8501", "10.213.0.12:8501"]
    assert text.startswith("upstream inference {") and text.rstrip().endswith("}")
    assert NO_SERVER not in text


def test_upstreams_of_an_empty_listing_hold_one_server_marked_down():
    """nginx needs a server in an upstream block: an empty listing gives one marked down."""
    _, backends = parse_health_service(health_listing())
    text = render_upstreams(backends)
    assert NO_SERVER in text
    assert text.count("server ") == 1


def test_node_address_stands_in_for_an_empty_service_address():
    """An instance registered without an address is reached at its node's, as Consul's DNS does."""
    _, backends = parse_health_service(health_listing(("a", "", 8501)))
    assert "server 10.0.0.1:8501 " in render_upstreams(backends)


def test_config_includes_the_upstreams_and_retries_idempotent_calls(tmp_path):
    """The proxy config reads the rendered upstreams and retries a failed attempt elsewhere."""
    text = render_config(tmp_path, 80, tmp_path / "upstreams.conf")
    assert f"include {tmp_path / 'upstreams.conf'};" in text
    assert "listen 80;" in text
    assert "proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;" in text


def test_counters_are_read_from_the_bridge_side():
    """The bridge end receives what the host sends: its rx is the host's sent bytes."""
    counters = parse_counters("v-proxy 1000 250\nv-srv1 7 9\n\n")
    assert counters == {"v-proxy": LinkBytes(sent=1000, received=250), "v-srv1": LinkBytes(7, 9)}
    assert counters["v-proxy"] - LinkBytes(400, 50) == LinkBytes(600, 200)


@pytest.mark.parametrize("line", ["v-srv1 12", "v-srv1 12 x", "v-srv1 1 2 3"])
def test_malformed_counter_lines_are_refused(line):
    """A line that is not ``PEER RX TX`` in whole numbers raises, naming the line."""
    with pytest.raises(ValueError, match="unexpected counters line"):
        parse_counters(line)


def test_shaping_caps_both_ends_and_delays_under_the_cap():
    """tbf caps each end of the link; netem, when asked for, hangs under the tbf."""
    commands = shaping_commands("ks-net", "ks-srv1", "v-srv1", Shaping("50mbit", "1ms"))
    assert [c[:7] for c in commands] == [
        ["tc", "-n", "ks-srv1", "qdisc", "replace", "dev", "eth0"],
        ["tc", "-n", "ks-srv1", "qdisc", "replace", "dev", "eth0"],
        ["tc", "-n", "ks-net", "qdisc", "replace", "dev", "v-srv1"],
        ["tc", "-n", "ks-net", "qdisc", "replace", "dev", "v-srv1"],
    ]
    assert commands[0][7:12] == ["root", "handle", "1:", "tbf", "rate"] and "50mbit" in commands[0]
    assert commands[1][7:12] == ["parent", "1:1", "handle", "10:", "netem"]


def test_shaping_without_rate_or_delay_adds_nothing():
    """An uncapped, undelayed link gets no qdisc at all."""
    assert shaping_commands("ks-net", "ks-client", "v-client", Shaping(None, None)) == []
    delay_only = shaping_commands("ks-net", "ks-client", "v-client", Shaping(None, "5ms"))
    assert all(c[7] == "root" and "netem" in c for c in delay_only)


def test_hosts_have_distinct_names_addresses_and_short_link_names():
    """Every host has its own address and namespace; link names fit Linux's 15 characters."""
    hosts = plan_hosts(4)
    assert [h.name for h in hosts] == ["consul", "proxy", "client", "srv1", "srv2", "srv3", "srv4"]
    assert len({h.address for h in hosts}) == len(hosts)
    assert all(len(h.peer) <= 15 and h.netns.startswith("ks-") for h in hosts)
    with pytest.raises(ValueError):
        plan_hosts(0)


def test_client_stopped_sending_at_the_last_attempt_before_a_pause():
    """The stop time is the last attempt before the first 2 s pause after the failure."""
    times = [9.0, 10.1, 10.4, 11.0, 20.0, 20.5]
    assert stopped_sending(times, injected=10.0) == 1.0
    assert stopped_sending([9.0, 9.5], injected=10.0) == 0.0  # nothing sent after it
    assert stopped_sending([10.5, 11.5, 12.5], injected=10.0) is None  # never paused


def test_summary_line_and_link_capacity():
    """The last line compares N=3's two paths; a link's capacity is its rate over a request."""
    results = {
        "meta": {"rate": "200mbit", "request_bytes": 200_000},
        "points": [
            {"servers": 3, "mode": "direct", "rps": 300.0},
            {"servers": 3, "mode": "proxy", "rps": 100.0},
        ],
    }
    assert (
        summary_line(results) == "scaleout N=3: direct 300.0 req/s, proxy 100.0 req/s, ratio 3.00"
    )
    assert link_capacity_rps(results) == pytest.approx(125.0)
    assert summary_line({**results, "points": results["points"][:1]}) is None
