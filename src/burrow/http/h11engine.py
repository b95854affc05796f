"""The proxy's h11 engine: every exchange the fast path does not take, with two h11 state
machines, one facing the visitor (SERVER) and one facing the local service (CLIENT), so framing
(Content-Length, chunked, HTTP/1.0 close-delimited, HEAD, 204/304, 100-continue) is h11's job
and this module only moves events between them.

Bodies stream chunk by chunk with ``drain()`` after each write, as asyncssh forwards: when one
side backs up, reading from the other stops, so memory stays at a few chunks whatever the body
size. A protocol switch (101 Upgrade, 2xx to CONNECT) leaves h11 and splices raw bytes both ways
with half-close. Every wait for a head is bounded.

Before a request goes anywhere it must be framed unambiguously (``burrow.http.framing``: else
400 and the connection closes) and name the host the connection was opened for (else 421 and
the connection closes); then IP rules and Basic auth apply (``burrow.http.policy``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from burrow.http import framing, limits, pages
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


class _ClientError(Exception):
    """The visitor broke HTTP inside a body (a bad chunk); answered with h11's status hint."""

    def __init__(self, exc: h11.RemoteProtocolError) -> None:
        super().__init__(str(exc))
        self.status = exc.error_status_hint


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


def _server() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=limits.MAX_HEAD)


