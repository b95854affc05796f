"""The relay's HTTP(S) listener: reads each visitor connection's first request head, routes it
by Host (``NAME.DOMAIN``) to the agent holding NAME, and from then on relays raw bytes. It is
a ``Frontend`` of the relay: whoever builds the relay plugs it in (``burrow.node``).

The relay does not speak HTTP beyond that head: the agent parses every request (policies,
inspector, headers), so the same agent code can serve a serverless relay. Names the relay does
not know get a 404 page; names whose agent is away get a 502 page; the bare domain serves a
landing page and ``/api/tunnels/NAME/status`` (localtunnel's status API). A first head whose
body length could be read two ways gets 400 here (``burrow.http.framing``), as the agent
answers later ones on the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, cast

import h11

from burrow.events import emit, format_hostport
from burrow.http.framing import FramingError, request_framing
from burrow.http.relaypage import gone_message, not_found_message, offline_message
from burrow.http.relaypage import page as _page
from burrow.net.bridge import StreamBridge, visitor_info
from burrow.roles.relay import Relay, Route, bind_error

log = logging.getLogger("burrow.http")

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0


class HttpFrontend:
    """Serves one or more listeners (HTTP, HTTPS) for the relay, for names of kind ``http``."""

    kinds: Mapping[str, str] = {"http": "http"}

    def __init__(
        self,
        domain: str,
        listen: list[tuple[str, tuple[str, int], Any]],
        *,
        fallback: bool = False,
    ) -> None:
        self.domain = domain.lower().strip(".")
        self.listen = listen  # (scheme, (host, port), ssl context or None)
        self.use_fallback = fallback
        self.relay: Relay | None = None
        self.servers: list[asyncio.Server] = []
        self.addresses: dict[str, tuple[str, int]] = {}

    async def start(self, relay: Relay) -> None:
        self.relay = relay
        for scheme, (host, port), context in self.listen:
            try:
                bound = await self._listen(scheme, host, port, ssl=context)
            except OSError as exc:
                raise bind_error(host, port, exc, f"{scheme} port") from None
            emit(
                relay.on_event,
                "http_ready",
                scheme=scheme,
                listen=format_hostport(*bound),
                example=self.url_for("NAME"),
            )

    async def _listen(self, scheme: str, host: str, port: int, ssl: Any) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _HeadReader(self, scheme),
            host,
            port,
            ssl=ssl,
            ssl_handshake_timeout=10.0 if ssl is not None else None,
            reuse_address=True,
            backlog=1024,
        )
        self.servers.append(server)
        sockname = server.sockets[0].getsockname()
        self.addresses[scheme] = (sockname[0], sockname[1])
        return self.addresses[scheme]

    def describe(self, kind: str, name: str) -> dict[str, Any]:
        """The URL visitors use. A loopback relay that routes any Host to its one tunnel
        gives 127.0.0.1:PORT, which resolves everywhere (NAME.localhost does only in some
        resolvers: browsers, systemd's)."""
        if self.use_fallback and "http" in self.addresses:
            host, port = self.addresses["http"]
            if host in ("127.0.0.1", "::1"):
                return {"url": f"http://{format_hostport(host, port)}"}
        return {"url": self.url_for(name)}

    def resolve(self, name: str) -> Route | None:
        return self.relay.route("http", name) if self.relay is not None else None

    def fallback(self) -> str | None:
        """The name for hosts that are not NAME.DOMAIN: the one HTTP tunnel, if only one."""
        if not self.use_fallback or self.relay is None:
            return None
        names = self.relay.held_names("http")
        return names[0] if len(names) == 1 else None

    def status(self, name: str) -> dict[str, Any] | None:
        route = self.resolve(name)
        if route is None:
            return None
        online = route.conn is not None and route.conn.is_open
        return {"name": name, "online": online, "connected_sockets": 1 if online else 0}

    def url_for(self, name: str) -> str:
        """The public URL of ``name`` on the first listener (https preferred)."""
        for scheme, default in (("https", 443), ("http", 80)):
            if scheme in self.addresses:
                port = self.addresses[scheme][1]
                suffix = "" if port == default else f":{port}"
                return f"{scheme}://{name}.{self.domain}{suffix}"
        return f"http://{name}.{self.domain}"

    def name_for_host(self, host: str) -> str | None:
        """``NAME`` for ``NAME.DOMAIN[:port]``; None for the bare domain or another host."""
        host = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host.lower()
        host = host.strip(".")
        suffix = "." + self.domain
        if host.endswith(suffix):
            name = host[: -len(suffix)]
            if name and "." not in name:
                return name
        return None

    def close(self) -> None:
        for server in self.servers:
            server.close()


class _VisitorBridge(StreamBridge):
    """A visitor's connection to its tunnel: if the agent goes away before a byte of the
    response came back, the visitor gets the relay's 502 page rather than a dropped socket."""

    __slots__ = ("answered", "name")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answered = False
        self.name = ""

    def on_data(self, data: bytes | memoryview) -> None:
        self.answered = True
        super().on_data(data)

    def on_reset(self, code: str, reason: str) -> None:
        transport = self.transport
        if not self.answered and transport is not None and not transport.is_closing():
            body = _page(
                "Tunnel offline",
                gone_message(self.name),
            )
            transport.write(_response(502, "Bad Gateway", "text/html; charset=utf-8", body))
            self.transport = None  # close after the page, not with a reset
            transport.close()
        super().on_reset(code, reason)


def _response(status: int, reason: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
        "Server: burrow\r\n\r\n"
    ).encode()
    return head + body


class _HeadReader(asyncio.Protocol):
    """Buffers a visitor's bytes until the first request head is complete, then routes."""

    def __init__(self, frontend: HttpFrontend, scheme: str) -> None:
        self.frontend = frontend
        self.scheme = scheme
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        if self.transport is not None:
            self._answer(408, "Request Timeout", "The request head did not arrive in time.")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._answer(
                    431, "Request Header Fields Too Large", "The request head is too large."
                )
            return
        if self.timer is not None:
            self.timer.cancel()
        self._route(bytes(self.buffer[: end + 4]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def _route(self, head: bytes) -> None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        parser.receive_data(head)
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            # h11 refuses with 501 only a Transfer-Encoding other than one "chunked": the
            # body's length is then unknown, which RFC 9112 §6.3 answers with 400.
            status = 400 if exc.error_status_hint == 501 else exc.error_status_hint
            self._answer(status, "Bad Request", f"The request could not be parsed: {exc}.")
            return
        if not isinstance(event, h11.Request):
            self._answer(400, "Bad Request", "The request could not be parsed.")
            return
        try:
            request_framing(list(event.headers.raw_items()), event.http_version)
        except FramingError as exc:
            self._answer(400, "Bad Request", f"{exc}.")  # the agent would refuse it too
            return
        host = next((v.decode("latin-1") for k, v in event.headers if k == b"host"), "")
        frontend = self.frontend
        name = frontend.name_for_host(host)
        if name is None:
            name = frontend.fallback()
        if name is None:
            self._serve_domain(event.target.decode("latin-1"), host)
            return
        route = frontend.resolve(name)
        if route is None:
            self._answer(
                404,
                "Not Found",
                not_found_message(name),
                title="Tunnel not found",
            )
            return
        conn = route.conn
        if conn is None or not conn.is_open:
            self._answer(
                502,
                "Bad Gateway",
                offline_message(name),
                title="Tunnel offline",
            )
            return
        transport = self.transport
        assert transport is not None and frontend.relay is not None
        relay = frontend.relay
        key = ("http", route.name)
        refusal = relay.open_visitor(key)
        if refusal is not None:
            self._answer(503, "Service Unavailable", refusal, title="Tunnel busy")
            return
        bridge = _VisitorBridge(conn, on_done=lambda _bridge: relay.close_visitor(key))
        bridge.name = route.name
        bridge.open(visitor_info(transport, http=route.name, scheme=self.scheme))
        head, self.buffer = bytes(self.buffer), bytearray()
        bridge.adopt(transport, head)

    def _serve_domain(self, target: str, host: str) -> None:
        target = target.split("?", 1)[0]
        prefix = "/api/tunnels/"
        if target.startswith(prefix) and target.endswith("/status"):
            name = target[len(prefix) : -len("/status")]
            report = self.frontend.status(name)
            if report is None:
                self._json(404, {"error": f"no tunnel named {name!r}"})
            else:
                self._json(200, report)
            return
        if target in ("/", ""):
            example = self.frontend.url_for("NAME")
            self._answer(
                200,
                "OK",
                f"This is a burrow relay. Tunnels live at {example}; "
                "start one with `burrow http PORT --to RELAY`.",
                title="burrow relay",
            )
            return
        self._answer(404, "Not Found", f"Nothing here: ask for NAME.{self.frontend.domain}.")

    def _json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self._write(status, "OK" if status == 200 else "Not Found", "application/json", payload)

    def _answer(self, status: int, reason: str, message: str, *, title: str | None = None) -> None:
        page = _page(title or f"{status} {reason}", message)
        self._write(status, reason, "text/html; charset=utf-8", page)

    def _write(self, status: int, reason: str, content_type: str, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(_response(status, reason, content_type, body))
        transport.close()
        self.transport = None
