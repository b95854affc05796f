"""Node links: the sessions a relay node keeps to the other nodes of its cluster.

A visitor may arrive at any node; when the agent it wants is on another node, this node opens
the visitor's stream on its link to that node, which joins it to the agent's stream as it
joins a connector's (``burrow.net.join``): credit flows end to end, so a slow visitor here
never grows memory there. A link is an ordinary client session (the same wire protocol, a
node is a client of its peers), authenticated by a token minted with the cluster's shared
token key and carrying a ``node`` claim, over TLS pinned to the fingerprint the peer
published in the registry. Links are dialled as soon as a peer appears and redialled while
it is listed; a peer whose record lapsed is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from burrow.addresses import DEFAULT_RELAY_PORT, parse_hostport
from burrow.errors import BurrowError
from burrow.events import EventSink, emit
from burrow.net.connection import SessionConnection
from burrow.roles.client import ClientConfig, RelayClient
from burrow.roles.registry import NodeInfo

log = logging.getLogger("burrow.cluster")

#: A node token's lifetime: minted afresh for every dial, so it only has to outlive one.
NODE_TOKEN_TTL = 3600
LINK_TIMEOUT = 5.0
#: Redial delays while a listed peer does not answer (it may be starting, or dead and about
#: to lapse from the registry).
REDIAL_MIN = 0.2
REDIAL_MAX = 2.0


class NodeLinks:
    """One link per peer node, kept up while the peer is listed."""

    def __init__(
        self,
        node_id: str,
        *,
        token_key: Callable[[], Any],
        on_event: EventSink | None = None,
    ) -> None:
        self.node_id = node_id
        self.token_key = token_key
        self.on_event = on_event
        self._links: dict[str, _Link] = {}

    def update(self, nodes: Mapping[str, NodeInfo]) -> None:
        """The cluster's nodes now: dial new ones, redial moved ones, forget gone ones."""
        for node_id, node in nodes.items():
            if node_id == self.node_id:
                continue
            link = self._links.get(node_id)
            if link is not None and (
                link.node.address,
                link.node.fingerprint,
                link.node.instance,
            ) != (node.address, node.fingerprint, node.instance):
                link.close("the node restarted or moved")
                link = None
            if link is None:
                self._links[node_id] = _Link(self, node)
        for node_id in list(self._links):
            if node_id not in nodes:
                self._links.pop(node_id).close("the node left the cluster")

    def conn(self, node_id: str) -> SessionConnection | None:
        """The open link to ``node_id``, if there is one now."""
        link = self._links.get(node_id)
        conn = link.conn if link is not None else None
        return conn if conn is not None and conn.is_open else None

    def state(self) -> dict[str, bool]:
        """Each peer and whether its link is up (for /healthz)."""
        return {node_id: self.conn(node_id) is not None for node_id in sorted(self._links)}

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.close("relay shutting down")
        for link in links:
            await link.wait_closed()


class _Link:
    """The session to one peer, redialled while it is listed."""

    def __init__(self, owner: NodeLinks, node: NodeInfo) -> None:
        self.owner = owner
        self.node = node
        self.conn: SessionConnection | None = None
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self, reason: str) -> None:
        self._closed = True
        self._task.cancel()
        if self.conn is not None:
            self.conn.close(reason)

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        conn = self.conn
        if conn is not None and not conn.closed.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(conn.closed)

    async def _run(self) -> None:
        owner, node = self.owner, self.node
        failures = 0
        while not self._closed:
            try:
                conn = await self._dial()
            except (BurrowError, OSError) as exc:
                failures += 1
                if failures == 1:
                    log.warning("cannot link to node %s at %s: %s", node.id, node.address, exc)
                await asyncio.sleep(min(REDIAL_MAX, REDIAL_MIN * 2 ** min(failures, 8)))
                continue
            failures = 0
            self.conn = conn
            emit(owner.on_event, "node_link_up", node=node.id, address=node.address)
            reason = await asyncio.shield(conn.closed)
            self.conn = None
            if not self._closed:
                emit(owner.on_event, "node_link_down", node=node.id, reason=reason)

    async def _dial(self) -> SessionConnection:
        from burrow.net.tls import TrustPolicy
        from burrow.tokens import mint

        key = self.owner.token_key()
        if key is None:
            raise BurrowError("this node has no token key (the cluster's shared token.key)")
        token = mint(
            key,
            (),
            (),
            NODE_TOKEN_TTL,
            time.time(),
            subject=f"node:{self.owner.node_id}",
            node=self.owner.node_id,
        )
        node = self.node
        trust = TrustPolicy(fingerprint=node.fingerprint) if node.fingerprint else None
        client = RelayClient(
            ClientConfig(
                relay=parse_hostport(node.address, DEFAULT_RELAY_PORT),
                token=token,
                trust=trust,
                connect_timeout=LINK_TIMEOUT,
            )
        )
        client.role_name = "node"
        conn = await client.connect_once(LINK_TIMEOUT)
        conn.peer = f"node {node.id}"
        return conn
