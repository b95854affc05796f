"""The ``http`` service kind: a local web service, public as NAME.DOMAIN on the relay's HTTP
listener. Each visitor connection arrives as a stream; the agent's HTTP proxy serves it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from burrow.events import format_hostport
from burrow.http.policy import HttpOptions
from burrow.http.record import Exchange, Recorder
from burrow.net.channel import Channel
from burrow.roles.services import ActiveTunnel, IncomingStream

log = logging.getLogger("burrow.agent")


@dataclass
class HttpTunnelSpec:
    """A local web service, public as NAME.DOMAIN on the relay's HTTP listener."""

    options: HttpOptions
    name: str | None = None
    recorder: Recorder | None = None  # the inspector's store, if one runs
    kind = "http"

    @property
    def key(self) -> str:
        return self.name or f"http:{format_hostport(*self.options.local)}"

    def describe(self) -> dict[str, Any]:
        return {"local": format_hostport(*self.options.local)}

    def registered(self, tunnel: ActiveTunnel) -> None:
        self.options.name = tunnel.name or ""
        self.options.public_url = tunnel.public or ""

    def serve(self, stream: IncomingStream) -> None:
        channel = stream.channel(closer=_shutdown)
        task = stream.spawn(self._serve(stream, channel))
        # A visitor that goes away (reset, or closed while a request is under way, as
        # nginx reads it) stops the exchange: the local service is not kept waiting.
        channel.on_peer_reset = task.cancel
        channel.on_peer_end = partial(_abort_if_busy, task, channel)

    async def _serve(self, stream: IncomingStream, channel: Channel) -> None:
        from burrow.http.proxy import serve_http

        try:
            await serve_http(
                channel,
                channel,
                options=self.options,
                peer=stream.src,
                scheme=stream.opened.scheme or "http",
                recorder=_BusyMarker(channel, self.recorder),
            )
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("HTTP stream failed")
            channel.reset("error", "agent error")
        finally:
            await _finish(channel)
            stream.done(channel)


class _BusyMarker:
    """A recorder that marks the channel busy from a request's head to its response's end,
    so a visitor closing in between is taken as gone, and passes exchanges on."""

    def __init__(self, channel: Channel, inner: Recorder | None) -> None:
        self.channel = channel
        self.inner = inner
        #: Without an inspector behind it, nobody reads the headers as text.
        self.shows_headers = inner is not None

    def begin(self, exchange: Exchange) -> None:
        self.channel.busy = True
        if self.inner is not None:
            self.inner.begin(exchange)

    def end(self, exchange: Exchange) -> None:
        self.channel.busy = False
        if self.inner is not None:
            self.inner.end(exchange)


def _shutdown(channel: Channel) -> None:
    """The agent is stopping: a visitor between requests gets a clean end; one in the middle
    of an exchange gets a reset, never a truncated response that looks complete."""
    if channel.busy:
        channel.reset("cancelled", "agent shutting down")
    else:
        channel.close()


def _abort_if_busy(task: asyncio.Task[None], channel: Channel) -> None:
    """The visitor half-closed: if a request is still being served, treat it as gone."""
    if channel.busy:
        task.cancel()


async def _finish(channel: Channel) -> None:
    """End a visitor's stream after the proxy is done with it: half-close after the last
    response, and if the visitor is still sending (an upload answered early, say with 401),
    reset once the answer is on its way, so the relay stops waiting for it to finish."""
    channel.close()
    if channel.at_eof():
        return
    try:
        async with asyncio.timeout(5):
            await channel.drain()
    except (TimeoutError, ConnectionError):
        pass
    channel.reset("closed", "the agent finished this connection")
