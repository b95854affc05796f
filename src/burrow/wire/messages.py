"""Typed control messages and stream-open metadata, checked as they arrive.

The session carries both as JSON objects (CONTROL frames on stream 0, OPEN frames); these
structs give them names and types. Unknown fields are ignored, so a newer peer may add some
without breaking an older one; a wrong type or an unknown ``op`` is a ``MessageError`` whose
text is bounded and safe to send back to the peer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final

import msgspec

#: The longest piece of a peer's input quoted back in an error message.
QUOTE_LIMIT: Final = 40


class ResetCode(StrEnum):
    """Why a stream ended abnormally; the numbers are what RESET frames carry."""

    REFUSED = "refused"  # the far end refused the connection
    UNREACHABLE = "unreachable"  # no route / host unreachable / does not resolve
    TIMEOUT = "timeout"  # the far end did not answer in time
    NOT_ALLOWED = "not_allowed"  # policy forbids it
    NO_SUCH_TUNNEL = "no_such_tunnel"  # the tunnel or service is gone
    CANCELLED = "cancelled"  # the opener gave up
    ERROR = "error"  # anything else
    TOO_MANY_STREAMS = "too_many_streams"
    CLOSED = "closed"  # the far end finished and reads no more (not an error)
    LIMITED = "limited"  # a limit (streams per session, opens per second) refused it


class MessageError(ValueError):
    """A control message or open request that does not parse; ``str()`` is safe to send."""


def quote(value: object) -> str:
    """A peer's value for an error message: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


# --- stream open ---------------------------------------------------------------------------


class OpenInfo(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """What an OPEN frame says about the stream: which tunnel it is for, and who it is from.

    A visitor of a public TCP port: ``port``; of an HTTP name: ``http`` (and ``scheme``); a
    connector's stream: ``service`` (and ``target`` for an exit). ``src``/``dst`` are the
    visitor's and the relay's addresses; ``peer`` names the connector (its token's holder: the
    subject or id; ``secret`` for a shared-secret holder), set by the relay, never trusted from
    a client. In a cluster a node passes a stream to the node holding its agent over a node
    link: ``peer`` is kept across that hop, and only a peer node may open by ``port`` or
    ``http`` (a client's OPEN names a ``service``).
    """

    port: int | None = None
    http: str | None = None
    scheme: str | None = None
    service: str | None = None
    target: str | None = None
    src: tuple[str, int] | None = None
    dst: tuple[str, int] | None = None
    peer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def parse_open(info: dict[str, Any]) -> OpenInfo:
    try:
        return msgspec.convert(info, OpenInfo)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bad open request: {_short(exc)}") from None


# --- control messages -----------------------------------------------------------------------


class Register(msgspec.Struct, tag_field="op", tag="register", omit_defaults=True):
    """Agent to relay: hold a port (``tcp``) or a name (``http``, ``private``, ``exit``)."""

    kind: str
    key: str = ""
    id: int | None = None
    port: int | None = None
    name: str | None = None
    exact: bool = True


class Registered(msgspec.Struct, tag_field="op", tag="registered", omit_defaults=True):
    """Relay to agent: what it got (a port and the host to show, or a name and its URL)."""

    id: int | None = None
    port: int | None = None
    host: str | None = None
    name: str | None = None
    url: str | None = None


class ErrorReply(msgspec.Struct, tag_field="op", tag="error", omit_defaults=True):
    """Relay to agent: a request was refused; ``code`` is stable, ``message`` is for people."""

    code: str
    message: str
    id: int | None = None


class Unregister(msgspec.Struct, tag_field="op", tag="unregister", omit_defaults=True):
    """Agent to relay: give up a port (or a name) now, without waiting for the lease."""

    port: int | None = None
    name: str | None = None
    kind: str | None = None
    id: int | None = None


class TunnelMoved(msgspec.Struct, tag_field="op", tag="tunnel_moved", omit_defaults=True):
    """Relay to agent: another session of the same identity took this tunnel over."""

    key: str
    port: int | None = None


class Closed(msgspec.Struct, tag_field="op", tag="closed", omit_defaults=True):
    """Relay to agent: the relay closed a tunnel the agent held (its token was revoked, say)."""

    key: str
    code: str
    message: str = ""


Control = Register | Registered | ErrorReply | Unregister | TunnelMoved | Closed


def parse_control(message: dict[str, Any]) -> Control:
    """The typed form of a CONTROL message; ``MessageError`` (bounded text) if it is not one."""
    op = message.get("op")
    if op not in _OPS:
        raise MessageError(f"unknown op {quote(op)}")
    try:
        parsed: Control = msgspec.convert(message, Control)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bad {op} message: {_short(exc)}") from None
    return parsed


def to_message(struct: Control) -> dict[str, Any]:
    """The JSON object a CONTROL frame carries for ``struct``."""
    return msgspec.to_builtins(struct)  # type: ignore[no-any-return]


_OPS: Final = frozenset({"register", "registered", "error", "unregister", "tunnel_moved", "closed"})


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."
