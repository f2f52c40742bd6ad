"""A TCP relay on 127.0.0.1 that tests put between a client and the coordinator.

It forwards bytes both ways, and can misbehave on purpose, at a known point whatever the
machine's speed: hold back one direction after a byte budget (a transfer stopped half-way),
or cut the first connections after a few bytes from the coordinator (a handshake cut short).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class Relay:
    """Forwards connections made to :attr:`port` to ``127.0.0.1:target``.

    Args:
        target: The coordinator's port.
        direction: "down" (coordinator to client) or "up" (client to coordinator): the
            direction ``budget`` applies to.
        budget: Bytes let through in ``direction`` (over all connections) before the rest is
            held back until :meth:`release`; None for no limit.
        cut_first: How many connections, the first ones, are cut once ``cut_after`` bytes
            have come from the coordinator.
        cut_after: See ``cut_first``.
    """

    def __init__(
        self,
        target: int,
        *,
        direction: str = "down",
        budget: int | None = None,
        cut_first: int = 0,
        cut_after: int = 0,
    ) -> None:
        self._target = target
        self._direction = direction
        self._left = budget
        self._cut_first = cut_first
        self._cut_after = cut_after
        self._cond = threading.Condition()
        self._released = False
        self._closing = False
        self.held_back = threading.Event()  # the budget is spent and bytes are waiting
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            self.connections += 1
            cut = self._cut_after if self.connections <= self._cut_first else None
            self._sockets += [client, server]
            for src, dst, direction in ((client, server, "up"), (server, client, "down")):
                threading.Thread(
                    target=self._pump,
                    args=(
                        src,
                        dst,
                        direction == self._direction,
                        cut if direction == "down" else None,
                    ),
                    daemon=True,
                ).start()

    def _allow(self, want: int) -> int:
        with self._cond:
            while (
                self._left is not None
                and self._left <= 0
                and not self._released
                and not self._closing
            ):
                self.held_back.set()
                self._cond.wait(0.5)
            if self._left is None or self._released or self._closing:
                return want
            allowed = min(want, self._left)
            self._left -= allowed
            return allowed

    def _pump(
        self, src: socket.socket, dst: socket.socket, budgeted: bool, cut: int | None
    ) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[: cut - sent])
                    return  # the connection is cut here (finally closes both ends)
                while data:
                    n = self._allow(len(data)) if budgeted else len(data)
                    if self._closing:
                        return
                    dst.sendall(data[:n])
                    sent += n
                    data = data[n:]
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """End every connection open now, both ends (a network blip); new ones are relayed."""
        with self._cond:
            sockets = [sock for sock in self._sockets if sock is not self._listener]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Let everything held back through, and stop holding."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop relaying and end every connection at once, both ends, as a process that dies
        ends its own: shut down first, since a socket closed while a pump thread waits in
        recv on it stays connected until that recv returns (the coordinator would hear of a
        killed client only when its heartbeat timeout runs out)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
