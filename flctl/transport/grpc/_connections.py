"""Bounds on the coordinator's TCP connections, before anyone has proved who they are.

A connection costs a descriptor and memory from the moment it is accepted, long before its TLS
handshake tells who is calling. Three bounds keep unauthenticated connections from exhausting
the coordinator:

- gRPC closes a connection whose handshake has not finished within ``handshake_timeout_s``
  (``grpc.server_handshake_timeout_ms``; gRPC's own default is two minutes);
- gRPC refuses connections beyond ``max_connections`` in total
  (``grpc.max_allowed_incoming_connections``);
- :class:`ConnectionWatch` closes the newest connections of a peer address holding more than
  ``max_connections_per_peer`` (gRPC has no per-peer bound), and reports each bound it sees
  reached, so the event log says what happened.

The watch reads the kernel's table of this process's sockets (``/proc``, Linux); elsewhere it
only logs that per-peer bounds are off. It never closes a descriptor gRPC owns: it shuts the
socket down, and gRPC closes it as it would any connection its peer dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ConnectionLimits",
    "ConnectionWatch",
    "count_connections",
    "fitting_limits",
    "note_authenticated",
    "raise_descriptor_limit",
    "server_options",
]

log = logging.getLogger("flctl.transport")

#: How often the watch looks (seconds): often while a peer is over its bound, else calmly;
#: and how often it may report one peer or the total.
_SCAN_EVERY_S = 0.5
_SCAN_BUSY_S = 0.1
_REPORT_EVERY_S = 10.0
#: Descriptors kept out of the connection budget: the state database, blobs, logs, pipes.
_RESERVED_FDS = 256
_ESTABLISHED = "01"


@dataclass(frozen=True)
class ConnectionLimits:
    """What the coordinator accepts before a caller has proved who it is.

    Attributes:
        handshake_timeout_s: A connection that has not finished its TLS handshake by then is
            closed.
        max_connections: Connections at once, in total (more are refused by gRPC).
        max_connections_per_peer: Connections at once from one IP address (the newest beyond
            it are closed).
    """

    handshake_timeout_s: float = 5.0
    max_connections: int = 4096
    max_connections_per_peer: int = 256


def server_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """The server arguments for gRPC's handshake timeout and total bound."""
    return [
        ("grpc.server_handshake_timeout_ms", max(1, round(limits.handshake_timeout_s * 1000))),
        ("grpc.max_allowed_incoming_connections", max(1, limits.max_connections)),
    ]


def raise_descriptor_limit() -> int:
    """Raise this process's descriptor limit to its hard limit; return the (new) soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def fitting_limits(limits: ConnectionLimits, descriptor_limit: int) -> ConnectionLimits:
    """``limits`` with the total bound lowered to what the descriptor limit leaves room for."""
    room = max(16, descriptor_limit - _RESERVED_FDS)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "server.max_connections %d is above what the descriptor limit %d allows: using %d",
        limits.max_connections,
        descriptor_limit,
        room,
    )
    return ConnectionLimits(
        handshake_timeout_s=limits.handshake_timeout_s,
        max_connections=room,
        max_connections_per_peer=min(limits.max_connections_per_peer, room),
    )


def _address(hex_address: str) -> str:
    """A /proc/net/tcp{,6} ``ADDR:PORT`` field's address, as text (IPv4-mapped v6 as v4)."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # four little-endian 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


#: Peers (address, port) that made a call with a verified identity: their connections are the
#: last a per-peer bound closes. Bounded: the oldest are forgotten first.
_AUTHENTICATED: OrderedDict[tuple[str, int], None] = OrderedDict()
_AUTHENTICATED_MAX = 65536


def _normalise(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped if mapped is not None else parsed)


def note_authenticated(peer: str) -> None:
    """Remember that the connection of gRPC's ``peer`` (``ipv4:1.2.3.4:5``) proved who it is."""
    _, _, rest = peer.partition(":")
    address, _, port = rest.rpartition(":")
    if not port.isdigit() or not address:
        return
    key = (_normalise(address), int(port))
    _AUTHENTICATED[key] = None
    _AUTHENTICATED.move_to_end(key)
    while len(_AUTHENTICATED) > _AUTHENTICATED_MAX:
        _AUTHENTICATED.popitem(last=False)