class H11Engine:
    """The h11 engine of one visitor connection: ``serve`` takes one ``Handover`` from the
    fast path and answers that request (and only that one)."""

    def __init__(self, visitor: Visitor) -> None:
        self.visitor = visitor
        self.options = visitor.options
        self.conn = _server()
        self.method = b""

    async def serve(self, handover: Handover) -> Unread | None:
        """Answer the request handed over; the visitor bytes that follow it, for the fast path,
        or None when the connection is done."""
        self.conn = conn = _server()
        self.method = b""
        unread = handover.unread
        if handover.sent is not None:
            keep = await self._finish(handover.sent, unread)
        else:
            if unread.data:
                conn.receive_data(unread.data)
            if unread.eof:
                conn.receive_data(b"")
            request = await self._read_head()
            keep = request is not None and await self._handle(request)
        if not keep:
            return None
        data, closed = self.conn.trailing_data
        self.conn = _server()  # nothing of this exchange is left to linger over
        return Unread(bytes(data), closed)

    def lingering(self) -> bool:
        """Whether the visitor may still be sending the body of a request this engine had."""
        return self.conn.their_state in (h11.SEND_BODY, h11.ERROR)

    # --- visitor I/O ------------------------------------------------------------------------------

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send_with_data_passthrough(event)
        if data:
            self.visitor.writelines(data)

    async def _read_head(self) -> h11.Request | None:
        """The next request head, or None when the visitor is done (closed, idle, or broke
        HTTP, in which case it was told so with 400/408/431)."""
        loop = asyncio.get_running_loop()
        started = bool(self.conn.trailing_data[0])
        try:
            async with asyncio.timeout(
                limits.HEAD_TIMEOUT if started else limits.IDLE_TIMEOUT
            ) as deadline:
                while True:
                    event = self.conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await self.visitor.recv()
                        if data and not started:
                            started = True
                            deadline.reschedule(loop.time() + limits.HEAD_TIMEOUT)
                        self.conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        return event
                    return None
        except TimeoutError:
            if started:
                await self._page(pages.head_too_slow())
            return None
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 501:
                # h11 refuses with 501 only a Transfer-Encoding other than one "chunked": the
                # body's length is then unknown, which RFC 9112 §6.3 answers with 400.
                await self._page(
                    pages.bad_framing(
                        "a request's Transfer-Encoding must be chunked alone (RFC 9112 §6.3)"
                    )
                )
            else:
                await self._page(pages.bad_head(exc.error_status_hint, exc))
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
                    async with asyncio.timeout(limits.BODY_TIMEOUT):
                        data = await self.visitor.recv()
                except TimeoutError:
                    raise ClientGone("the visitor stopped sending the request body") from None
                self.conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                raise ClientGone("request already complete")
            assert isinstance(event, h11.Event)
            return event

    # --- one request ------------------------------------------------------------------------------

    def _refusal(self, request: h11.Request, raw: list[Header]) -> pages.Fail | None:
        """Why this request may not go on at all (the connection then closes): its body's
        length is ambiguous, or it names another host than the connection's first request."""
        try:
            framing.request_framing(raw, request.http_version)
        except framing.FramingError as exc:
            return pages.bad_framing(str(exc))
        host = next((v for n, v in raw if n.lower() == b"host"), b"")
        if self.visitor.misdirected(host):
            return pages.misdirected(self.visitor.first_host or b"", host)
        return None

    async def _handle(self, request: h11.Request) -> bool:
        """Answer one request; True if the connection can carry another."""
        visitor = self.visitor
        self.method = request.method
        raw = list(request.headers.raw_items())
        exchange = Exchange(
            tunnel=self.options.name,
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            http_version=request.http_version.decode("latin-1"),
            request_headers=text_headers(_redacted(raw) if self.options.basic_auth else raw),
            client=visitor.client_label,
        )
        started = time.monotonic()
        ended = False
        refusal = self._refusal(request, raw)
        denial = None if refusal else check_access(self.options, visitor.peer_ip, raw)
        forwarded: list[Header] = []
        if refusal is None and denial is None:
            host = next((v for n, v in raw if n.lower() == b"host"), b"").decode("latin-1")
            forwarded = rewrite_request_headers(
                self.options,
                raw,
                peer_ip=visitor.peer_ip,
                scheme=visitor.scheme,
                public_host=host or visitor.public_netloc,
            )
            exchange.request_headers = text_headers(forwarded)

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                exchange.duration = time.monotonic() - started
                visitor.notify_end(exchange)

        visitor.notify_begin(exchange)
        try:
            if refusal is not None:
                exchange.error = refusal.detail
                log.debug("http %s %s: %s", exchange.method, exchange.target, refusal.detail)
                status, headers, body = refusal.page()
                return await self._reply(status, refusal.title, headers, body, exchange, True)
            if denial is not None:
                return await self._reply(
                    denial.status, denial.reason, denial.headers, denial.body, exchange
                )
            return await self._forward(request, forwarded, exchange, end)
        except pages.Fail as fail:
            exchange.error = fail.detail
            log.debug("http %s %s: %s", exchange.method, exchange.target, fail.detail)
            if self.conn.our_state is not h11.SEND_RESPONSE:
                return False  # the response had started: all we can do is cut it short
            status, headers, body = fail.page()
            return await self._reply(status, fail.title, headers, body, exchange)
        except _ClientError as exc:
            exchange.error = f"the visitor sent a malformed body: {exc}"
            if self.conn.our_state is h11.SEND_RESPONSE:
                bad = pages.bad_body(exc.status, exc)
                status, headers, body = bad.page()
                await self._reply(status, bad.title, headers, body, exchange)
            return False
        except ClientGone as exc:
            exchange.error = exchange.error or f"the visitor went away ({exc})"
            return False
        finally:
            end()

    async def _reply(
        self,
        status: int,
        reason: str,
        headers: list[Header],
        body: bytes,
        exchange: Exchange,
        close: bool = False,
    ) -> bool:
        """Answer from burrow itself; first discard what is left of the request body (within
        limits), so the visitor can keep the connection, as after a 401 it retries on it.
        With ``close`` the body is not read (its length is not trusted): the connection ends."""
        keep = not close and await self._discard_body()
        headers = list(headers) if keep else [*headers, (b"Connection", b"close")]
        exchange.status = status
        exchange.reason = reason
        exchange.response_headers = text_headers(headers)
        self._send(h11.Response(status_code=status, headers=headers, reason=reason.encode()))
        if self.method != b"HEAD":
            exchange.add_response_body(body)
            self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        await self.visitor.drain()
        return keep and self.conn.our_state is h11.DONE

    async def _page(self, fail: pages.Fail) -> None:
        """An error page outside any exchange (a bad head): best effort, then close."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, headers, body = fail.page()
        headers.append((b"Connection", b"close"))
        try:
            self._send(
                h11.Response(status_code=status, headers=headers, reason=fail.title.encode())
            )
            if self.method != b"HEAD":
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
            await self.visitor.drain()
        except (ClientGone, h11.LocalProtocolError):
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
            async with asyncio.timeout(limits.LINGER):
                while discarded <= limits.DISCARD_LIMIT:
                    event = await self._client_event()
                    if isinstance(event, h11.EndOfMessage):
                        return True
                    if isinstance(event, h11.Data):
                        discarded += len(event.data)
                    else:
                        return False
        except (TimeoutError, _ClientError, ClientGone):
            pass
        return False

    # --- an exchange the fast path started --------------------------------------------------------

    def _sync(self, request: bytes, unread: Unread) -> None:
        """Feed a request the fast path consumed (head and whole body) to the fresh h11, which
        so reaches the state it would be in had it read the request itself, then the bytes
        that followed it."""
        conn = self.conn
        conn.receive_data(request)
        try:
            for _ in range(3):  # Request, Data (when there is a body), EndOfMessage
                event = conn.next_event()
                if type(event) is h11.EndOfMessage:
                    if unread.data:
                        conn.receive_data(unread.data)
                    if unread.eof:
                        conn.receive_data(b"")
                    return
                if type(event) not in (h11.Request, h11.Data):
                    break
        except h11.RemoteProtocolError:
            pass
        raise ClientGone("h11 does not read the request as the fast path did")

    async def _finish(self, sent: InFlight, unread: Unread) -> bool:
        """Finish an exchange whose response is not one for the fast path: replay into the
        local side's h11 the request sent and the response bytes read, then relay as usual."""
        exchange = sent.exchange
        self.method = sent.method
        try:
            try:
                self._sync(sent.request, unread)
                return await self._take_over(sent)
            except BaseException:
                self.visitor.drop_upstream()
                raise
        except pages.Fail as fail:
            exchange.error = fail.detail
            log.debug("http %s %s: %s", exchange.method, exchange.target, fail.detail)
            if self.conn.our_state is not h11.SEND_RESPONSE:
                return False
            status, headers, body = fail.page()
            return await self._reply(status, fail.title, headers, body, exchange)
        except ClientGone as exc:
            exchange.error = exchange.error or f"the visitor went away ({exc})"
            return False
        finally:
            exchange.duration = time.monotonic() - sent.started
            self.visitor.notify_end(exchange)

    async def _take_over(self, sent: InFlight) -> bool:
        upstream = sent.upstream
        conn = upstream.conn
        try:
            conn.send(h11.Request(method=sent.method, target=sent.target, headers=sent.headers))
            if sent.body:
                conn.send(h11.Data(data=sent.body))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise pages.unrelayable_request(exc) from None
        conn.receive_data(sent.response)
        if sent.response_eof:
            conn.receive_data(b"")
        flow = _Flow(request_chunked=False, consumed=bool(sent.body), eom_seen=True)
        flow.request_finished = True
        flow.upstream_bytes = len(sent.response)

        def end() -> None:
            pass  # the exchange ends when _finish returns

        await self._relay(upstream, sent.exchange, flow, end)
        self._keep_or_drop(upstream)
        return self.conn.our_state is h11.DONE  # not when switched protocols or cut short

    def _keep_or_drop(self, upstream: Upstream) -> None:
        """Keep the local connection for the next request if its exchange ended cleanly."""
        conn = upstream.conn
        if upstream.keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            upstream.reused = True
        else:
            self.visitor.drop_upstream()

    # --- forwarding -------------------------------------------------------------------------------

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
        visitor = self.visitor
        while True:
            upstream = await visitor.kept_upstream()
            flow.reset_attempt()
            try:
                await self._exchange(upstream, request, headers, exchange, flow, end)
            except Retry:
                log.debug("kept local connection closed; dialling again")
                visitor.drop_upstream()
                continue
            except BaseException:
                visitor.drop_upstream()
                raise
            break
        self._keep_or_drop(upstream)
        if self.conn.our_state is not h11.DONE or flow.refused_continue:
            return False  # switched protocols, cut short, or a body the visitor will not send
        return await self._discard_body() and self.conn.their_state is h11.DONE

    async def _exchange(
        self,
        upstream: Upstream,
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
                await asyncio.wait({pump}, timeout=limits.BODY_GRACE)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                log.debug("request body after the response: %s", pump.exception())
        finally:
            for task in (pump, relay):
                task.cancel()
            await asyncio.gather(pump, relay, return_exceptions=True)

    async def _pump(self, upstream: Upstream, exchange: Exchange, flow: _Flow) -> None:
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
                    await _drain_upstream(upstream)
                elif isinstance(event, h11.EndOfMessage):
                    flow.eom_seen = True
                    trailers = list(event.headers.raw_items()) if flow.request_chunked else []
                    flow.consumed = flow.consumed or bool(trailers)
                    upstream.send(h11.EndOfMessage(headers=trailers))
                    break
                else:
                    raise ClientGone("the visitor closed before the request ended")
            await _drain_upstream(upstream)
        except (ConnectionError, OSError, TimeoutError):
            pass  # the local side broke or stopped reading; the relay reports it
        finally:
            flow.request_finished = True
            if flow.deadline is not None:
                loop = asyncio.get_running_loop()
                flow.deadline.reschedule(loop.time() + self.options.response_timeout)

    async def _await_continue(self, flow: _Flow) -> None:
        """Give the local service a moment to send its own 100 (or a refusal), else tell the
        visitor to go ahead ourselves, as RFC 9110 §10.1.1 lets a proxy do."""
        try:
            async with asyncio.timeout(limits.CONTINUE_WAIT):
                await flow.continue_decided.wait()
        except TimeoutError:
            pass
        if self.conn.they_are_waiting_for_100_continue and self.conn.our_state is h11.SEND_RESPONSE:
            flow.informed = True
            self._send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            await self.visitor.drain()

    async def _upstream_event(
        self, upstream: Upstream, flow: _Flow, idle: float | None = None
    ) -> h11.Event:
        """The local service's next event; ``idle`` bounds the wait for its next bytes."""
        where = self.options.local_address
        while True:
            try:
                event = upstream.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if flow.upstream_bytes == 0:
                    raise pages.closed_without_answer(where) from None
                raise pages.broken_response(where, exc) from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(idle):
                        data = await upstream.reader.read(limits.CHUNK)
                except TimeoutError:  # before OSError, of which it is a subclass
                    raise pages.went_silent(where, idle) from None
                except (ConnectionError, OSError):
                    data = b""  # a reset reads as an end; h11 says whether it was premature
                if not data and flow.upstream_bytes == 0 and _retryable(upstream, flow):
                    raise Retry
                flow.upstream_bytes += len(data)
                upstream.conn.receive_data(data)
                continue
            assert isinstance(event, h11.Event)
            return event

    async def _relay(
        self, upstream: Upstream, exchange: Exchange, flow: _Flow, end: Callable[[], None]
    ) -> None:
        """Local service's response -> visitor: 1xx as they come, the head rewritten, the body
        chunk by chunk (each flushed, so Server-Sent Events are not held back)."""
        loop = asyncio.get_running_loop()
        where = self.options.local_address
        try:
            async with asyncio.timeout(None) as deadline:
                flow.deadline = deadline
                if flow.request_finished:
                    deadline.reschedule(loop.time() + self.options.response_timeout)
                while True:
                    event = await self._upstream_event(upstream, flow)
                    if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                        self._relay_informational(event, flow)
                        await self.visitor.drain()
                        continue
                    break
        except TimeoutError:
            raise pages.no_answer(where, self.options.response_timeout) from None
        finally:
            flow.deadline = None
        if not isinstance(event, h11.Response | h11.InformationalResponse):
            raise pages.closed_without_answer(where)
        switching = event.status_code == 101
        raw = list(event.headers.raw_items())
        if not switching:
            # Framed by Transfer-Encoding (h11 read it so): a Content-Length beside it is
            # dropped, and the local connection, whose framing is doubtful, is not reused.
            single = framing.without_length(raw)
            if single is not raw:
                raw = single
                upstream.keep = False
        headers = rewrite_response_headers(self.options, raw, upgrade=switching)
        exchange.status = event.status_code
        exchange.reason = event.reason.decode("latin-1")
        exchange.response_headers = text_headers(headers)
        flow.refused_continue = self.conn.they_are_waiting_for_100_continue
        flow.continue_decided.set()
        response_cls = h11.InformationalResponse if switching else h11.Response
        try:
            self._send(
                response_cls(status_code=event.status_code, headers=headers, reason=event.reason)
            )
        except h11.LocalProtocolError as exc:
            raise pages.unrelayable_response(event.status_code, exc) from None
        await self.visitor.drain()
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
            event = await self._upstream_event(upstream, flow, limits.BODY_TIMEOUT)
            if isinstance(event, h11.Data):
                exchange.add_response_body(event.data)
                self._send(event)
                await self.visitor.drain()
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers.raw_items()) if trailers_ok else []
                self._send(h11.EndOfMessage(headers=trailers))
                await self.visitor.drain()
                return
            else:
                raise pages.ended_early()

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

    async def _splice(self, upstream: Upstream) -> None:
        """Raw bytes both ways after a protocol switch, each direction half-closed on its own;
        ends when both have ended (or either breaks)."""
        from_visitor = self.conn.trailing_data[0]
        from_local = upstream.conn.trailing_data[0]
        visitor = self.visitor

        async def visitor_to_local() -> None:
            if from_visitor:
                upstream.writer.write(from_visitor)
                await upstream.writer.drain()
            while data := await visitor.recv():
                upstream.writer.write(data)
                await upstream.writer.drain()
            if upstream.writer.can_write_eof():
                upstream.writer.write_eof()
            else:
                upstream.close()  # TLS cannot half-close: end both ways

        async def local_to_visitor() -> None:
            if from_local:
                visitor.writer.write(from_local)
                await visitor.drain()
            while data := await upstream.reader.read(limits.CHUNK):
                visitor.writer.write(data)
                await visitor.drain()
            if visitor.writer.can_write_eof():
                visitor.writer.write_eof()

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


async def _drain_upstream(upstream: Upstream) -> None:
    async with asyncio.timeout(limits.BODY_TIMEOUT):
        await upstream.writer.drain()


def _retryable(upstream: Upstream, flow: _Flow) -> bool:
    return upstream.reused and not flow.consumed and not flow.informed


def _redacted(headers: list[Header]) -> list[Header]:
    """A denied visitor's head for the inspector, without the password it tried."""
    return [(n, b"[redacted]" if n.lower() == b"authorization" else v) for n, v in headers]
