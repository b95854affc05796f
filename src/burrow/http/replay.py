"""The inspector's replay: a recorded request sent to the local service again, outside any
visitor connection, its answer recorded as a new exchange."""

from __future__ import annotations

import asyncio
import time

import h11

from burrow.http import limits, pages
from burrow.http.policy import Header, HttpOptions
from burrow.http.record import Exchange, Recorder, text_headers
from burrow.http.upstream import dial

#: Request headers a replay does not copy: framing and hop-by-hop, which h11 writes anew.
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
        request_headers=text_headers(headers),
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
        await _send(options, new, headers, body)
    except pages.Fail as fail:
        new.status = new.status or fail.status
        new.reason = new.reason or fail.title
        new.error = fail.detail
    finally:
        new.duration = time.monotonic() - started
        if recorder is not None:
            recorder.end(new)
    return new


async def _send(options: HttpOptions, new: Exchange, headers: list[Header], body: bytes) -> None:
    upstream = await dial(options)
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
            raise pages.unreplayable(exc) from None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(options.response_timeout) as deadline:
            await upstream.writer.drain()
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise pages.broken_response(where, exc) from None
                if event is h11.NEED_DATA:
                    conn.receive_data(await upstream.reader.read(limits.CHUNK))
                elif isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                    continue
                elif isinstance(event, h11.Response | h11.InformationalResponse):
                    new.status = event.status_code
                    new.reason = event.reason.decode("latin-1")
                    new.response_headers = text_headers(list(event.headers.raw_items()))
                    if isinstance(event, h11.InformationalResponse):
                        return  # a replayed upgrade: the handshake is the whole story
                    deadline.reschedule(loop.time() + limits.REPLAY_TIMEOUT)
                elif isinstance(event, h11.Data):
                    new.add_response_body(event.data)
                else:
                    return  # EndOfMessage (or ConnectionClosed)
    except TimeoutError:
        if new.status is None:
            raise pages.no_answer(where, options.response_timeout) from None
        new.error = f"stopped reading the response after {limits.REPLAY_TIMEOUT:g} s"
    except (ConnectionError, OSError) as exc:
        raise pages.connection_broke(where, exc) from None
    finally:
        upstream.close()
