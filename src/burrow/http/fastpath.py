"""The proxy's fast path: the common exchange relayed without h11, tasks or per-event objects.

The common exchange is an HTTP/1.1 request whose head and whole body arrived in one read,
without Expect, Upgrade, CONNECT, Transfer-Encoding, a second Content-Length or Connection
options, for the host the connection was opened for, answered with an HTTP/1.1 final response
framed by Content-Length. It is what makes ``burrow http`` fast, so it does per request only
what that exchange needs. Anything else it hands to the h11 engine through one ``Handover``
(``burrow.http.handover``): before consuming anything, or, once the request went out, with what
both sides have seen. So the refusals the h11 engine makes (ambiguous framing: 400; another
host: 421) hold here too, because such requests never stay on this path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from burrow.http import fastparse, limits, pages
from burrow.http.framing import Body, Framing
from burrow.http.handover import Handover, InFlight, Unread
from burrow.http.policy import (
    Header,
    check_access,
    rewrite_request_headers,
    rewrite_response_headers,
)
from burrow.http.record import Exchange, text_headers
from burrow.http.upstream import Retry, Upstream
from burrow.http.visitor import ClientGone, Visitor

log = logging.getLogger("burrow.http")

_REQUEST_SPECIAL = frozenset(
    {b"host", b"content-length", b"connection", b"transfer-encoding", b"expect", b"upgrade"}
)
_RESPONSE_SPECIAL = frozenset({b"content-length", b"connection", b"transfer-encoding", b"host"})
_EMPTY = Framing(Body.NONE)
_EMPTY_THEN_CLOSE = Framing(Body.NONE, close=True)
_LENGTH = Body.LENGTH
#: ``tuple.__new__`` builds a ``Framing`` without the Python-level ``__new__`` that NamedTuple
#: generates (for defaults and keywords): one frame less per response, about 1 % of the fast
#: path's work per request (measured with callgrind).
_new_tuple = tuple.__new__


class Timer:
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


class FastPath:
    """The fast path of one visitor connection. It owns the unparsed visitor bytes between
    requests; ``cycle`` serves one request or hands it over, ``resume`` takes bytes back."""

    def __init__(self, visitor: Visitor) -> None:
        self.visitor = visitor
        self.options = visitor.options
        self.loop = asyncio.get_running_loop()
        self.timer = Timer()
        #: Visitor bytes not yet parsed, and whether the visitor half-closed after them.
        self.buf = b""
        self.eof = False
        #: The visitor's response has started (a failure can then only cut it short).
        self.responded = False

    def resume(self, unread: Unread) -> None:
        """Go on from the bytes the h11 engine gives back after its exchange."""
        self.buf, self.eof = unread

    def close(self) -> None:
        self.timer.close()

    def _handover(self, sent: InFlight | None = None) -> Handover:
        """Give the h11 engine the unparsed bytes (with the exchange under way, if any)."""
        handover = Handover(Unread(self.buf, self.eof), sent)
        self.buf = b""
        return handover

    async def cycle(self) -> bool | Handover:
        """One request: True to go on with the next, False when the visitor is done, or a
        ``Handover`` for the h11 engine."""
        visitor = self.visitor
        buf = self.buf
        waited = not buf
        if waited:
            if self.eof:
                return False
            try:
                buf = await self.timer.wait(visitor.recv(), limits.IDLE_TIMEOUT)
            except TimeoutError:
                return False
            if not buf:
                self.eof = True
                return False
            self.buf = buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return self._handover()
        end += 4
        parsed = fastparse.parse_request(buf, end)
        if parsed is None:
            return self._handover()
        method, target, raw = parsed
        if method == b"CONNECT":
            return self._handover()
        host: bytes | None = None
        length = 0
        for name, value in raw:
            low = name.lower()
            if low in _REQUEST_SPECIAL:
                if low == b"host":
                    if host is not None:
                        return self._handover()
                    host = value
                elif low == b"content-length":
                    if length or not value.isdigit() or len(value) > 18:
                        return self._handover()  # two lengths: the h11 engine judges them
                    length = int(value) or -1
                elif low == b"connection":
                    if value.lower().strip() != b"keep-alive":
                        return self._handover()
                else:
                    return self._handover()  # transfer-encoding, expect, upgrade
        length = max(length, 0)
        total = end + length
        if host is None or total > len(buf):
            return self._handover()
        first = visitor.first_host
        if host != first:
            if first is not None:
                return self._handover()  # the h11 engine compares them (421 or go on)
            visitor.first_host = host
        if visitor.policed and check_access(self.options, visitor.peer_ip, raw) is not None:
            return self._handover()  # the h11 engine answers the denial
        self.buf = buf[total:]
        return await self._handle(buf, end, total, method, target, raw, host, waited)

    async def _handle(
        self,
        buf: bytes,
        end: int,
        total: int,
        method: bytes,
        target: bytes,
        raw: list[Header],
        host: bytes,
        waited: bool,
    ) -> bool | Handover:
        visitor = self.visitor
        forwarded = rewrite_request_headers(
            self.options,
            raw,
            peer_ip=visitor.peer_ip,
            scheme=visitor.scheme,
            public_host=host.decode("latin-1") or visitor.public_netloc,
        )
        exchange = Exchange(
            tunnel=self.options.name,
            method=method.decode("latin-1"),
            target=target.decode("latin-1"),
            http_version="1.1",
            # Text headers are for the inspector: none, no decoding per request.
            request_headers=text_headers(forwarded) if visitor.shows_headers else [],
            client=visitor.client_label,
        )
        started = time.monotonic()
        body = buf[end:total]
        self.responded = False
        handed_over = False
        visitor.notify_begin(exchange)
        try:
            if body:
                exchange.add_request_body(body)
            request = fastparse.request_head(method, target, forwarded) + body
            while True:
                upstream = visitor.upstream
                if upstream is None or not waited or not upstream.usable():
                    # Having waited for the visitor, a pending EOF from the local side has
                    # landed already; else give it the turn kept_upstream() gives it.
                    upstream = await visitor.kept_upstream()
                waited = False
                upstream.writer.write(request)
                try:
                    outcome = await self._respond(upstream, method, bool(body), exchange)
                except Retry:
                    log.debug("kept local connection closed; dialling again")
                    visitor.drop_upstream()
                    continue
                except BaseException:
                    visitor.drop_upstream()
                    raise
                if isinstance(outcome, bool):
                    return outcome
                response, response_eof = outcome
                handed_over = True
                sent = InFlight(
                    request=buf[:total],
                    method=method,
                    target=target,
                    headers=forwarded,
                    body=body,
                    upstream=upstream,
                    response=response,
                    response_eof=response_eof,
                    exchange=exchange,
                    started=started,
                )
                return self._handover(sent)
        except pages.Fail as fail:
            exchange.error = fail.detail
            log.debug("http %s %s: %s", exchange.method, exchange.target, fail.detail)
            if self.responded:
                return False  # the response had started: all we can do is cut it short
            return await self._page(fail, exchange, method)
        except ClientGone as exc:
            exchange.error = exchange.error or f"the visitor went away ({exc})"
            return False
        finally:
            if not handed_over and exchange.duration is None:
                exchange.duration = time.monotonic() - started
                visitor.notify_end(exchange)

    async def _respond(
        self, upstream: Upstream, method: bytes, sent_body: bool, exchange: Exchange
    ) -> bool | tuple[bytes, bool]:
        """Read the local service's response head; relay it and its Content-Length body
        (True), or return the bytes read and whether it closed, for the h11 engine."""
        visitor = self.visitor
        reader = upstream.reader
        buf = b""
        eof = False
        timer = self.timer
        deadline = self.loop.time() + self.options.response_timeout
        try:
            while True:
                try:
                    data = await timer.wait(reader.read(limits.CHUNK), deadline - self.loop.time())
                except TimeoutError:
                    raise
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    if not buf:
                        if upstream.reused and not sent_body:
                            raise Retry
                        raise pages.closed_without_answer(self.options.local_address)
                    eof = True
                    break
                buf = buf + data if buf else data
                if (
                    buf.find(b"\r\n\r\n") >= 0
                    or buf.find(b"\n\n") >= 0
                    or len(buf) > limits.MAX_HEAD
                ):
                    break
        except TimeoutError:
            raise pages.no_answer(
                self.options.local_address, self.options.response_timeout
            ) from None
        end = buf.find(b"\r\n\r\n") + 4
        parsed = fastparse.parse_response(buf, end) if end >= 4 and not eof else None
        if parsed is None:
            return buf, eof
        status, reason, raw = parsed
        framing = _framing(raw, method, status)
        if framing is None:
            return buf, eof
        length = framing.length
        headers = rewrite_response_headers(self.options, raw)
        exchange.status = status
        exchange.reason = reason.decode("latin-1")
        if visitor.shows_headers:
            exchange.response_headers = text_headers(headers)
        first = buf[end : end + length]
        extra = len(buf) - end > length
        self.responded = True
        visitor.write(fastparse.response_head(status, reason, headers) + first)
        if first:
            exchange.add_response_body(first)
        remaining = length - len(first)
        while remaining > 0:
            await self._drain()
            try:
                data = await timer.wait(
                    reader.read(min(limits.CHUNK, remaining)), limits.BODY_TIMEOUT
                )
            except TimeoutError:
                raise pages.went_silent(self.options.local_address, limits.BODY_TIMEOUT) from None
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise pages.body_cut_short(self.options.local_address)
            remaining -= len(data)
            exchange.add_response_body(data)
            visitor.write(data)
        await self._drain()
        if extra or framing.close:
            visitor.drop_upstream()
        else:
            upstream.reused = True
        return True

    async def _drain(self) -> None:
        if getattr(self.visitor.writer, "write_buffer_size", None) == 0:
            return  # a Channel with nothing queued: drain() would return at once
        await self.visitor.drain()

    async def _page(self, fail: pages.Fail, exchange: Exchange, method: bytes) -> bool:
        """Answer a failure before the response started, as the h11 engine would: the
        request was read in full, so the connection stays open."""
        status, headers, page = fail.page()
        exchange.status = status
        exchange.reason = fail.title
        exchange.response_headers = text_headers(headers)
        data = fastparse.response_head(status, fail.title.encode(), headers)
        if method != b"HEAD":
            exchange.add_response_body(page)
            data += page
        self.visitor.write(data)
        await self.visitor.drain()
        return True


def _framing(raw: list[Header], method: bytes, status: int) -> Framing | None:
    """How the fast path frames a response: a body of ``Content-Length`` bytes or none,
    ``close`` when the local service ends the connection after it; None when the response is
    the h11 engine's (a 1xx, Transfer-Encoding, no length, Connection options other than close
    and keep-alive, anything doubtful). A strict subset of ``framing.response_framing``, in
    one pass over the head."""
    length = -1
    close = False
    for name, value in raw:
        low = name.lower()
        if low in _RESPONSE_SPECIAL:
            if low == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > 18:
                    return None
                length = int(value)
            elif low == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")} - {b""}
                if not tokens <= {b"close", b"keep-alive"}:
                    return None
                close = close or b"close" in tokens
            else:
                return None  # transfer-encoding, host
    if not 200 <= status < 600:
        return None
    if method == b"HEAD" or status in (204, 304):
        if length < 0 and method == b"HEAD":  # h11 would add chunked framing
            return None
        return _EMPTY_THEN_CLOSE if close else _EMPTY
    if length < 0:  # close-delimited
        return None
    return _new_tuple(Framing, (_LENGTH, length, close))
