"""The agent's side of an HTTP tunnel: one visitor connection in, requests relayed to the local
web service, responses streamed back, each exchange shown to the inspector.

Two engines take turns on a connection. The fast path (``burrow.http.fastpath``) relays the
common exchange without h11; whatever it does not take it hands to the h11 engine
(``burrow.http.h11engine``) through one ``Handover`` (``burrow.http.handover``), and takes the
following bytes back when that exchange is done. What both share lives in ``Visitor``
(``burrow.http.visitor``): the visitor's I/O, the kept local connection (``upstream``), the
host the connection was opened for. The pages burrow answers with are in ``pages``, the bounds
in ``limits``, body framing rules in ``framing``, policies and header rewriting in ``policy``.

This module is the entry point the agent and the CLI import: ``serve_http``, ``replay`` and
``local_ssl_context``.
"""

from __future__ import annotations

from burrow.http.fastpath import FastPath
from burrow.http.h11engine import H11Engine
from burrow.http.policy import HttpOptions
from burrow.http.record import Recorder
from burrow.http.replay import replay
from burrow.http.upstream import local_ssl_context
from burrow.http.visitor import ClientGone, Reader, Visitor, Writer

__all__ = ["Reader", "Writer", "local_ssl_context", "replay", "serve_http"]


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
    visitor = Visitor(reader, writer, options, peer, scheme, recorder)
    fast = FastPath(visitor)
    engine = H11Engine(visitor)
    try:
        while True:
            outcome = await fast.cycle()
            if outcome is True:
                continue
            if outcome is False:
                break
            unread = await engine.serve(outcome)
            if unread is None:
                break
            fast.resume(unread)
    except ClientGone:
        pass
    finally:
        fast.close()
        visitor.drop_upstream()
        await visitor.close(linger=engine.lingering())
