"""The agent's side of an HTTP tunnel: one visitor connection in, requests relayed to the local
web service, responses streamed back, each exchange shown to the inspector.

Two h11 state machines per visitor connection, one facing the visitor (SERVER) and one facing
the local service (CLIENT), so framing (Content-Length, chunked, HTTP/1.0 close-delimited, HEAD,
204/304, 100-continue) is h11's job and this module only moves events between them. Bodies
stream chunk by chunk with ``drain()`` after each write, as asyncssh forwards: when one side
backs up, reading from the other stops, so memory stays at a few chunks whatever the body size.
A protocol switch (101 Upgrade, 2xx to CONNECT) leaves h11 and splices raw bytes both ways with
half-close. Every wait for a head is bounded; policy and header rewriting are the pure functions
of ``burrow.http.policy``.

``reader``/``writer`` may be asyncio streams or ``burrow.net.channel.Channel`` (same method
names); nothing else about them is assumed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Protocol
from urllib.parse import urlsplit

import h11

from burrow.errors import ConfigError
from burrow.http import fastparse
from burrow.http.policy import (
    Header,
    HttpOptions,
    check_access,
    error_page,
    rewrite_request_headers,
    rewrite_response_headers,
)
from burrow.http.record import Exchange, Recorder

log = logging.getLogger("burrow.http")

#: Bytes per read from either side; also the most one side buffers before waiting on the other.
CHUNK = 64 * 1024
#: Largest request or response head (h11's ``max_incomplete_event_size``); bigger heads get 431.
MAX_HEAD = 64 * 1024
#: How long a keep-alive connection may sit idle before its next request starts.
IDLE_TIMEOUT = 75.0
#: How long the rest of a request head may take once its first byte arrived (slowloris bound).
HEAD_TIMEOUT = 30.0
#: Longest silence inside a request body before the visitor is given up on.
BODY_TIMEOUT = 300.0
#: How long a visitor that sent ``Expect: 100-continue`` waits for the local service's 100 (or
#: its early refusal) before burrow sends one itself. The local service is next door, so one
#: that implements 100-continue answers well within this; one that does not costs only this.
CONTINUE_WAIT = 0.25
#: When a response ends before its request body, how long the body may take to finish.
BODY_GRACE = 1.0
#: After an early response, how much unread request body is discarded to keep the connection.
DISCARD_LIMIT = 1024 * 1024
#: Time allowed for that discarding, and for a lingering close (so the visitor reads our answer
#: instead of a reset).
LINGER = 2.0
#: A replayed exchange stops reading the response after this long (a replayed SSE never ends).
REPLAY_TIMEOUT = 60.0


class Reader(Protocol):
    """What ``serve_http`` reads from: ``asyncio.StreamReader`` or a ``Channel``."""

    async def read(self, n: int = -1, /) -> bytes: ...


class Writer(Protocol):
    """What ``serve_http`` writes to: ``asyncio.StreamWriter`` or a ``Channel``."""

    def write(self, data: bytes, /) -> None: ...

    def writelines(self, data: list[bytes], /) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def serve_http(
    reader: Reader,
    writer: Writer,
    *,
    options: HttpOptions,
    peer: tuple[str, int],
    scheme: str = "http",
    recorder: Recorder | None = None,
) -> None:
    """Serve one visitor connection (many requests with keep-alive) until either side closes.

    ``peer`` is the visitor's TCP address as the relay saw it (the only input to IP rules);
    ``scheme`` is how the visitor reached the relay, for X-Forwarded-Proto. Closes ``writer``."""
    await _Visitor(reader, writer, options, peer, scheme, recorder).run()


def local_ssl_context(options: HttpOptions) -> ssl.SSLContext | None:
    """The TLS context for an https:// local service, or None for http://. Raises
    ``ConfigError`` when ``local_ca`` cannot be loaded, so a CLI can check it at start-up."""
    if not options.local_https:
        return None
    return _ssl_context(str(options.local_ca) if options.local_ca else None, options.local_insecure)


@lru_cache(maxsize=16)
def _ssl_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--local-ca {cafile!r}: cannot load it: {detail}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


# --- failures --------------------------------------------------------------------------------


class _Fail(Exception):
    """A response burrow makes itself (502, 504, ...): ``detail`` names the problem."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class _ClientGone(Exception):
    """The visitor closed, reset or went silent: nobody is left to answer."""


class _ClientError(Exception):
    """The visitor broke HTTP inside a body (a bad chunk); answered with h11's status hint."""

    def __init__(self, exc: h11.RemoteProtocolError) -> None:
        super().__init__(str(exc))
        self.status = exc.error_status_hint


class _Retry(Exception):
    """A kept-alive local connection died before answering and nothing is lost by redialling."""


