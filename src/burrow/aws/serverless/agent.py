"""The agent for a serverless relay: ``burrow http 3000 --to wss://API.execute-api.../STAGE``.

It speaks ``protocol`` over the ``websockets`` library and serves each request with the same
``serve_http`` as on a burrow relay (policies, inspector, X-Forwarded-*), through a small
reader/writer per request: the reader takes the request's chunks with a bounded window
(granting credit as the proxy reads), the writer decodes the proxy's response and spools its
body, then sends it inline (chunked, base64, in order) or uploads it to S3 with the presigned
PUT the relay gave, when it would not fit in a Lambda response.

The connection is kept inside API Gateway's limits: a heartbeat well inside the 10-minute
idle limit (it also renews the names), and a new connection before the 2-hour limit, made
before the old one is let go (the name moves with one conditional write on the lease). The
surface is the one the CLI uses for ``roles.agent.Agent``: ``start``, ``close``,
``wait_failed``, ``tunnels``, ``relay_label``, ``conn`` (``is_open``, ``rtt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from burrow.aws.serverless import protocol
from burrow.aws.serverless.response import BodySize, DecodeError, Head, ResponseDecoder, is_text
from burrow.errors import (
    AuthError,
    BurrowError,
    ConfigError,
    ConnectError,
    RelayUnavailable,
    TunnelError,
)
from burrow.events import EventSink, emit
from burrow.roles.services import ActiveTunnel, Service

log = logging.getLogger("burrow.serverless")

#: Bodies above this stay on disk while they wait to be sent or uploaded.
SPOOL_MEMORY = 1024 * 1024
#: Largest answer the agent uploads (S3's limit for one PUT).
MAX_LARGE = 5 * 1024**3
PONG_TIMEOUT = 30.0
#: Seconds a replaced connection stays open for gateways that cached it (None: the gateway's
#: cache time and a margin).
RETIRE_AFTER: float | None = None
BACKOFF_CAP = 30.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def check_url(url: str, what: str = "--to") -> str:
    """A relay URL the agent may dial: wss://, or ws:// to this machine (the emulator).
    ``what`` names the setting in the error (the extension's is BURROW_RELAY)."""
    expected = f"invalid {what} {url!r}: expected wss://HOST/STAGE"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(expected) from None
    hostname = parts.hostname
    if parts.scheme not in ("ws", "wss") or not hostname:
        raise ConfigError(expected)
    if parts.scheme == "ws" and hostname not in _LOOPBACK and not hostname.startswith("127."):
        raise ConfigError(
            f"{what} {url!r} is plaintext to another machine; use wss:// (ws:// is for the "
            "local emulator only)"
        )
    return url


@dataclass
class ServerlessConfig:
    url: str
    token: str
    services: list[Service]
    state_dir: Path | None = None
    connect_timeout: float = 10.0
    retry_forever: bool = False
    ca: Path | None = None
    heartbeat: float | None = None  # seconds; None: what the relay says
    max_age: float | None = None  # seconds before a connection is replaced
    listen: list[Any] = field(default_factory=list)  # a connector's ListenSpecs

    @classmethod
    def from_settings(
        cls, settings: Any, services: list[Service], listen: list[Any] | None = None
    ) -> ServerlessConfig:
        """From the CLI's ``ClientSettings``, refusing what a serverless relay cannot use."""
        if settings.secret:
            raise ConfigError(
                "a serverless relay takes tokens, not --secret: mint one with `burrow token "
                "issue --state-dir DIR` using the stack's token key"
            )
        if not settings.token:
            raise ConfigError("a serverless relay needs --token (or --token-file)")
        if settings.fingerprint:
            raise ConfigError(
                "--fingerprint pins a burrow relay's certificate; a serverless relay is "
                "checked against the system's CAs (or --ca)"
            )
        for service in services:
            if service.kind not in ("http", "private") or getattr(service, "proxy_protocol", None):
                raise ConfigError(
                    f"the serverless relay carries HTTP tunnels and private services; "
                    f"{service.kind} tunnels need a burrow relay (--to HOST:PORT)"
                )
        from burrow.tokens import parse_token

        url = check_url(settings.relay)
        parse_token(settings.token)
        return cls(
            url=url,
            token=settings.token,
            services=services,
            state_dir=settings.state_dir,
            connect_timeout=settings.connect_timeout,
            retry_forever=settings.retry_forever,
            ca=settings.ca,
            listen=list(listen or []),
        )


class _Link:
    """One WebSocket connection to the relay, and its heartbeat."""

    def __init__(self, agent: ServerlessAgent, ws: Any) -> None:
        self.agent = agent
        self.ws = ws
        self.conn_id = ""
        self.names: list[str] = []
        self.opened_at = time.monotonic()
        self.is_open = True
        self.rtt: float | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send_lock = asyncio.Lock()
        self._pings: dict[int, float] = {}
        self._ping_seq = 0
        self._pong = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.streams: set[_HttpStream] = set()
        self.retiring = False

    async def send(self, message: dict[str, Any]) -> None:
        text = protocol.encode(message)
        async with self._send_lock:
            await self.ws.send(protocol.frames(text), text=True)

    async def read(self) -> None:
        reason = "the relay closed the connection"
        try:
            async for raw in self.ws:
                if not isinstance(raw, str):
                    continue
                try:
                    message = protocol.decode(raw)
                except protocol.ProtocolError as exc:
                    log.warning("bad message from the relay: %s", exc)
                    continue
                self.agent._dispatch(self, message)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            code = getattr(self.ws, "close_code", None)
            if code is not None:
                reason = f"closed with {code} {getattr(self.ws, 'close_reason', '') or ''}".strip()
            self.is_open = False
            if not self.welcome.done():
                self.welcome.set_exception(RelayUnavailable(f"relay closed: {reason}"))
                self.welcome.exception()
            if not self.closed.done():
                self.closed.set_result(reason)

    async def heartbeat(self, interval: float) -> None:
        while self.is_open:
            await asyncio.sleep(interval)
            self._ping_seq += 1
            seq = self._ping_seq
            self._pings[seq] = time.monotonic()
            self._pong.clear()
            try:
                await self.send({"t": "ping", "n": seq, "names": self.names})
                async with asyncio.timeout(min(PONG_TIMEOUT, max(interval, 1.0))):
                    while seq in self._pings:
                        await self._pong.wait()
                        self._pong.clear()
            except (TimeoutError, Exception):
                await self.close(1001, "no answer to the heartbeat")
                return

    def pong(self, seq: int) -> None:
        sent = self._pings.pop(seq, None)
        if sent is not None:
            self.rtt = time.monotonic() - sent
        self._pings = {k: v for k, v in self._pings.items() if k > seq}
        self._pong.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.is_open = False
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def probe(self, timeout: float) -> bool:
        """One ping answered within ``timeout``: the connection is alive. After a freeze (a
        Lambda sandbox between invocations) it may be a corpse nobody noticed: no timer ran,
        and a path that died silently swallows what is sent."""
        self._ping_seq += 1
        seq = self._ping_seq
        self._pings[seq] = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self.send({"t": "ping", "n": seq, "names": self.names})
                while seq in self._pings and self.is_open:  # bounded by the timeout
                    self._pong.clear()
                    await self._pong.wait()
        except (TimeoutError, Exception):
            self._pings.pop(seq, None)
            return False
        return self.is_open

    def abort(self) -> None:
        """Drop the connection at once, without the closing handshake a dead peer would never
        answer (``read`` then ends, and the supervisor dials again)."""
        self.is_open = False
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()


class ServerlessAgent:
    """An agent whose relay is the serverless one. See the module docstring."""

    role_name = "agent"

    def __init__(self, config: ServerlessConfig, *, on_event: EventSink | None = None) -> None:
        if not config.services and self.role_name == "agent":
            raise ConfigError("no tunnels to open")
        self.config = config
        self.on_event = on_event
        self.tunnels = [ActiveTunnel(spec) for spec in config.services]
        self.link: _Link | None = None
        self.failed: asyncio.Future[BurrowError] | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._retired: set[_Link] = set()
        self._streams: dict[tuple[str, str], Any] = {}
        self._own: dict[str, Any] = {}  # streams this side opened (a connector's)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._by_name: dict[tuple[str, str], ActiveTunnel] = {}
        self._check_token()
        self.lease = self._lease()
        self.inline_limit = 6 * 1024 * 1024 - 16 * 1024
        parts = urlsplit(config.url)
        self.host = parts.netloc
        self._label = f"{parts.netloc}{parts.path}"

    @property
    def relay_label(self) -> str:
        return self._label

    def _check_token(self) -> None:
        """What can be told before dialling: a malformed or expired token (API Gateway may
        refuse the upgrade without passing on the handler's reason)."""
        from burrow.tokens import TokenError, parse_token

        claims, _, _ = parse_token(self.config.token)
        exp = claims.get("exp")
        if exp is not None and exp <= time.time():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
            raise TokenError(
                f"token expired at {stamp}; issue a new one with `burrow token issue`", "expired"
            )

    @property
    def conn(self) -> _Link | None:
        return self.link

    def _lease(self) -> str:
        """The secret that lets this agent take its names back on a new connection (kept in
        the state directory, so a restarted agent is the same holder)."""
        if self.config.state_dir is None:
            return secrets.token_hex(32)
        from burrow.statefiles import create_once

        path = self.config.state_dir / "serverless.lease"
        try:
            create_once(path, lambda: secrets.token_hex(32).encode() + b"\n")
            text = path.read_text().strip()
            bytes.fromhex(text)
            if len(text) == 64:
                return text
        except (OSError, ValueError):
            pass
        return secrets.token_hex(32)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout
        attempt = 0
        while True:
            try:
                link = await self._open(max(1.0, deadline - loop.time()))
                break
            except ConnectError as exc:
                if not exc.retryable:
                    raise
                attempt += 1
                delay = min(0.25 * 2**attempt, 1.0)
                if not self.config.retry_forever and loop.time() + delay >= deadline:
                    raise ConnectError(
                        f"{exc}; gave up after {self.config.connect_timeout:g} s"
                    ) from None
                self._reconnecting(attempt, delay, str(exc))
                await asyncio.sleep(delay)
        self._adopt(link, first=True)
        self._supervisor = loop.create_task(self._supervise())

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        for stream in [*self._streams.values(), *self._own.values()]:
            if isinstance(stream, _HttpStream):
                stream.cancel("the agent is stopping")
            else:
                stream.abort("stopping")
        for task in list(self._tasks):
            task.cancel()
        for link in [self.link, *self._retired]:
            if link is not None:
                for task in link.tasks:
                    task.cancel()
                await link.close(1000, "agent shutting down")

    async def wait_failed(self) -> BurrowError:
        assert self.failed is not None
        return await self.failed

    def _fail(self, exc: BurrowError) -> None:
        emit(self.on_event, "error", message=str(exc))
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)

    def _reconnecting(self, attempt: int, delay: float, reason: str) -> None:
        emit(
            self.on_event,
            "reconnecting",
            relay=self.relay_label,
            attempt=attempt,
            delay=round(delay, 2),
            reason=reason,
        )

    # --- connecting -----------------------------------------------------------------------------

    async def _open(self, timeout: float) -> _Link:
        """A new connection with its names held (``hello`` answered by ``welcome``)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        from burrow.tokens import token_proof

        stamp = int(time.time())
        nonce = secrets.token_hex(16)
        claims, mac = token_proof(
            self.config.token, protocol.transcript("agent", self.host, stamp, nonce)
        )
        context: ssl.SSLContext | None = None
        if self.config.url.startswith("wss://"):
            context = ssl.create_default_context(
                cafile=str(self.config.ca) if self.config.ca else None
            )
        label = self.relay_label
        try:
            ws = await connect(
                self.config.url,
                additional_headers={
                    "Authorization": protocol.agent_proof(claims, mac, stamp, nonce)
                },
                compression=None,
                max_size=protocol.AWS_MAX_MESSAGE,
                ping_interval=None,
                open_timeout=timeout,
                close_timeout=2,
                ssl=context,
                user_agent_header="burrow",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            text = _refusal(bytes(exc.response.body or b""))
            if status in (401, 403):
                raise AuthError(f"serverless relay {label} refused this agent: {text}") from None
            raise RelayUnavailable(f"serverless relay {label} answered {status}: {text}") from None
        except ssl.SSLCertVerificationError as exc:
            from burrow.errors import TLSVerifyError

            raise TLSVerifyError(
                f"the certificate of {label} does not verify ({exc.verify_message}); pass --ca"
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RelayUnavailable(f"cannot reach serverless relay {label}: {exc}") from None
        link = _Link(self, ws)
        link.tasks.append(asyncio.get_running_loop().create_task(link.read()))
        try:
            await link.send(self._hello())
            async with asyncio.timeout(timeout):
                welcome = await link.welcome
        except BaseException as exc:
            for task in link.tasks:
                task.cancel()
            await link.close()
            if isinstance(exc, TimeoutError):
                raise RelayUnavailable(f"serverless relay {label} sent no welcome") from None
            raise
        link.conn_id = str(welcome.get("conn", ""))
        link.names = [str(n) for n in welcome.get("names", [])]
        self.inline_limit = int(welcome.get("inline", self.inline_limit))
        interval = self.config.heartbeat or float(welcome.get("hb", protocol.HEARTBEAT))
        link.tasks.append(asyncio.get_running_loop().create_task(link.heartbeat(interval)))
        emit(
            self.on_event,
            "connected",
            relay=label,
            session=link.conn_id,
            tls=self.config.url.startswith("wss://"),
        )
        held = welcome.get("tunnels", [])
        for tunnel, given in zip(self.tunnels, held, strict=False):
            tunnel.name = given["n"]
            tunnel.public = given.get("url") or given["n"]
        return link

    def _hello(self) -> dict[str, Any]:
        return {
            "t": "hello",
            "v": protocol.VERSION,
            "role": "agent",
            "lease": self.lease,
            "tunnels": [
                {"k": _wire_kind(t.spec), **({"n": t.spec.name} if t.spec.name else {})}
                for t in self.tunnels
            ],
        }

    def _adopt(self, link: _Link, *, first: bool = False) -> None:
        old, self.link = self.link, link
        self._by_name = {(_wire_kind(t.spec), t.name or ""): t for t in self.tunnels}
        for tunnel in self.tunnels:
            tunnel.spec.registered(tunnel)
            if not (first or old is None):
                continue
            if tunnel.spec.kind == "http":
                emit(
                    self.on_event,
                    "tunnel_ready",
                    kind="http",
                    name=tunnel.name,
                    url=tunnel.public,
                    public=tunnel.public,
                    **tunnel.spec.describe(),
                )
            else:
                emit(
                    self.on_event,
                    "tunnel_ready",
                    kind="private",
                    name=tunnel.name,
                    public=tunnel.name,
                    **tunnel.spec.describe(),
                )
        if old is not None and old is not link:
            self._retire(old)

    def _retire(self, link: _Link) -> None:
        """Keep an old connection until no gateway can still send to it, then close it once
        its streams are done (make before break). Gateways cache a name's connection for
        ``CACHE_SECONDS``; a request sent to a closed connection gets 410 and is sent again
        to the new one, but one delivered just before the close would be lost."""
        from burrow.aws.serverless.gateway import CACHE_SECONDS

        link.retiring = True
        self._retired.add(link)
        for task in link.tasks[1:]:
            task.cancel()  # its heartbeat: the names moved
        keep = RETIRE_AFTER if RETIRE_AFTER is not None else CACHE_SECONDS + 5

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            quiet_from = loop.time() + keep
            give_up = quiet_from + 35
            while link.is_open and loop.time() < give_up:
                if not link.streams and loop.time() >= quiet_from:
                    break
                await asyncio.sleep(0.1)
            await link.close(1000, "replaced")
            self._retired.discard(link)

        asyncio.get_running_loop().create_task(drain())

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            link = self.link
            assert link is not None
            max_age = self.config.max_age or protocol.MAX_AGE
            left = max_age - (time.monotonic() - link.opened_at)
            done, _ = await asyncio.wait([link.closed], timeout=max(0.0, left))
            if self._closing:
                return
            if not done:
                # Before the 2-hour limit: a new connection first, then the old one goes.
                try:
                    self._adopt(await self._open(self.config.connect_timeout))
                except BurrowError as exc:
                    log.info("early reconnect failed: %s", exc)
                    await link.close(1001, "replacing")
                continue
            reason = link.closed.result()
            emit(self.on_event, "session_lost", relay=self.relay_label, reason=reason)
            while not self._closing:
                attempt += 1
                delay = min(BACKOFF_CAP, 0.25 * 2 ** min(attempt - 1, 8))
                self._reconnecting(attempt, delay, reason)
                await asyncio.sleep(delay)
                try:
                    self._adopt(await self._open(self.config.connect_timeout))
                except (AuthError, TunnelError) as exc:
                    self._fail(exc)
                    return
                except ConnectError as exc:
                    reason = str(exc)
                    continue
                attempt = 0
                break

    # --- messages -------------------------------------------------------------------------------

    def _dispatch(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "welcome":
            if not link.welcome.done():
                link.welcome.set_result(message)
        elif kind == "error":
            error = TunnelError(
                f"serverless relay {self.relay_label}: {message['msg']}", message["code"]
            )
            if not link.welcome.done():
                link.welcome.set_exception(error)
                link.welcome.exception()
            else:
                emit(self.on_event, "warning", message=str(error))
        elif kind == "pong":
            link.pong(message["n"])
        elif kind in protocol.STREAM_TYPES:
            own = self._own.get(message["s"])
            if own is not None:  # a stream this side opened (the relay's refusals have no from)
                own.on_message(message)
                return
            sender = message.get("from")
            if not isinstance(sender, str) or not isinstance(message.get("mac"), str):
                return
            key = (sender, message["s"])
            stream = self._streams.get(key)
            if stream is None and kind == "open":
                tunnel = self._by_name.get((message["k"], message["n"]))
                if tunnel is None:
                    self._send_reset(link, message, "no_such_tunnel", "no such tunnel here")
                    return
                if message["k"] == "http":
                    stream = _HttpStream(self, link, tunnel, message)
                    self._streams[key] = stream
                    stream.start()
                else:
                    self._serve_tcp(link, tunnel, message)
                    return
            if stream is not None:
                stream.on_message(message)
            elif kind not in ("reset", "credit"):
                self._send_reset(link, message, "closed", "no such stream")

    def _serve_tcp(self, link: _Link, tunnel: ActiveTunnel, message: dict[str, Any]) -> None:
        """A connector opened a stream to a private service: dial it, accept, join."""
        from burrow.aws.serverless.streams import TcpStream

        sender, sid = message["from"], message["s"]
        stream = TcpStream(sid, _sender(link, sender, message["mac"]), on_done=self._forget_tcp)
        stream.peer, stream.mac = sender, message["mac"]
        self._streams[(sender, sid)] = stream
        stream.on_message(message)  # its first bytes, if any, wait in the stream
        tunnel.connections += 1
        tunnel.open_connections += 1
        local = getattr(tunnel.spec, "local", ("127.0.0.1", 0))

        async def dial() -> None:
            try:
                async with asyncio.timeout(10):
                    reader, writer = await asyncio.open_connection(*local)
            except (OSError, TimeoutError) as exc:
                tunnel.open_connections -= 1
                await stream.reset("refused", f"the private service refused: {exc}")
                self._streams.pop((sender, sid), None)
                return
            await stream.send({"t": "accept", "s": sid})
            stream.join(reader, writer)

        task = asyncio.get_running_loop().create_task(dial())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget_tcp(self, stream: Any) -> None:
        if self._streams.pop((stream.peer, stream.sid), None) is not None:
            for tunnel in self.tunnels:
                if tunnel.spec.kind == "private" and tunnel.open_connections > 0:
                    tunnel.open_connections -= 1
                    break
        self._own.pop(stream.sid, None)

    def _send_reset(self, link: _Link, message: dict[str, Any], code: str, why: str) -> None:
        reply = {
            "t": "reset",
            "s": message["s"],
            "code": code,
            "why": why,
            "to": message["from"],
            "mac": message["mac"],
        }
        asyncio.get_running_loop().create_task(_quietly(link.send(reply)))

    def _forget(self, stream: _HttpStream) -> None:
        self._streams.pop((stream.peer, stream.sid), None)
        stream.link.streams.discard(stream)


def _wire_kind(spec: Any) -> str:
    """How a service is named in the protocol: ``http``, or ``tcp`` for a private service."""
    return "http" if spec.kind == "http" else "tcp"


def _sender(link: _Link, peer: str | None, mac: str | None) -> Any:
    async def send(message: dict[str, Any]) -> None:
        if peer is not None:
            message = {**message, "to": peer, "mac": mac}
        await link.send(message)

    return send


class ServerlessConnector(ServerlessAgent):
    """``burrow connect NAME --to wss://...``: private services as local ports, each TCP
    connection a stream through the serverless relay (``streams.TcpStream``)."""

    role_name = "connector"

    def __init__(self, config: ServerlessConfig, *, on_event: EventSink | None = None) -> None:
        super().__init__(config, on_event=on_event)
        self.listeners: dict[str, str] = {}
        self._servers: list[asyncio.Server] = []
        self.refused = 0

    def _hello(self) -> dict[str, Any]:
        return {"t": "hello", "v": protocol.VERSION, "role": "connector"}

    async def start(self) -> None:
        await super().start()
        for spec in self.config.listen:
            host, port = "127.0.0.1", 0
            if spec.listen and not spec.listen.startswith("unix:"):
                from burrow.addresses import parse_hostport

                host, port = (
                    ("127.0.0.1", int(spec.listen))
                    if spec.listen.isdigit()
                    else parse_hostport(spec.listen, 0, listen=True)
                )

            def handler(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = spec.service
            ) -> Awaitable[None]:
                return self._visitor(name, reader, writer)

            try:
                if spec.listen.startswith("unix:"):
                    server = await asyncio.start_unix_server(handler, spec.listen[5:])
                else:
                    server = await asyncio.start_server(handler, host, port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen for {spec.service!r} on {host}:{port}: {exc.strerror}"
                ) from None
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            self.listeners[spec.service] = (
                spec.listen if isinstance(bound, str) else f"{bound[0]}:{bound[1]}"
            )
            emit(
                self.on_event,
                "tunnel_ready",
                kind="connect",
                name=spec.service,
                local=self.listeners[spec.service],
            )

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        await super().close()

    # --- streams --------------------------------------------------------------------------

    async def ready_for_streams(self) -> None:
        """Wait until new streams can be opened; the Lambda extension's connector, whose link
        may be stale after a freeze, holds new connections here while it checks."""

    async def ensure_session(self, timeout: float = 10.0) -> _Link:
        """The current connection, proved alive by a ping; replaced if it is dead (the
        supervisor dials again at once). ConnectError if none is up within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        link = self.link
        if link is not None and link.is_open and await link.probe(min(2.0, timeout)):
            return link
        if link is not None:
            link.abort()
        while loop.time() < deadline:  # bounded by the deadline
            current = self.link
            if current is not None and current is not link and current.is_open:
                return current
            await asyncio.sleep(0.01)
        raise ConnectError(
            f"no connection to the serverless relay {self.relay_label} within {timeout:.0f} s"
        )

    async def wait_ready(self, service: str, timeout: float = 10.0) -> None:
        """Open a probe stream to ``service`` and wait until its agent accepted (it dialled
        the service), then drop it."""
        try:
            stream = await self._open_stream(service, timeout)
        except ConnectError as exc:
            raise ConnectError(f"service {service!r} is not reachable: {exc}") from None
        self._own.pop(stream.sid, None)
        await stream.reset("cancelled", "probe done")

    async def _open_stream(self, name: str, timeout: float | None = None) -> Any:
        """A TCP stream to the private service ``name``, accepted by its agent (a
        ``streams.TcpStream``); ConnectError with the relay's or the agent's reason."""
        from burrow.aws.serverless.streams import TcpStream

        link = self.link
        if link is None or not link.is_open:
            raise ConnectError(f"no connection to the serverless relay {self.relay_label}")
        sid = secrets.token_hex(8)
        holder: dict[str, Any] = {}

        async def send(message: dict[str, Any]) -> None:
            stream = holder["stream"]
            if stream.peer is not None:
                message = {**message, "to": stream.peer, "mac": stream.mac}
            await link.send(message)

        stream = TcpStream(sid, send, on_done=self._forget_tcp)
        holder["stream"] = stream
        stream._seq = 1  # the open is 0
        self._own[sid] = stream
        wait = self.config.connect_timeout if timeout is None else timeout
        try:
            await link.send(
                {"t": "open", "s": sid, "k": "tcp", "n": name, "w": protocol.INITIAL_WINDOW, "q": 0}
            )
            async with asyncio.timeout(wait):
                await stream.accepted
        except asyncio.CancelledError:
            self._own.pop(sid, None)
            raise
        except Exception as exc:
            self._own.pop(sid, None)
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {wait:g} s"
            else:
                reason = stream.reset_reason or str(exc) or type(exc).__name__
            raise ConnectError(reason) from None
        return stream

    async def _visitor(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.ready_for_streams()
        try:
            stream = await self._open_stream(name)
        except ConnectError as exc:
            self.refused += 1
            emit(
                self.on_event,
                "connection_refused",
                service=name,
                reason=str(exc),
                count=self.refused,
            )
            writer.close()
            return
        stream.join(reader, writer)


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


_NO_REASON = (
    "no reason given; check --token: minted with this stack's token key, unexpired, not revoked"
)


def _refusal(body: bytes | None) -> str:
    """The reason in a refused upgrade's body (the emulator gives it; API Gateway may not)."""
    try:
        return str(json.loads(body or b"{}").get("message") or _NO_REASON)
    except (ValueError, AttributeError):
        return (body or b"").decode("utf-8", "replace")[:200] or _NO_REASON


@dataclass
class _Spool:
    """An answer's body while it waits: in memory, then on disk."""

    file: Any = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(SPOOL_MEMORY)  # noqa: SIM115
    )
    size: int = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def pieces(self, first: int) -> Any:
        self.file.seek(0)
        yield self.file.read(first)
        while piece := self.file.read(protocol.CHUNK):
            yield piece


