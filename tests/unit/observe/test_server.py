"""MetricsServer: a real HTTP endpoint on loopback; bad, refused and busy addresses."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flctl.core import Event
from flctl.core import events as ev
from flctl.core.errors import ConfigError, ConnectError
from flctl.observe import MetricsCollector, MetricsServer, parse_metrics_address


def test_serves_the_collectors_metrics_over_http() -> None:
    collector = MetricsCollector()
    collector.observe(
        Event(seq=1, time=1.0, type=ev.ROUND_FAILED, server_round=1, data={"reason": "x"})
    )
    with MetricsServer(collector.registry, "127.0.0.1:0") as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(server.url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    failed = [s for s in families["flctl_rounds"].samples if s.labels.get("status") == "failed"]
    assert [s.value for s in failed if s.name == "flctl_rounds_total"] == [1.0]
    # closed: nothing listens there any more
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


@pytest.mark.parametrize(
    "address", ["", "9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:port", "127.0.0.1:70000", ":80"]
)
def test_a_malformed_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        parse_metrics_address(address)


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "192.168.1.10:9464", "[::]:9464", "h:1"])
def test_a_non_loopback_address_needs_allow_remote(address: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address") as info:
        parse_metrics_address(address)
    assert "--metrics-allow-remote" in (info.value.hint or "")
    host, port = parse_metrics_address(address, allow_remote=True)
    assert port in (9464, 1) and "[" not in host


@pytest.mark.parametrize("address", ["127.0.0.1:9464", "localhost:0", "[::1]:9464", "127.1.2.3:5"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    host, _ = parse_metrics_address(address)
    assert host in ("127.0.0.1", "localhost", "::1", "127.1.2.3")


def test_a_busy_port_is_said_plainly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConnectError, match=f"port {port} is already in use"):
            MetricsServer(MetricsCollector().registry, f"127.0.0.1:{port}")


def test_an_address_of_another_machine_is_said_plainly() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine
    with pytest.raises(ConnectError, match="not an address of this machine"):
        MetricsServer(MetricsCollector().registry, "192.0.2.1:0", allow_remote=True)
