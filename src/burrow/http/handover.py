"""The one hand-over between the proxy's two engines: what the fast path gives the h11 engine
when an exchange is not one for it, and what comes back.

The fast path (``burrow.http.fastpath``) takes the common exchange without h11. It hands over
either before it consumed anything of a request (``Handover.sent`` is None: h11 parses the
request from ``unread``), or after the request went to the local service and the response head
turned out not to be one it relays (``sent`` holds everything both sides have seen, so the h11
engine replays it into fresh state machines and finishes the exchange). The h11 engine gives
back the visitor bytes that follow its exchange as an ``Unread``, and the fast path goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from burrow.http.policy import Header
from burrow.http.record import Exchange
from burrow.http.upstream import Upstream


class Unread(NamedTuple):
    """Visitor bytes not yet parsed, and whether the visitor has half-closed after them."""

    data: bytes
    eof: bool


@dataclass(eq=False, frozen=True)
class InFlight:
    """An exchange the fast path started and the h11 engine finishes: the visitor's request
    was read in full and sent; some bytes of the response were read."""

    request: bytes  # the visitor's request as it arrived: head and whole body
    method: bytes
    target: bytes
    headers: list[Header]  # the head as the local service got it
    body: bytes
    upstream: Upstream  # the local connection the request went out on
    response: bytes  # the local service's bytes read so far (a head not for the fast path)
    response_eof: bool  # and whether it closed after them
    exchange: Exchange  # begun (the inspector was told), not ended
    started: float  # ``time.monotonic()`` when the exchange began


@dataclass(eq=False, frozen=True)
class Handover:
    """The fast path's hand-over: the unparsed visitor bytes, and the exchange under way if
    the request was sent already."""

    unread: Unread
    sent: InFlight | None = None