class _HttpStream:
    """One visitor request: a reader and writer for ``serve_http`` on a stream."""

    def __init__(
        self, agent: ServerlessAgent, link: _Link, tunnel: ActiveTunnel, message: dict[str, Any]
    ) -> None:
        self.agent = agent
        self.link = link
        self.tunnel = tunnel
        self.peer: str = message["from"]
        self.mac: str = message["mac"]
        self.sid: str = message["s"]
        self.window: int = message["w"]
        self.put: str | None = message.get("put")
        self.method: str = message.get("m") or "GET"
        self.src = message.get("src") or ["", 0]
        self.scheme: str = message.get("sch") or "https"
        self.order = protocol.Reorder()
        self._inbox: deque[bytes] = deque()
        self._eof = False
        self._readable = asyncio.Event()
        self._unacked = 0
        self._buffered = 0
        self.too_large = ""
        self._window_open = asyncio.Event()
        self._window_open.set()
        self.decoder = ResponseDecoder(self.method)
        self.head: Head | None = None
        self.body = _Spool()
        self.size: BodySize | None = None
        self.complete = False
        self.task: asyncio.Task[None] | None = None
        self.reset_by_peer: str | None = None
        link.streams.add(self)

    def start(self) -> None:
        self.tunnel.connections += 1
        self.tunnel.open_connections += 1
        self.task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self, why: str) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # --- from the relay -------------------------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "credit":
            self.window += message["n"]
            self._window_open.set()
            return
        if kind == "reset":
            self.reset_by_peer = message.get("why") or message["code"]
            self._eof = True
            self._readable.set()
            self.cancel(self.reset_by_peer)
            return
        if kind not in protocol.SEQUENCED:
            return
        try:
            ready = self.order.push(message)
            for item in ready:
                data = protocol.payload(item)
                if data:
                    self._inbox.append(data)
                    self._buffered += len(data)
                    if self._buffered > 2 * protocol.INITIAL_WINDOW:
                        raise protocol.ProtocolError("the relay sent beyond the window")
                if item.get("fin"):
                    self._eof = True
        except protocol.ProtocolError as exc:
            log.warning("stream %s: %s", self.sid, exc)
            self._eof = True
            self.cancel(str(exc))
        self._readable.set()

    # --- the reader serve_http reads the request from -------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        while not self._inbox:
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._inbox.popleft()
        if 0 <= n < len(data):
            self._inbox.appendleft(data[n:])
            data = data[:n]
        self._buffered -= len(data)
        self._unacked += len(data)
        if self._unacked >= protocol.INITIAL_WINDOW // 4 and not self._eof:
            grant, self._unacked = self._unacked, 0
            await self._send({"t": "credit", "s": self.sid, "n": grant})
        return data

    # --- the writer serve_http writes the response to -------------------------------------------

    def write(self, data: bytes) -> None:
        if self.complete:
            return
        try:
            events = self.decoder.feed(bytes(data))
        except DecodeError as exc:
            raise ConnectionError(f"cannot relay the answer: {exc}") from None
        self._take(events)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _take(self, events: list[Head | bytes | None]) -> None:
        for event in events:
            if isinstance(event, Head):
                self.head = event
                text_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
                ]
                self.size = BodySize(is_text(text_headers))
            elif isinstance(event, bytes):
                assert self.size is not None
                if self.body.size + len(event) > MAX_LARGE:
                    self.too_large = f"the answer is over {MAX_LARGE} bytes"
                    raise ConnectionError(self.too_large)
                self.body.write(event)
                self.size.add(event)
                if not self.put and self.size.raw > self.agent.inline_limit:
                    # Nowhere to put it: stop reading the local service now, not at 5 GB.
                    self.too_large = (
                        f"the answer is over {self.agent.inline_limit} bytes, more than a Lambda "
                        "response holds, and the relay has no bucket for large answers"
                    )
                    raise ConnectionError(self.too_large)
            else:
                self.complete = True

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.complete and self.head is not None:
            with contextlib.suppress(DecodeError):
                self._take(self.decoder.eof())

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # --- the exchange ---------------------------------------------------------------------------

    async def _run(self) -> None:
        from burrow.http.proxy import serve_http

        spec: Any = self.tunnel.spec
        try:
            await serve_http(
                self,
                self,
                options=spec.options,
                peer=(str(self.src[0]), int(self.src[1])),
                scheme=self.scheme,
                recorder=getattr(spec, "recorder", None),
            )
            await self._answer()
        except asyncio.CancelledError:
            if self.reset_by_peer is None:
                await _quietly(
                    self._send(
                        {
                            "t": "reset",
                            "s": self.sid,
                            "code": "cancelled",
                            "why": "the agent is stopping",
                        }
                    )
                )
        except Exception as exc:
            log.warning("request %s failed: %s", self.sid, exc)
            await _quietly(
                self._send({"t": "reset", "s": self.sid, "code": "error", "why": str(exc)[:200]})
            )
        finally:
            self.body.file.close()
            self.tunnel.open_connections -= 1
            self.agent._forget(self)

    async def _send(self, message: dict[str, Any]) -> None:
        message["to"] = self.peer
        message["mac"] = self.mac
        await self.link.send(message)

    async def _answer(self) -> None:
        if self.too_large:
            await self._send(
                {"t": "reset", "s": self.sid, "code": "too_large", "why": self.too_large}
            )
            return
        head, size = self.head, self.size
        if head is None or size is None or not self.complete:
            raise ConnectionError("the proxy wrote no complete answer")
        size.finish()
        headers = protocol.check_headers(head.headers)
        envelope = len(json.dumps(headers)) + 1024
        if size.encoded + envelope <= self.agent.inline_limit:
            await self._inline(head.status, headers)
        elif self.put:
            await self._upload(head.status, headers)
        else:
            await self._send(
                {
                    "t": "reset",
                    "s": self.sid,
                    "code": "too_large",
                    "why": f"the answer is {self.body.size} bytes, more than a Lambda response "
                    "holds, and the relay has no bucket for large answers",
                }
            )

    async def _inline(self, status: int, headers: list[list[str]]) -> None:
        opening: dict[str, Any] = {
            "t": "head",
            "s": self.sid,
            "q": 0,
            "st": status,
            "h": headers,
            "to": self.peer,
            "mac": self.mac,
        }
        room = protocol.data_room(opening)
        total = self.body.size
        sent = 0
        for seq, piece in enumerate(self.body.pieces(room)):
            await self._take_window(len(piece))
            sent += len(piece)
            message = opening if seq == 0 else {"t": "data", "s": self.sid, "q": seq}
            message["d"] = protocol.b64(piece)
            message["fin"] = sent >= total
            await self._send(message)
            if sent >= total:
                break

    async def _take_window(self, n: int) -> None:
        while self.window < n and n:
            self._window_open.clear()
            await self._window_open.wait()
        self.window -= n

    async def _upload(self, status: int, headers: list[list[str]]) -> None:
        assert self.put is not None
        await put_object(self.put, self.body)
        await self._send(
            {"t": "head", "s": self.sid, "q": 0, "st": status, "h": headers, "big": True}
        )
        await self._send(
            {"t": "stored", "s": self.sid, "q": 1, "size": self.body.size, "fin": True}
        )


async def put_object(url: str, body: _Spool) -> None:
    """HTTP PUT of the spooled body to a presigned S3 URL (https, or http to this machine)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" and not (host in _LOOPBACK or host.startswith("127.")):
        raise ConnectionError("the upload URL is not https")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None
    )
    try:
        target = parts.path + ("?" + parts.query if parts.query else "")
        writer.write(
            f"PUT {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {body.size}\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        body.file.seek(0)
        while piece := body.file.read(256 * 1024):
            writer.write(piece)
            await writer.drain()
        status_line = await reader.readline()
        fields = status_line.split(b" ", 2)
        if len(fields) < 2 or fields[1] != b"200":
            raise ConnectionError(f"the upload failed: {status_line[:100]!r}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