# --- the local side ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Upstream:
    """One connection to the local service, kept across a visitor's keep-alive requests."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    )
    reused: bool = False

    def usable(self) -> bool:
        return (
            self.conn.our_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def send(self, event: h11.Event) -> None:
        data = self.conn.send_with_data_passthrough(event)
        if data:
            self.writer.writelines(data)

    def close(self) -> None:
        self.writer.close()


async def _dial(options: HttpOptions) -> _Upstream:
    """Connect to the local service, trying each address of its name; failures become the
    page the visitor sees, naming the local address and what went wrong."""
    host, port = options.local
    where = options.local_address
    try:
        context = local_ssl_context(options)
    except ConfigError as exc:
        raise _Fail(502, "Bad Gateway", f"burrow: {exc}") from None
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    try:
        async with asyncio.timeout(options.connect_timeout):
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise _Fail(
                    502,
                    "Bad Gateway",
                    f"burrow: the local host {host!r} does not resolve: {exc.strerror}",
                ) from None
            for address in dict.fromkeys(info[4][:2] for info in infos):
                try:
                    reader, writer = await asyncio.open_connection(
                        str(address[0]),
                        int(address[1]),
                        ssl=context,
                        server_hostname=host if context is not None else None,
                        ssl_handshake_timeout=options.connect_timeout if context else None,
                    )
                except ssl.SSLCertVerificationError as exc:
                    raise _Fail(
                        502,
                        "Bad Gateway",
                        f"burrow: the certificate of the local service at {where} does not "
                        f"verify ({exc.verify_message}); use --local-ca or --local-insecure",
                    ) from None
                except ssl.SSLError as exc:
                    raise _Fail(
                        502,
                        "Bad Gateway",
                        f"burrow: TLS with the local service at {where} failed: "
                        f"{exc.reason or exc}",
                    ) from None
                except OSError as exc:
                    errors.append(exc)
                    continue
                return _Upstream(reader, writer)
    except TimeoutError:
        raise _Fail(
            504,
            "Gateway Timeout",
            f"burrow: the local service at {where} did not accept the connection within "
            f"{options.connect_timeout:g} s",
        ) from None
    if errors and all(isinstance(exc, ConnectionRefusedError) for exc in errors):
        detail = f"burrow: the local service at {where} refused the connection (is it running?)"
    else:
        why = "; ".join(dict.fromkeys(exc.strerror or str(exc) for exc in errors)) or "no address"
        detail = f"burrow: the local service at {where} could not be reached: {why}"
    raise _Fail(502, "Bad Gateway", detail)


# --- one request's flow ------------------------------------------------------------------------


@dataclass(eq=False)
class _Flow:
    """What the request pump and the response relay of one request share."""

    request_chunked: bool
    consumed: bool = False  # body bytes or trailers read from the visitor: no retry
    eom_seen: bool = False  # the visitor's request is complete
    informed: bool = False  # a 1xx went to the visitor: no retry
    refused_continue: bool = False  # a final answer while the visitor waited for 100
    # per attempt:
    continue_decided: asyncio.Event = field(default_factory=asyncio.Event)
    request_finished: bool = False
    deadline: asyncio.Timeout | None = None
    upstream_bytes: int = 0

    def reset_attempt(self) -> None:
        self.continue_decided = asyncio.Event()
        self.request_finished = False
        self.deadline = None
        self.upstream_bytes = 0


class _Timer:
    """The fast path's deadlines: one timer per connection, armed and disarmed by setting a
    float, where ``asyncio.timeout`` would make (and cancel) a timer for every wait. An expired
    wait cancels the task and reads as ``TimeoutError``, as with ``asyncio.timeout``."""

    __slots__ = ("expired", "handle", "loop", "task", "when")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.when: float | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.expired = False

    async def wait(self, aw: Awaitable[bytes], seconds: float) -> bytes:
        """``await aw``, but at most ``seconds`` (then ``TimeoutError``)."""
        when = self.loop.time() + seconds
        self.when = when
        handle = self.handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self.handle = self.loop.call_at(when, self._fire)
        try:
            return await aw
        except asyncio.CancelledError:
            if self.expired:
                self.expired = False
                if self.task.uncancel() == 0:
                    raise TimeoutError from None
            raise
        finally:
            self.when = None

    def _fire(self) -> None:
        self.handle = None
        when = self.when
        if when is None:
            return  # no wait under way: the timer is re-armed by the next one
        if self.loop.time() < when:
            self.handle = self.loop.call_at(when, self._fire)  # re-armed later since
            return
        self.when = None
        self.expired = True
        self.task.cancel()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _Visitor:
    """One visitor connection: its h11 SERVER, its kept local connection, its exchanges."""

    def __init__(
        self,
        reader: Reader,
        writer: Writer,
        options: HttpOptions,
        peer: tuple[str, int],
        scheme: str,
        recorder: Recorder | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.options = options
        self.peer_ip = str(peer[0]) if peer else ""
        self.client_label = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        self.scheme = scheme
        self.recorder = recorder
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream: _Upstream | None = None
        self.method = b""
        self.public_netloc = urlsplit(options.public_url).netloc if options.public_url else ""
        #: Visitor bytes not yet parsed (the fast path's buffer; h11 holds them on the slow path).
        self.buf = b""
        self.eof = False
        self.responded = False  # the fast path has started the visitor's response
        self.late = False  # the fast path handed this exchange to h11 after sending it
        self.policed = bool(options.allow or options.deny or options.basic_auth)
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        self.timer = _Timer()
        try:
            while True:
                self.method = b""
                outcome = await self._fast_cycle()
                if outcome is not None:
                    if outcome:
                        continue
                    break
                # Anything unusual goes through h11, starting from the same bytes.
                self._to_h11()
                request = await self._read_head()
                if request is None or not await self._handle(request):
                    break
                self.conn.start_next_cycle()
                self._from_h11()
        except _ClientGone:
            pass
        finally:
            self.timer.close()
            self._drop_upstream()
            await self._close()

    # --- the fast path -------------------------------------------------------------------------
    #
    # The common exchange (an HTTP/1.1 request whose head and whole body arrived in one read,
    # without Expect, Upgrade, CONNECT, Transfer-Encoding or Connection options; answered with an
    # HTTP/1.1 final response framed by Content-Length) is parsed and relayed here without h11,
    # tasks or per-event objects. Whatever the fast path does not handle it hands over before
    # consuming anything (``None`` from ``_fast_cycle``), or, once the request went out, by
    # replaying the bytes both sides have seen into h11 and finishing on the slow path.

    def _to_h11(self) -> None:
        """Hand the unparsed visitor bytes to a fresh h11 SERVER for the slow path."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if self.buf:
            conn.receive_data(self.buf)
        if self.eof:
            conn.receive_data(b"")
        self.buf = b""
        self.conn = conn

    def _from_h11(self) -> None:
        """Take back what h11 holds of the next request, for the fast path."""
        data, closed = self.conn.trailing_data
        self.buf = bytes(data)
        self.eof = closed
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    def _sync_visitor(self, raw: bytes) -> None:
        """Feed a request the fast path consumed (head and whole body) to a fresh h11, which so
        reaches the state the slow path would be in: request read, response not started."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.receive_data(raw)
        try:
            for _ in range(3):  # Request, Data (when there is a body), EndOfMessage
                event = conn.next_event()
                if type(event) is h11.EndOfMessage:
                    self.conn = conn
                    return
                if type(event) not in (h11.Request, h11.Data):
                    break
        except h11.RemoteProtocolError:
            pass
        raise _ClientGone("h11 does not read the request as the fast path did")

    def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise _ClientGone(str(exc)) from None

    async def _fast_drain(self) -> None:
        if getattr(self.writer, "write_buffer_size", None) == 0:
            return  # a Channel with nothing queued: drain() would return at once
        await self._drain()

    async def _fast_cycle(self) -> bool | None:
        """One request on the fast path: True to go on with the next, False when the visitor
        is done, None (nothing consumed) for the slow path."""
        buf = self.buf
        waited = not buf
        if waited:
            if self.eof:
                return False
            try:
                buf = await self.timer.wait(self._recv(), IDLE_TIMEOUT)
            except TimeoutError:
                return False
            if not buf:
                self.eof = True
                return False
            self.buf = buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        end += 4
        parsed = fastparse.parse_request(buf, end)
        if parsed is None:
            return None
        method, target, raw = parsed
        if method == b"CONNECT":
            return None
        host: bytes | None = None
        length = 0
        for name, value in raw:
            low = name.lower()
            if low in _REQUEST_SPECIAL:
                if low == b"host":
                    if host is not None:
                        return None
                    host = value
                elif low == b"content-length":
                    if length or not value.isdigit() or len(value) > 18:
                        return None
                    length = int(value) or -1
                elif low == b"connection":
                    if value.lower().strip() != b"keep-alive":
                        return None
                else:
                    return None  # transfer-encoding, expect, upgrade
        length = max(length, 0)
        total = end + length
        if host is None or total > len(buf):
            return None
        if self.policed and check_access(self.options, self.peer_ip, raw) is not None:
            return None  # the slow path answers the denial
        self.buf = buf[total:]
        self.method = method
        return await self._fast_handle(buf, end, total, method, target, raw, host, waited)

    async def _fast_handle(
        self,
        buf: bytes,
        end: int,
        total: int,
        method: bytes,
        target: bytes,
        raw: list[Header],
        host: bytes,
        waited: bool,
    ) -> bool:
        forwarded = rewrite_request_headers(
            self.options,
            raw,
            peer_ip=self.peer_ip,
            scheme=self.scheme,
            public_host=host.decode("latin-1") or self.public_netloc,
        )
        exchange = Exchange(
            tunnel=self.options.name,
            method=method.decode("latin-1"),
            target=target.decode("latin-1"),
            http_version="1.1",
            request_headers=_text(forwarded),
            client=self.client_label,
        )
        started = time.monotonic()
        body = buf[end:total]
        self.responded = False
        self.late = False
        self._notify_begin(exchange)
        try:
            if body:
                exchange.add_request_body(body)
            request = fastparse.request_head(method, target, forwarded) + body
            while True:
                upstream = self.upstream
                if upstream is None or not waited or not upstream.usable():
                    # Having waited for the visitor, a pending EOF from the local side has
                    # landed already; else give it the turn _upstream() gives it.
                    upstream = await self._upstream()
                waited = False
                upstream.writer.write(request)
                try:
                    return await self._fast_response(
                        upstream, buf, total, forwarded, body, exchange
                    )
                except _Retry:
                    log.debug("kept local connection closed; dialling again")
                    self._drop_upstream()
                except BaseException:
                    self._drop_upstream()
                    raise
        except _Fail as fail:
            exchange.error = fail.detail
            log.debug("http %s %s: %s", exchange.method, exchange.target, fail.detail)
            if self.late:  # h11 has the exchange
                if self.conn.our_state is not h11.SEND_RESPONSE:
                    return False
            elif self.responded:
                return False  # the response had started: all we can do is cut it short
            else:
                self._sync_visitor(buf[:total])
            status, headers, page = error_page(fail.status, fail.title, fail.detail)
            return await self._reply(status, fail.title, headers, page, exchange)
        except _ClientGone as exc:
            exchange.error = exchange.error or f"the visitor went away ({exc})"
            return False
        finally:
            if exchange.duration is None:
                exchange.duration = time.monotonic() - started
                self._notify_end(exchange)

    async def _fast_response(
        self,
        upstream: _Upstream,
        request: bytes,
        total: int,
        forwarded: list[Header],
        body: bytes,
        exchange: Exchange,
    ) -> bool:
        """Read the local service's response head; relay it and a Content-Length body, or
        hand over to h11 for anything else."""
        reader = upstream.reader
        buf = b""
        eof = False
        timer = self.timer
        deadline = self.loop.time() + self.options.response_timeout
        try:
            while True:
                try:
                    data = await timer.wait(reader.read(CHUNK), deadline - self.loop.time())
                except TimeoutError:
                    raise
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    if not buf:
                        if upstream.reused and not body:
                            raise _Retry
                        raise _Fail(
                            502,
                            "Bad Gateway",
                            f"burrow: the local service at {self.options.local_address} "
                            "closed the connection without answering",
                        )
                    eof = True
                    break
                buf = buf + data if buf else data
                if b"\r\n\r\n" in buf or b"\n\n" in buf or len(buf) > MAX_HEAD:
                    break
        except TimeoutError:
            raise self._no_answer() from None
        end = buf.find(b"\r\n\r\n") + 4
        parsed = fastparse.parse_response(buf, end) if end >= 4 and not eof else None
        length = -2  # -2: not for the fast path; -1: no Content-Length
        if parsed is not None:
            status, reason, raw = parsed
            length = _response_length(raw, self.method, status)
        if length == -2:
            return await self._late(upstream, request[:total], forwarded, body, buf, eof, exchange)
        close = length < -2
        if close:
            length = -3 - length
        headers = rewrite_response_headers(self.options, raw)
        exchange.status = status
        exchange.reason = reason.decode("latin-1")
        exchange.response_headers = _text(headers)
        first = buf[end : end + length]
        extra = len(buf) - end > length
        self.responded = True
        self._write(fastparse.response_head(status, reason, headers) + first)
        if first:
            exchange.add_response_body(first)
        remaining = length - len(first)
        while remaining > 0:
            await self._fast_drain()
            try:
                data = await timer.wait(reader.read(min(CHUNK, remaining)), BODY_TIMEOUT)
            except TimeoutError:
                raise _Fail(
                    504,
                    "Gateway Timeout",
                    f"burrow: the local service at {self.options.local_address} sent nothing "
                    f"for {BODY_TIMEOUT:g} s",
                ) from None
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise _Fail(
                    502,
                    "Bad Gateway",
                    f"burrow: the local service at {self.options.local_address} sent a broken "
                    "response: it closed before the whole body",
                )
            remaining -= len(data)
            exchange.add_response_body(data)
            self._write(data)
        await self._fast_drain()
        if extra or close:
            self._drop_upstream()
        else:
            upstream.reused = True
        return True

    async def _late(
        self,
        upstream: _Upstream,
        raw_request: bytes,
        forwarded: list[Header],
        body: bytes,
        response: bytes,
        eof: bool,
        exchange: Exchange,
    ) -> bool:
        """The response is not one for the fast path: replay what both sides have seen into
        h11 (the visitor's request, the request sent, the response bytes read) and finish on
        the slow path."""
        self._sync_visitor(raw_request)
        self.late = True
        conn = upstream.conn
        try:
            target = _target(raw_request)
            conn.send(h11.Request(method=self.method, target=target, headers=forwarded))
            if body:
                conn.send(h11.Data(data=body))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise _Fail(502, "Bad Gateway", f"burrow: cannot relay this request: {exc}") from None
        conn.receive_data(response)
        if eof:
            conn.receive_data(b"")
        flow = _Flow(request_chunked=False, consumed=bool(body), eom_seen=True)
        flow.request_finished = True
        flow.upstream_bytes = len(response)

        def end() -> None:
            pass  # the exchange ends when _fast_handle returns

        await self._relay(upstream, exchange, flow, end)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            upstream.reused = True
        else:
            self._drop_upstream()
        return self.conn.our_state is h11.DONE  # not when switched protocols or cut short

    # --- visitor I/O ---------------------------------------------------------------------------

    async def _recv(self) -> bytes:
        try:
            return await self.reader.read(CHUNK)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            raise _ClientGone(str(exc)) from None

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send_with_data_passthrough(event)
        if data:
            try:
                self.writer.writelines(data)
            except (ConnectionError, OSError, RuntimeError) as exc:
                raise _ClientGone(str(exc)) from None

    async def _drain(self) -> None:
        """Wait until the visitor takes what was written (bounded: a visitor that stops
        reading for ``BODY_TIMEOUT`` is given up on)."""
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                await self.writer.drain()
        except TimeoutError:  # before OSError, of which it is a subclass
            raise _ClientGone("the visitor stopped reading") from None
        except (ConnectionError, OSError) as exc:
            raise _ClientGone(str(exc)) from None

    async def _read_head(self) -> h11.Request | None:
        """The next request head, or None when the visitor is done (closed, idle, or broke
        HTTP, in which case it was told so with 400/408/431)."""
        loop = asyncio.get_running_loop()
        started = bool(self.conn.trailing_data[0])
        try:
            async with asyncio.timeout(HEAD_TIMEOUT if started else IDLE_TIMEOUT) as deadline:
                while True:
                    event = self.conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await self._recv()
                        if data and not started:
                            started = True
                            deadline.reschedule(loop.time() + HEAD_TIMEOUT)
                        self.conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        return event
                    return None
        except TimeoutError:
            if started:
                await self._page(408, "Request Timeout", "burrow: the request head was too slow")
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            detail = "the request head is over 64 KiB" if status == 431 else str(exc)
            await self._page(status, _phrase(status), f"burrow: {detail}")
            return None

    async def _client_event(self) -> h11.Event:
        """The visitor's next body event, waiting at most ``BODY_TIMEOUT`` for bytes."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _ClientError(exc) from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(BODY_TIMEOUT):
                        data = await self._recv()
                except TimeoutError:
                    raise _ClientGone("the visitor stopped sending the request body") from None
                self.conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                raise _ClientGone("request already complete")
            assert isinstance(event, h11.Event)
            return event

    # --- one request -----------------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> bool:
        """Answer one request; True if the connection can carry another."""
        self.method = request.method
        raw = list(request.headers.raw_items())
        exchange = Exchange(
            tunnel=self.options.name,
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            http_version=request.http_version.decode("latin-1"),
            request_headers=_text(_redacted(raw) if self.options.basic_auth else raw),
            client=self.client_label,
        )
        started = time.monotonic()
        ended = False
        denial = check_access(self.options, self.peer_ip, raw)
        forwarded: list[Header] = []
        if denial is None:
            host = next((v for n, v in raw if n.lower() == b"host"), b"").decode("latin-1")
            forwarded = rewrite_request_headers(
                self.options,
                raw,
                peer_ip=self.peer_ip,
                scheme=self.scheme,
                public_host=host or self.public_netloc,
            )
            exchange.request_headers = _text(forwarded)

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                exchange.duration = time.monotonic() - started
                self._notify_end(exchange)

        self._notify_begin(exchange)
        try:
            if denial is not None:
                return await self._reply(
                    denial.status, denial.reason, denial.headers, denial.body, exchange
                )
            return await self._forward(request, forwarded, exchange, end)
        except _Fail as fail:
            exchange.error = fail.detail
            log.debug("http %s %s: %s", exchange.method, exchange.target, fail.detail)
            if self.conn.our_state is not h11.SEND_RESPONSE:
                return False  # the response had started: all we can do is cut it short
            status, headers, body = error_page(fail.status, fail.title, fail.detail)
            return await self._reply(status, fail.title, headers, body, exchange)
        except _ClientError as exc:
            exchange.error = f"the visitor sent a malformed body: {exc}"
            if self.conn.our_state is h11.SEND_RESPONSE:
                title = _phrase(exc.status)
                status, headers, body = error_page(exc.status, title, f"burrow: {exc}")
                await self._reply(status, title, headers, body, exchange)
            return False
        except _ClientGone as exc:
            exchange.error = exchange.error or f"the visitor went away ({exc})"
            return False
        finally:
            end()

    async def _reply(
        self, status: int, reason: str, headers: list[Header], body: bytes, exchange: Exchange
    ) -> bool:
        """Answer from burrow itself; first discard what is left of the request body (within
        limits), so the visitor can keep the connection, as after a 401 it retries on it."""
        keep = await self._discard_body()
        headers = list(headers) if keep else [*headers, (b"Connection", b"close")]
        exchange.status = status
        exchange.reason = reason
        exchange.response_headers = _text(headers)
        self._send(h11.Response(status_code=status, headers=headers, reason=reason.encode()))
        if self.method != b"HEAD":
            exchange.add_response_body(body)
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        await self._drain()
        return keep and self.conn.our_state is h11.DONE

    async def _page(self, status: int, title: str, detail: str) -> None:
        """An error page outside any exchange (a bad head): best effort, then close."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        _, headers, body = error_page(status, title, detail)
        headers.append((b"Connection", b"close"))
        try:
            self._send(h11.Response(status_code=status, headers=headers, reason=title.encode()))
            if self.method != b"HEAD":
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
            await self._drain()
        except (_ClientGone, h11.LocalProtocolError):
            pass

    async def _discard_body(self) -> bool:
        """Read and drop the rest of the request body; True if it ended in time and in size."""
        if self.conn.their_state is h11.DONE:
            return True
        if (
            self.conn.their_state is not h11.SEND_BODY
            or self.conn.they_are_waiting_for_100_continue
        ):
            return False  # a visitor waiting for 100 will not send the body: do not invite it
        discarded = 0
        try:
            async with asyncio.timeout(LINGER):
                while discarded <= DISCARD_LIMIT:
                    event = await self._client_event()
                    if isinstance(event, h11.EndOfMessage):
                        return True
                    if isinstance(event, h11.Data):
                        discarded += len(event.data)
                    else:
                        return False
        except (TimeoutError, _ClientError, _ClientGone):
            pass
        return False

    # --- forwarding --------------------------------------------------------------------------

    async def _forward(
        self,
        request: h11.Request,
        headers: list[Header],
        exchange: Exchange,
        end: Callable[[], None],
    ) -> bool:
        chunked = any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers
        )
        flow = _Flow(request_chunked=chunked)
        while True:
            upstream = await self._upstream()
            flow.reset_attempt()
            try:
                await self._exchange(upstream, request, headers, exchange, flow, end)
            except _Retry:
                log.debug("kept local connection closed; dialling again")
                self._drop_upstream()
                continue
            except BaseException:
                self._drop_upstream()
                raise
            break
        if upstream.conn.our_state is h11.DONE and upstream.conn.their_state is h11.DONE:
            upstream.conn.start_next_cycle()
            upstream.reused = True
        else:
            self._drop_upstream()
        if self.conn.our_state is not h11.DONE or flow.refused_continue:
            return False  # switched protocols, cut short, or a body the visitor will not send
        return await self._discard_body() and self.conn.their_state is h11.DONE

    async def _upstream(self) -> _Upstream:
        upstream = self.upstream
        if upstream is not None:
            await asyncio.sleep(0)  # let a pending EOF from the local side land first
            if upstream.usable():
                return upstream
            self._drop_upstream()
        self.upstream = await _dial(self.options)
        return self.upstream

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def _exchange(
        self,
        upstream: _Upstream,
        request: h11.Request,
        headers: list[Header],
        exchange: Exchange,
        flow: _Flow,
        end: Callable[[], None],
    ) -> None:
        """Send the head, then pump the request body and relay the response at once: the local
        service may answer (100, an early error, a streaming echo) before the body ends."""
        upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
        pump = asyncio.create_task(self._pump(upstream, exchange, flow))
        relay = asyncio.create_task(self._relay(upstream, exchange, flow, end))
        try:
            await asyncio.wait({pump, relay}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and not relay.done() and pump.exception() is not None:
                pump.result()  # the visitor failed mid-body: nobody to relay to
            await relay
            if not pump.done() and not flow.refused_continue:
                # The response ended before the request body; most often its last bytes are in
                # flight, else the local service answered early and the rest is not wanted.
                await asyncio.wait({pump}, timeout=BODY_GRACE)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                log.debug("request body after the response: %s", pump.exception())
        finally:
            for task in (pump, relay):
                task.cancel()
            await asyncio.gather(pump, relay, return_exceptions=True)

    async def _pump(self, upstream: _Upstream, exchange: Exchange, flow: _Flow) -> None:
        """Visitor's request body -> local service, one chunk at a time."""
        try:
            if self.conn.they_are_waiting_for_100_continue:
                await self._await_continue(flow)
            while True:
                if flow.eom_seen:  # a retry of a request already read in full
                    upstream.send(h11.EndOfMessage())
                    break
                event = await self._client_event()
                if isinstance(event, h11.Data):
                    flow.consumed = True
                    exchange.add_request_body(event.data)
                    upstream.send(event)
                    await self._drain_upstream(upstream)
                elif isinstance(event, h11.EndOfMessage):
                    flow.eom_seen = True
                    trailers = list(event.headers.raw_items()) if flow.request_chunked else []
                    flow.consumed = flow.consumed or bool(trailers)
                    upstream.send(h11.EndOfMessage(headers=trailers))
                    break
                else:
                    raise _ClientGone("the visitor closed before the request ended")
            await self._drain_upstream(upstream)
        except (ConnectionError, OSError, TimeoutError):
            pass  # the local side broke or stopped reading; the relay reports it
        finally:
            flow.request_finished = True
            if flow.deadline is not None:
                loop = asyncio.get_running_loop()
                flow.deadline.reschedule(loop.time() + self.options.response_timeout)

    @staticmethod
    async def _drain_upstream(upstream: _Upstream) -> None:
        async with asyncio.timeout(BODY_TIMEOUT):
            await upstream.writer.drain()

    async def _await_continue(self, flow: _Flow) -> None:
        """Give the local service a moment to send its own 100 (or a refusal), else tell the
        visitor to go ahead ourselves, as RFC 9110 §10.1.1 lets a proxy do."""
        try:
            async with asyncio.timeout(CONTINUE_WAIT):
                await flow.continue_decided.wait()
        except TimeoutError:
            pass
        if self.conn.they_are_waiting_for_100_continue and self.conn.our_state is h11.SEND_RESPONSE:
            flow.informed = True
            self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            await self._drain()

    async def _upstream_event(
        self, upstream: _Upstream, flow: _Flow, idle: float | None = None
    ) -> h11.Event:
        """The local service's next event; ``idle`` bounds the wait for its next bytes."""
        where = self.options.local_address
        while True:
            try:
                event = upstream.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if flow.upstream_bytes == 0:
                    detail = (
                        f"burrow: the local service at {where} closed the connection "
                        "without answering"
                    )
                else:
                    detail = f"burrow: the local service at {where} sent a broken response: {exc}"
                raise _Fail(502, "Bad Gateway", detail) from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(idle):
                        data = await upstream.reader.read(CHUNK)
                except TimeoutError:  # before OSError, of which it is a subclass
                    raise _Fail(
                        504,
                        "Gateway Timeout",
                        f"burrow: the local service at {where} sent nothing for {idle:g} s",
                    ) from None
                except (ConnectionError, OSError):
                    data = b""  # a reset reads as an end; h11 says whether it was premature
                if not data and flow.upstream_bytes == 0 and self._retryable(upstream, flow):
                    raise _Retry
                flow.upstream_bytes += len(data)
                upstream.conn.receive_data(data)
                continue
            assert isinstance(event, h11.Event)
            return event

    def _retryable(self, upstream: _Upstream, flow: _Flow) -> bool:
        return upstream.reused and not flow.consumed and not flow.informed

    def _no_answer(self) -> _Fail:
        return _Fail(
            504,
            "Gateway Timeout",
            f"burrow: the local service at {self.options.local_address} did not answer "
            f"within {self.options.response_timeout:g} s",
        )

    async def _relay(
        self, upstream: _Upstream, exchange: Exchange, flow: _Flow, end: Callable[[], None]
    ) -> None:
        """Local service's response -> visitor: 1xx as they come, the head rewritten, the body
        chunk by chunk (each flushed, so Server-Sent Events are not held back)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:
                flow.deadline = deadline
                if flow.request_finished:
                    deadline.reschedule(loop.time() + self.options.response_timeout)
                while True:
                    event = await self._upstream_event(upstream, flow)
                    if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                        self._relay_informational(event, flow)
                        await self._drain()
                        continue
                    break
        except TimeoutError:
            raise self._no_answer() from None
        finally:
            flow.deadline = None
        if not isinstance(event, h11.Response | h11.InformationalResponse):
            raise _Fail(
                502,
                "Bad Gateway",
                f"burrow: the local service at {self.options.local_address} closed the "
                "connection without answering",
            )
        switching = event.status_code == 101
        raw = list(event.headers.raw_items())
        headers = rewrite_response_headers(self.options, raw, upgrade=switching)
        exchange.status = event.status_code
        exchange.reason = event.reason.decode("latin-1")
        exchange.response_headers = _text(headers)
        flow.refused_continue = self.conn.they_are_waiting_for_100_continue
        flow.continue_decided.set()
        response_cls = h11.InformationalResponse if switching else h11.Response
        try:
            self._send(
                response_cls(status_code=event.status_code, headers=headers, reason=event.reason)
            )
        except h11.LocalProtocolError as exc:
            raise _Fail(
                502,
                "Bad Gateway",
                f"burrow: cannot relay the local service's {event.status_code}: {exc}",
            ) from None
        await self._drain()
        if self.conn.our_state is h11.SWITCHED_PROTOCOL:
            end()  # the inspector shows the handshake; the tunnelled bytes are not HTTP
            await self._splice(upstream)
            return
        trailers_ok = (
            any(n.lower() == b"transfer-encoding" for n, _ in raw)
            and self.conn.their_http_version == b"1.1"
            and self.method != b"HEAD"
        )
        while True:
            event = await self._upstream_event(upstream, flow, BODY_TIMEOUT)
            if isinstance(event, h11.Data):
                exchange.add_response_body(event.data)
                self._send(event)
                await self._drain()
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers.raw_items()) if trailers_ok else []
                self._send(h11.EndOfMessage(headers=trailers))
                await self._drain()
                return
            else:
                raise _Fail(
                    502, "Bad Gateway", "burrow: the local service ended the response early"
                )

    def _relay_informational(self, event: h11.InformationalResponse, flow: _Flow) -> None:
        if self.conn.their_http_version != b"1.1" or self.conn.our_state is not h11.SEND_RESPONSE:
            return  # HTTP/1.0 visitors get no 1xx (RFC 9110 §15.2)
        if event.status_code == 100:
            if not self.conn.they_are_waiting_for_100_continue:
                return  # burrow sent one already, or nobody asked
            flow.continue_decided.set()
        flow.informed = True
        headers = rewrite_response_headers(self.options, list(event.headers.raw_items()))
        self._send(
            h11.InformationalResponse(
                status_code=event.status_code, headers=headers, reason=event.reason
            )
        )

    async def _splice(self, upstream: _Upstream) -> None:
        """Raw bytes both ways after a protocol switch, each direction half-closed on its own;
        ends when both have ended (or either breaks)."""
        from_visitor = self.conn.trailing_data[0]
        from_local = upstream.conn.trailing_data[0]

        async def visitor_to_local() -> None:
            if from_visitor:
                upstream.writer.write(from_visitor)
                await upstream.writer.drain()
            while data := await self._recv():
                upstream.writer.write(data)
                await upstream.writer.drain()
            if upstream.writer.can_write_eof():
                upstream.writer.write_eof()
            else:
                upstream.close()  # TLS cannot half-close: end both ways

        async def local_to_visitor() -> None:
            if from_local:
                self.writer.write(from_local)
                await self._drain()
            while data := await upstream.reader.read(CHUNK):
                self.writer.write(data)
                await self._drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()

        tasks = [asyncio.create_task(visitor_to_local()), asyncio.create_task(local_to_visitor())]
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break  # one side broke: tear both down
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the end ---------------------------------------------------------------------------------

    async def _close(self) -> None:
        """Close the visitor's side; if it may still be sending, half-close first and drain a
        little, so it reads our last answer rather than a reset."""
        linger = self.conn.their_state in (h11.SEND_BODY, h11.ERROR)
        try:
            if linger and self.writer.can_write_eof():
                self.writer.write_eof()
                async with asyncio.timeout(LINGER):
                    drained = 0
                    while drained < DISCARD_LIMIT and (data := await self.reader.read(CHUNK)):
                        drained += len(data)
        except (ConnectionError, OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError):
            pass
        try:
            self.writer.close()
            async with asyncio.timeout(LINGER):
                await self.writer.wait_closed()
        except (ConnectionError, OSError, TimeoutError, RuntimeError):
            pass

    def _notify_begin(self, exchange: Exchange) -> None:
        if self.recorder is not None:
            try:
                self.recorder.begin(exchange)
            except Exception:
                log.exception("the request recorder failed")  # the inspector must not cost traffic

    def _notify_end(self, exchange: Exchange) -> None:
        if self.recorder is not None:
            try:
                self.recorder.end(exchange)
            except Exception:
                log.exception("the request recorder failed")


_REQUEST_SPECIAL = frozenset(
    {b"host", b"content-length", b"connection", b"transfer-encoding", b"expect", b"upgrade"}
)
_RESPONSE_SPECIAL = frozenset({b"content-length", b"connection", b"transfer-encoding", b"host"})


def _response_length(raw: list[Header], method: bytes, status: int) -> int:
    """How the fast path frames a response: its body length ``n`` (``-3 - n`` when the local
    service closes after it), or -2 when it is one for h11: a 1xx, Transfer-Encoding, no
    length, Connection options other than close and keep-alive, anything doubtful."""
    length = -1
    close = False
    for name, value in raw:
        low = name.lower()
        if low in _RESPONSE_SPECIAL:
            if low == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > 18:
                    return -2
                length = int(value)
            elif low == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")} - {b""}
                if not tokens <= {b"close", b"keep-alive"}:
                    return -2
                close = close or b"close" in tokens
            else:
                return -2  # transfer-encoding, host
    if not 200 <= status < 600:
        return -2
    if method == b"HEAD" or status in (204, 304):
        if length < 0 and method == b"HEAD":  # h11 would add chunked framing
            return -2
        length = 0
    elif length < 0:  # close-delimited
        return -2
    return -3 - length if close else length


def _target(raw_request: bytes) -> bytes:
    """The request target of a request head the fast path accepted."""
    return raw_request.split(b" ", 2)[1]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _redacted(headers: list[Header]) -> list[Header]:
    """A denied visitor's head for the inspector, without the password it tried."""
    return [(n, b"[redacted]" if n.lower() == b"authorization" else v) for n, v in headers]


def _text(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


# --- replay ----------------------------------------------------------------------------------

_REPLAY_DROP = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "expect",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
    }
)