def _connections(port: int, proc: Path = Path("/proc/net")) -> dict[int, tuple[str, int]]:
    """Established connections to local ``port``: socket inode -> peer (address, port)."""
    found: dict[int, tuple[str, int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port != port:
                continue
            address, _, remote_port = fields[2].rpartition(":")
            found[int(fields[9])] = (_address(address), int(remote_port, 16))
    return found


def count_connections(port: int) -> dict[str, int]:
    """Established connections to local ``port`` by peer address (empty off Linux)."""
    counts: dict[str, int] = {}
    for peer, _ in _connections(port).values():
        counts[peer] = counts.get(peer, 0) + 1
    return counts


def _socket_fds() -> dict[int, int]:
    """This process's sockets: inode -> descriptor."""
    found: dict[int, int] = {}
    folder = "/proc/self/fd"
    for entry in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{entry}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(entry)
    return found


def _shut_down(fd: int, inode: int) -> bool:
    """Shut down the socket at ``fd`` if it still is the one with ``inode`` (not close it)."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != f"socket:[{inode}]":
            return False  # gRPC closed it and the number went to something else
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()  # the descriptor stays gRPC's to close


class ConnectionWatch:
    """Enforces the per-peer bound and reports the bounds it sees reached.

    Args:
        port: The coordinator's listening port.
        limits: The bounds.
        on_refused: Called with (peer address, reason) when connections were closed or refused;
            at most once per peer, and once for the total, every ten seconds.
    """

    def __init__(
        self, port: int, limits: ConnectionLimits, on_refused: Callable[[str, str], None]
    ) -> None:
        self.port = port
        self.limits = limits
        self._on_refused = on_refused
        self._reported: dict[str, float] = {}
        self._closed: dict[str, int] = {}
        #: connections closed for the per-peer bound since the start
        self.closed = 0
        self.enabled = Path("/proc/net/tcp").exists() and Path("/proc/self/fd").is_dir()

    async def run(self) -> None:
        """Watch until cancelled."""
        if not self.enabled:
            log.info("per-peer connection bounds need /proc (Linux): off on this system")
            return
        pause = _SCAN_EVERY_S
        while True:
            await asyncio.sleep(pause)
            try:
                closed_before = self.closed
                reports = await asyncio.to_thread(self.scan)
                pause = _SCAN_BUSY_S if self.closed > closed_before else _SCAN_EVERY_S
            except OSError as exc:  # /proc unreadable for a moment: try again
                log.debug("connection scan failed: %s", exc)
                continue
            for peer, reason in reports:  # on the event loop, like every other event
                self._on_refused(peer, reason)

    def scan(self) -> list[tuple[str, str]]:
        """Look once: close what is over the per-peer bound; return what to report."""
        reports: list[tuple[str, str]] = []
        connections = _connections(self.port)
        by_peer: dict[str, list[int]] = {}
        for inode, (peer, _) in connections.items():
            by_peer.setdefault(peer, []).append(inode)
        cap = self.limits.max_connections_per_peer
        over = {peer: inodes for peer, inodes in by_peer.items() if len(inodes) > cap}
        if over:
            fds = _socket_fds()
            for peer, inodes in over.items():
                # Keep connections that proved who they are, then the oldest (inode numbers
                # grow as sockets are made); close the rest.
                inodes.sort(key=lambda i: (connections[i] not in _AUTHENTICATED, i))
                closed = sum(_shut_down(fds[i], i) for i in inodes[cap:] if i in fds)
                self.closed += closed
                self._closed[peer] = self._closed.get(peer, 0) + closed
                self._report(
                    reports,
                    peer,
                    f"{len(inodes)} connections from {peer}, over the bound of {cap} per peer "
                    f"(server.max_connections_per_peer): closed the newest "
                    f"{self._closed[peer]}",
                )
        total = len(connections)
        if total >= self.limits.max_connections:
            self._report(
                reports,
                "",
                f"{total} connections, at the bound of {self.limits.max_connections} "
                "(server.max_connections): new connections are refused",
            )
        return reports

    def _report(self, reports: list[tuple[str, str]], peer: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._reported.get(peer, -_REPORT_EVERY_S) < _REPORT_EVERY_S:
            return
        self._reported[peer] = now
        self._closed.pop(peer, None)
        log.warning("%s", reason)
        reports.append((peer, reason))
