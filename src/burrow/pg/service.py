"""The agent side of a ``pg`` service: ``serve_pg`` on a stream a connector opened through the
relay. The stream's OPEN info gives the visitor's address (``src``) and, when the relay
carries it, the connector's identity (``identity``: its token's subject, or the shared-secret
holder)."""

from __future__ import annotations

import asyncio
from typing import Any

from burrow.events import EventSink
from burrow.net.channel import Channel
from burrow.pg.policy import PgPolicy
from burrow.pg.proxy import serve_pg
from burrow.pg.upstream import PgUpstream

__all__ = ["serve_pg_channel", "stream_identity", "stream_peer"]


def stream_peer(info: dict[str, Any]) -> tuple[str, int] | None:
    src = info.get("src")
    if isinstance(src, list | tuple) and len(src) >= 2:
        host, port = src[0], src[1]
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None


def stream_identity(info: dict[str, Any]) -> str | None:
    identity = info.get("identity")
    return identity[:256] if isinstance(identity, str) and identity else None


async def serve_pg_channel(
    channel: Channel,
    *,
    upstream: PgUpstream,
    policy: PgPolicy,
    on_event: EventSink | None,
) -> None:
    """Serve one accepted stream (``channel.info`` is its OPEN info) until it ends. An agent
    that is shutting down cancels this; the stream is then reset, not left half-open."""
    try:
        await serve_pg(
            channel,
            channel,
            upstream=upstream,
            policy=policy,
            peer=stream_peer(channel.info),
            identity=stream_identity(channel.info),
            on_event=on_event,
        )
    except asyncio.CancelledError:
        channel.reset("cancelled", "the agent is closing")
        raise
