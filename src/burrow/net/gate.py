"""The relay's control listener, with a gate in front of the handshake.

A connection that has proven nothing costs the relay as little as possible: it is accepted and
watched for its first bytes with no buffer, no TLS state and no protocol object; only when the
peer speaks is TLS set up (``connect_accepted_socket``), and the session's own read buffer
stays small until the handshake is done (``SessionConnection``). Connections still in their
handshake are capped in total and per source address; past a cap a new one is reset at once.
When a burst of them has closed, freed memory is handed back to the system (``heap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from burrow.net import heap

log = logging.getLogger("burrow.gate")

#: Connections taken from the kernel per readiness event (the loop stays responsive).
ACCEPT_BATCH = 64
_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Waiting:
    """An accepted socket whose peer has not said anything yet."""

    sock: socket.socket
    source: str
    timer: asyncio.TimerHandle | None = None


@dataclass
class GateStats:
    refused: int = 0  # connections reset at the gate (a cap was reached)
    by_source: dict[str, int] = field(default_factory=dict)


class Slot:
    """A connection's place in the gate, given back once (its handshake ended, either way)."""

    __slots__ = ("gate", "released", "source")

    def __init__(self, gate: ControlListener, source: str) -> None:
        self.gate = gate
        self.source = source
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.done(self.source)


class ControlListener:
    """Listens on the control port and starts a session (``factory(slot)``) per connection
    that speaks within ``deadline`` seconds, within the ``total`` and ``per_source`` caps;
    the session releases its ``slot`` when its handshake is over."""

    def __init__(
        self,
        factory: Callable[[Slot], asyncio.BaseProtocol],
        *,
        ssl_context: ssl.SSLContext | None,
        deadline: float,
        total: int,
        per_source: int,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.factory = factory
        self.ssl_context = ssl_context
        self.deadline = deadline
        self.total = total
        self.per_source = per_source
        self.on_refused = on_refused  # (kind, source): a cap turned a connection away
        self.stats = GateStats()
        self._sockets: list[socket.socket] = []
        self._waiting: set[_Waiting] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- listening ----------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind every address ``host`` resolves to (one port); the first one's address."""
        loop = self._loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[Any, ...]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                if self._sockets and port == 0:  # the same free port on every address
                    address = (address[0], self._sockets[0].getsockname()[1], *address[2:])
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(infos) > 1:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        name = self._sockets[0].getsockname()
        return name[0], name[1]

    @property
    def waiting(self) -> int:
        """Connections accepted and not yet speaking."""
        return len(self._waiting)

    def close(self) -> None:
        loop = self._loop
        for sock in self._sockets:
            if loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for waiting in list(self._waiting):
            self._drop(waiting, reset=False)
        for task in list(self._starting):
            task.cancel()

    # --- accepting ----------------------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE: keep serving, say it once in a while
                log.warning("cannot accept on the control port: %s", exc.strerror or exc)
                return
            source = str(address[0]) if isinstance(address, tuple) else "local"
            kind = self._over(source)
            if kind is not None:
                self.stats.refused += 1
                _reset(sock)
                if self.on_refused is not None:
                    self.on_refused(kind, source)
                continue
            self._hold(sock, source)

    def _over(self, source: str) -> str | None:
        if self.pending >= self.total:
            return "unauthenticated"
        if self.stats.by_source.get(source, 0) >= self.per_source:
            return "unauthenticated_per_source"
        return None

    @property
    def pending(self) -> int:
        """Connections in the gate or in their handshake."""
        return sum(self.stats.by_source.values())

    def _hold(self, sock: socket.socket, source: str) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        waiting = _Waiting(sock, source)
        self._waiting.add(waiting)
        self._count(source, +1)
        self._loop.add_reader(sock.fileno(), self._speaks, waiting)
        waiting.timer = self._loop.call_later(self.deadline, self._drop, waiting)

    def _speaks(self, waiting: _Waiting) -> None:
        """The peer sent its first bytes (a TLS ClientHello, a preface): set up the session."""
        assert self._loop is not None
        try:
            first = waiting.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # a spurious wake-up: keep waiting
        except OSError:
            first = b""
        if not first:  # it went away without a word: nothing to set up
            self._drop(waiting, reset=False)
            return
        self._loop.remove_reader(waiting.sock.fileno())
        self._waiting.discard(waiting)
        if waiting.timer is not None:
            waiting.timer.cancel()
        task = self._loop.create_task(self._start(waiting))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, waiting: _Waiting) -> None:
        assert self._loop is not None
        slot = Slot(self, waiting.source)
        try:
            await self._loop.connect_accepted_socket(
                lambda: self.factory(slot),
                waiting.sock,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.deadline if self.ssl_context is not None else None,
            )
        except (OSError, ssl.SSLError, asyncio.CancelledError, TimeoutError) as exc:
            log.debug("connection from %s failed before its session: %s", waiting.source, exc)
            waiting.sock.close()
            slot.release()

    def _drop(self, waiting: _Waiting, *, reset: bool = True) -> None:
        """The peer said nothing in time (or the relay is closing)."""
        if waiting not in self._waiting:
            return
        self._waiting.discard(waiting)
        if waiting.timer is not None:
            waiting.timer.cancel()
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(waiting.sock.fileno())
        if reset:
            _reset(waiting.sock)
        else:
            waiting.sock.close()
        self.done(waiting.source)

    def done(self, source: str) -> None:
        """A connection from ``source`` left the gate (its handshake ended, either way)."""
        self._count(source, -1)
        if self.pending == 0 and self._loop is not None:
            heap.release_soon(self._loop)

    def _count(self, source: str, delta: int) -> None:
        left = self.stats.by_source.get(source, 0) + delta
        if left > 0:
            self.stats.by_source[source] = left
        else:
            self.stats.by_source.pop(source, None)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()
