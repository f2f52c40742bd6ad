"""The HTTP endpoint that serves ``/metrics`` (``flctl serve --metrics-address HOST:PORT``).

It speaks plain HTTP with no login, like most Prometheus exporters, so it listens on a
loopback address unless remote scraping is asked for explicitly (``--metrics-allow-remote``,
``server.metrics_allow_remote``): the metrics carry no client ids, but they tell anyone who
can reach them how the federation is doing.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from flctl.core.errors import ConfigError, ConnectError

__all__ = ["MetricsServer", "parse_metrics_address"]

_HINT = "give --metrics-address HOST:PORT (server.metrics_address), e.g. 127.0.0.1:9464"


def parse_metrics_address(address: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """Split and check ``HOST:PORT`` (``[v6]:PORT`` too) for the metrics endpoint.

    Args:
        address: ``HOST:PORT``; port 0 picks a free port.
        allow_remote: Accept a host that is not a loopback address (0.0.0.0, a LAN address).

    Returns:
        The host (without brackets) and the port.

    Raises:
        ConfigError: The address is malformed, or not a loopback one and ``allow_remote``
            is False.
    """
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics address {address!r} is not HOST:PORT", hint=_HINT)
    if not allow_remote and not _is_loopback(host):
        raise ConfigError(
            f"refusing to serve /metrics on {address!r}: not a loopback address, and the "
            "endpoint has no TLS and no login",
            hint="bind 127.0.0.1 and scrape from this machine, or pass --metrics-allow-remote "
            "(server.metrics_allow_remote = true) to let the network reach it",
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """Serves a registry in the Prometheus text format over HTTP, from a daemon thread.

    Args:
        registry: The metrics to serve (a :class:`MetricsCollector`'s registry).
        address: ``HOST:PORT`` to listen on; port 0 picks a free port.
        allow_remote: Accept a host that is not a loopback address.

    Raises:
        ConfigError: The address is malformed, or refused (see :func:`parse_metrics_address`).
        ConnectError: It cannot be bound (the port is in use, the host is not this machine's).
    """

    def __init__(
        self, registry: CollectorRegistry, address: str, *, allow_remote: bool = False
    ) -> None:
        host, port = parse_metrics_address(address, allow_remote=allow_remote)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise _bind_failure(address, port, exc) from None
        bound_port = int(self._httpd.server_port)
        shown = f"[{host}]" if ":" in host else host
        #: ``HOST:PORT`` it listens on (the bound port where 0 was asked for).
        self.address = f"{shown}:{bound_port}"
        #: The URL to scrape.
        self.url = f"http://{self.address}/metrics"
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop listening; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _bind_failure(address: str, port: int, exc: OSError) -> ConnectError:
    """The operating system's reason, in flctl's words (as ``serve --address`` says it)."""
    if isinstance(exc, socket.gaierror):
        reason = "its host cannot be resolved"
    elif exc.errno == errno.EADDRINUSE:
        reason = f"port {port} is already in use"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "the host is not an address of this machine"
    elif exc.errno == errno.EACCES:
        reason = f"no permission to listen on port {port}"
    else:
        reason = exc.strerror or str(exc)
    return ConnectError(
        f"cannot serve /metrics on {address}: {reason}",
        hint="pick another --metrics-address HOST:PORT (server.metrics_address)",
    )
