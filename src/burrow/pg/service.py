"""The ``pg`` service kind: a PostgreSQL server offered through the relay with ``serve_pg`` on
every stream, so the database leg is verified TLS whatever the client does, the allow-lists
hold, cancels work and each connection is logged with who made it. The stream's OPEN info
gives the visitor's address (``src``) and the connector's identity (``peer``: its token's
subject, or the shared-secret holder), which the relay sets."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from burrow.events import EventSink, emit
from burrow.net.channel import Channel
from burrow.pg.policy import PgPolicy
from burrow.pg.proxy import serve_pg
from burrow.pg.upstream import PgUpstream
from burrow.roles.services import ActiveTunnel, IncomingStream

__all__ = ["PgService", "serve_pg_channel", "stream_identity", "stream_peer"]


def stream_peer(info: dict[str, Any]) -> tuple[str, int] | None:
    src = info.get("src")
    if isinstance(src, list | tuple) and len(src) >= 2:
        host, port = src[0], src[1]
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None


def stream_identity(info: dict[str, Any]) -> str | None:
    identity = info.get("peer")
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


@dataclass
class PgService:
    """A PostgreSQL server behind pgproxy: ``private`` (a name connectors reach, the usual
    case) or a public TCP port of the relay."""

    upstream: PgUpstream
    name: str | None = None
    policy: PgPolicy = field(default_factory=PgPolicy)
    private: bool = True

    @property
    def kind(self) -> str:
        return "private" if self.private else "tcp"

    @property
    def key(self) -> str:
        return self.name or f"pg:{self.upstream.address}"

    def describe(self) -> dict[str, Any]:
        return {"local": self.upstream.address, "protocol": "postgresql"}

    def registered(self, tunnel: ActiveTunnel) -> None:
        pass

    def serve(self, stream: IncomingStream) -> None:
        channel = stream.channel()
        task = stream.spawn(self._serve(stream, channel))
        channel.on_peer_reset = task.cancel

    async def _serve(self, stream: IncomingStream, channel: Channel) -> None:
        try:
            await serve_pg_channel(
                channel, upstream=self.upstream, policy=self.policy, on_event=stream.host.on_event
            )
        except asyncio.CancelledError:
            pass
        finally:
            stream.done(channel)


def warn_upstream(service: PgService, on_event: EventSink | None) -> None:
    """Say at start what a user must know about this service's database leg."""
    for message in service.upstream.warnings():
        emit(on_event, "warning", message=message)
    if not service.private:
        emit(
            on_event,
            "warning",
            message=f"pg {service.key}: visitors reach the relay's public port in plaintext "
            "(the database leg is TLS); prefer --private with `burrow connect`",
        )