async def replay(
    options: HttpOptions, exchange: Exchange, *, recorder: Recorder | None = None
) -> Exchange:
    """Send a recorded request (method, target, headers as the local service first got them,
    captured body) to the local service again; the result is a new Exchange with ``replay_of``
    set. Failures are recorded in its ``error`` (and ``status`` when a visitor would have seen
    one), never raised: the inspector shows them like any exchange."""
    body = bytes(exchange.request_body)
    headers: list[Header] = [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in exchange.request_headers
        if n.lower() not in _REPLAY_DROP
    ]
    if not any(n.lower() == b"host" for n, _ in headers):
        headers.insert(0, (b"Host", options.local_address.encode()))
    if body or exchange.method.upper() in ("POST", "PUT", "PATCH"):
        headers.append((b"Content-Length", str(len(body)).encode()))
    new = Exchange(
        tunnel=options.name or exchange.tunnel,
        method=exchange.method,
        target=exchange.target,
        http_version="1.1",
        request_headers=_text(headers),
        client=exchange.client,
        replay_of=exchange.id,
    )
    new.add_request_body(body)
    started = time.monotonic()
    if recorder is not None:
        recorder.begin(new)
    try:
        if exchange.request_truncated:
            new.error = (
                f"cannot replay: the request body ({exchange.request_size} bytes) was larger "
                "than the inspector keeps"
            )
            return new
        await _replay_send(options, new, headers, body)
    except _Fail as fail:
        new.status = new.status or fail.status
        new.reason = new.reason or fail.title
        new.error = fail.detail
    finally:
        new.duration = time.monotonic() - started
        if recorder is not None:
            recorder.end(new)
    return new


async def _replay_send(
    options: HttpOptions, new: Exchange, headers: list[Header], body: bytes
) -> None:
    upstream = await _dial(options)
    where = options.local_address
    try:
        conn = upstream.conn
        try:
            upstream.send(
                h11.Request(
                    method=new.method.encode("latin-1"),
                    target=new.target.encode("latin-1"),
                    headers=headers,
                )
            )
            if body:
                upstream.send(h11.Data(data=body))
            upstream.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise _Fail(400, "Bad Request", f"burrow: cannot replay this request: {exc}") from None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(options.response_timeout) as deadline:
            await upstream.writer.drain()
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise _Fail(
                        502,
                        "Bad Gateway",
                        f"burrow: the local service at {where} sent a broken response: {exc}",
                    ) from None
                if event is h11.NEED_DATA:
                    conn.receive_data(await upstream.reader.read(CHUNK))
                elif isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                    continue
                elif isinstance(event, h11.Response | h11.InformationalResponse):
                    new.status = event.status_code
                    new.reason = event.reason.decode("latin-1")
                    new.response_headers = _text(list(event.headers.raw_items()))
                    if isinstance(event, h11.InformationalResponse):
                        return  # a replayed upgrade: the handshake is the whole story
                    deadline.reschedule(loop.time() + REPLAY_TIMEOUT)
                elif isinstance(event, h11.Data):
                    new.add_response_body(event.data)
                else:
                    return  # EndOfMessage (or ConnectionClosed)
    except TimeoutError:
        if new.status is None:
            raise _Fail(
                504,
                "Gateway Timeout",
                f"burrow: the local service at {where} did not "
                f"answer within {options.response_timeout:g} s",
            ) from None
        new.error = f"stopped reading the response after {REPLAY_TIMEOUT:g} s"
    except (ConnectionError, OSError) as exc:
        raise _Fail(
            502,
            "Bad Gateway",
            f"burrow: the connection to the local service at {where} broke: {exc}",
        ) from None
    finally:
        upstream.close()
