"""The serverless relay's message protocol (sans-I/O): JSON objects in WebSocket text frames.

API Gateway shapes it: text frames only (a binary frame closes the connection with 1003),
frames of at most 32 KB and messages of at most 128 KB (larger ones close with 1009), and
each message is billed per 32 KB. So every message is one JSON object of ASCII text, at most
``SEND_MESSAGE`` bytes, sent in frames of at most ``SEND_FRAME`` bytes; stream bytes travel
base64-encoded in chunks of at most ``CHUNK`` bytes.

Messages by type (``t``):

* ``hello`` (client to relay): ``role`` agent | gateway | connector, ``lease`` (an agent's
  secret that keeps its names across connections), ``tunnels`` ([{k, n}] to hold).
* ``welcome`` / ``error`` / ``pong`` (relay to client).
* ``ping`` (client to relay): the heartbeat that keeps the connection inside the 10-minute
  idle limit and renews the agent's names.
* Stream messages, one stream per HTTP request (or, for issue 12, per TCP connection):
  ``open`` (k http|tcp, n name, w window, src, sch scheme, m method, put upload URL),
  ``data``, ``head`` (an HTTP answer: st status, h headers, big: the body goes to S3),
  ``stored`` (the body is in S3), ``credit`` (n more bytes may be sent), ``reset`` (code,
  why), ``accept`` (a TCP stream's far end is connected). ``open``/``data``/``head``/
  ``stored`` carry ``q`` (a sequence number per direction, since API Gateway runs one Lambda
  per message and may deliver them out of order), ``d`` (base64 bytes) and ``fin`` (the
  sender's last message on this stream). A connector's ``open`` names no peer: ``$default``
  checks its token allows the name and sends it to the agent holding it.

Routing: a message a client sends for a peer names it (``to``) and proves it may (``mac``, an
HMAC of ``from|stream|to`` under the stack's route key, which only the relay's Lambdas hold);
a delivered message names its sender (``from``) and carries the ``mac`` the receiver needs to
answer. So the relay's Lambda forwards a chunk without a database read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

VERSION: Final = 1

#: AWS's limits (https://docs.aws.amazon.com/apigateway/latest/developerguide/
#: apigateway-execution-service-websocket-limits-table.html): what the emulator enforces.
AWS_MAX_FRAME: Final = 32 * 1024
AWS_MAX_MESSAGE: Final = 128 * 1024
#: What burrow sends: a margin below AWS's limits whatever "KB" means there.
SEND_FRAME: Final = 32000
SEND_MESSAGE: Final = 128000
#: Room kept for everything in a message but its data.
ENVELOPE: Final = 2048
#: Raw bytes per data message: base64 of CHUNK plus an envelope fits SEND_MESSAGE.
CHUNK: Final = (SEND_MESSAGE - ENVELOPE) // 4 * 3
#: Bytes a receiver takes on a new stream before it grants more with ``credit``.
INITIAL_WINDOW: Final = 1024 * 1024
#: Most credit one message may grant, and most window a stream may have outstanding.
MAX_WINDOW: Final = 64 * 1024 * 1024
#: Most out-of-order messages held per stream direction while an earlier one is missing.
MAX_PENDING: Final = 128
MAX_HEADERS: Final = 256
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_NAME: Final = 63
MAX_TUNNELS: Final = 16
MAX_ID: Final = 128
MAX_TEXT: Final = 512
MAX_URL: Final = 4096
#: Seconds between heartbeats: well inside the 10-minute idle limit.
HEARTBEAT: Final = 240.0
#: A connection is replaced (make before break) before the 2-hour limit.
MAX_AGE: Final = 110 * 60.0
#: Seconds a timestamped connect proof stays valid (clock skew allowance).
PROOF_WINDOW: Final = 300

TYPES: Final = frozenset(
    {
        "hello",
        "welcome",
        "error",
        "ping",
        "pong",
        "open",
        "data",
        "head",
        "stored",
        "credit",
        "reset",
        "accept",
    }
)
STREAM_TYPES: Final = frozenset({"open", "data", "head", "stored", "credit", "reset", "accept"})
SEQUENCED: Final = frozenset({"open", "data", "head", "stored"})
KINDS: Final = frozenset({"http", "tcp"})
ROLES: Final = frozenset({"agent", "gateway", "connector"})

_ID_RE: Final = re.compile(r"[A-Za-z0-9_=+/.:-]{1,128}")
_HEX_RE: Final = re.compile(r"[0-9a-f]{32,64}")
_CODE_RE: Final = re.compile(r"[a-z_]{1,32}")
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ProtocolError(ValueError):
    """A message broke the protocol: not JSON, too large, a field missing or out of range."""


# --- encoding ----------------------------------------------------------------------------------


def encode(message: dict[str, Any], limit: int = SEND_MESSAGE) -> str:
    """One message as compact ASCII JSON; ``ProtocolError`` if it would be over ``limit``."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=True)
    if len(text) > limit:
        raise ProtocolError(f"a {message.get('t')} message of {len(text)} bytes is over {limit}")
    return text


def frames(text: str, size: int = SEND_FRAME) -> list[str]:
    """``text`` cut into frame payloads of at most ``size`` bytes (ASCII, so chars are bytes)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_room(envelope: dict[str, Any], limit: int = SEND_MESSAGE) -> int:
    """How many raw bytes fit in ``envelope``'s ``d`` (with its ``fin`` flag) without passing
    ``limit``."""
    used = len(encode({**envelope, "d": "", "fin": False}, limit))
    return max(0, (limit - used - 8) // 4 * 3)


def chunks(data: bytes, first_room: int = CHUNK) -> Iterator[bytes]:
    """``data`` in pieces: the first at most ``first_room`` bytes, the others ``CHUNK``."""
    yield data[:first_room]
    for i in range(first_room, len(data), CHUNK):
        yield data[i : i + CHUNK]


# --- decoding ----------------------------------------------------------------------------------


def decode(text: str | bytes, limit: int = AWS_MAX_MESSAGE) -> dict[str, Any]:
    """Parse and check one message; ``ProtocolError`` says what is wrong with it."""
    if len(text) > limit:
        raise ProtocolError(f"message of {len(text)} bytes is over {limit}")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("not a JSON message") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message is a JSON object")
    kind = message.get("t")
    if kind not in TYPES:
        raise ProtocolError(f"unknown message type {kind!r}")
    _check(message, kind)
    return message


def _str(
    message: dict[str, Any],
    key: str,
    pattern: re.Pattern[str] | None = None,
    limit: int = MAX_TEXT,
    required: bool = True,
) -> None:
    value = message.get(key)
    if value is None and not required:
        return
    if (
        not isinstance(value, str)
        or len(value) > limit
        or (pattern is not None and not pattern.fullmatch(value))
    ):
        raise ProtocolError(f"{message['t']}: bad {key!r}")


def _int(message: dict[str, Any], key: str, low: int, high: int, required: bool = True) -> None:
    value = message.get(key)
    if value is None and not required:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{message['t']}: bad {key!r}")


def _check(message: dict[str, Any], kind: str) -> None:
    for key in ("to", "from"):
        _str(message, key, _ID_RE, MAX_ID, required=False)
    _str(message, "mac", _HEX_RE, 64, required=False)
    if kind in STREAM_TYPES:
        _str(message, "s", _ID_RE, MAX_ID)
    if kind in SEQUENCED:
        _int(message, "q", 0, 1 << 40)
        _str(message, "d", None, SEND_MESSAGE, required=False)
        if not isinstance(message.get("fin", False), bool):
            raise ProtocolError(f"{kind}: bad 'fin'")
    if kind == "hello":
        _int(message, "v", 1, 1 << 16)
        if message.get("role") not in ROLES:
            raise ProtocolError("hello: bad 'role'")
        _str(message, "lease", _HEX_RE, 64, required=False)
        tunnels = message.get("tunnels", [])
        if not isinstance(tunnels, list) or len(tunnels) > MAX_TUNNELS:
            raise ProtocolError("hello: bad 'tunnels'")
        for tunnel in tunnels:
            if not isinstance(tunnel, dict) or tunnel.get("k") not in KINDS:
                raise ProtocolError("hello: bad tunnel")
            name = tunnel.get("n")
            if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME):
                raise ProtocolError("hello: bad tunnel name")
    elif kind in ("ping", "pong"):
        _int(message, "n", 0, 1 << 53)
    elif kind == "error":
        _str(message, "code", _CODE_RE, 32)
        _str(message, "msg", None, MAX_TEXT)
    elif kind == "open":
        if message.get("k") not in KINDS:
            raise ProtocolError("open: bad 'k'")
        _str(message, "n", None, MAX_NAME)
        _int(message, "w", 0, MAX_WINDOW)
        _str(message, "put", None, MAX_URL, required=False)
        _str(message, "m", None, 32, required=False)
        _str(message, "sch", None, 16, required=False)
        src = message.get("src")
        if src is not None and not (
            isinstance(src, list)
            and len(src) == 2
            and isinstance(src[0], str)
            and len(src[0]) <= 64
            and isinstance(src[1], int)
        ):
            raise ProtocolError("open: bad 'src'")
    elif kind == "head":
        _int(message, "st", 100, 999)
        headers = message.get("h")
        if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
            raise ProtocolError("head: bad 'h'")
        for pair in headers:
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and isinstance(pair[0], str)
                and isinstance(pair[1], str)
            ):
                raise ProtocolError("head: bad header")
    elif kind == "stored":
        _int(message, "size", 0, 1 << 40)
    elif kind == "credit":
        _int(message, "n", 1, MAX_WINDOW)
    elif kind == "reset":
        _str(message, "code", _CODE_RE, 32)
        _str(message, "why", None, MAX_TEXT, required=False)


def payload(message: dict[str, Any]) -> bytes:
    """The stream bytes a message carries (``d``, base64), checked strictly."""
    text = message.get("d")
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{message['t']}: 'd' is not base64") from None


# --- routing and proofs ------------------------------------------------------------------------


def derive(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose from the stack's token key (route MACs, gateway proofs)."""
    return hmac.new(secret, f"burrow-serverless-{purpose}-v1".encode(), hashlib.sha256).digest()


def route_mac(key: bytes, sender: str, stream: str, receiver: str) -> str:
    """Proof that ``receiver`` may send on ``stream`` back to ``sender``."""
    text = f"{sender}|{stream}|{receiver}".encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()[:32]


def check_route(key: bytes, message: dict[str, Any], sender: str) -> str:
    """The peer a client's stream message is for, if its ``mac`` proves ``sender`` may reach
    it; ``ProtocolError`` otherwise."""
    to, mac, stream = message.get("to"), message.get("mac"), message.get("s")
    if not isinstance(to, str) or not isinstance(mac, str) or not isinstance(stream, str):
        raise ProtocolError(f"{message.get('t')}: no route")
    if not hmac.compare_digest(route_mac(key, to, stream, sender), mac):
        raise ProtocolError(f"{message.get('t')}: the route does not verify")
    return to


def transcript(role: str, host: str, timestamp: int, nonce: str) -> bytes:
    """What a connect proof signs: the role, the API's host, a time and a fresh nonce."""
    return f"burrow-serverless-v1\n{role}\n{host.lower()}\n{timestamp}\n{nonce}".encode()


@dataclass(frozen=True, slots=True)
class Proof:
    """A parsed ``Authorization`` header of a WebSocket connect."""

    role: str
    timestamp: int
    nonce: str
    mac: str
    claims: str = ""  # an agent's token claims (base64url)


_PROOF_RE: Final = re.compile(
    r"Burrow-(Token|Gateway) (?:([A-Za-z0-9_-]{1,8192})\.)?"
    r"([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})"
)


def parse_proof(header: str) -> Proof:
    match = _PROOF_RE.fullmatch(header.strip()) if len(header) < 9000 else None
    if match is None:
        raise ProtocolError("the Authorization header is not a burrow proof")
    scheme, claims, timestamp, nonce, mac = match.groups()
    role = "agent" if scheme == "Token" else "gateway"
    if (role == "agent") != bool(claims):
        raise ProtocolError("the Authorization header is not a burrow proof")
    return Proof(role, int(timestamp), nonce, mac, claims or "")


def agent_proof(token_claims: str, mac: str, timestamp: int, nonce: str) -> str:
    return f"Burrow-Token {token_claims}.{timestamp}.{nonce}.{mac}"


def gateway_proof(key: bytes, host: str, timestamp: int, nonce: str) -> str:
    mac = hmac.new(key, transcript("gateway", host, timestamp, nonce), hashlib.sha256)
    return f"Burrow-Gateway {timestamp}.{nonce}.{mac.hexdigest()}"


def check_gateway_proof(key: bytes, proof: Proof, host: str) -> bool:
    expected = hmac.new(
        key, transcript("gateway", host, proof.timestamp, proof.nonce), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, proof.mac)


# --- in-order delivery -------------------------------------------------------------------------


@dataclass
class Reorder:
    """Puts one stream direction's sequenced messages back in order: ``push`` returns those
    now deliverable. Bounded: more than ``MAX_PENDING`` held out of order is an error."""

    expected: int = 0
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    ended: bool = False

    def push(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        seq = message["q"]
        if self.ended or seq < self.expected or seq in self.pending:
            return []  # a duplicate, or after the end: ignored
        if seq != self.expected:
            if len(self.pending) >= MAX_PENDING:
                raise ProtocolError(f"more than {MAX_PENDING} messages out of order")
            self.pending[seq] = message
            return []
        ready = [message]
        self.expected += 1
        while self.expected in self.pending:
            ready.append(self.pending.pop(self.expected))
            self.expected += 1
        if any(m.get("fin") for m in ready):
            self.ended = True
            self.pending.clear()
        return ready


# --- HTTP heads on the wire --------------------------------------------------------------------


def check_headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    """Headers for a ``head`` message (latin-1 text), refusing what HTTP forbids."""
    out: list[list[str]] = []
    total = 0
    for name, value in headers:
        if not _TOKEN_RE.fullmatch(name) or b"\r" in value or b"\n" in value or b"\0" in value:
            raise ProtocolError(f"bad header {name!r}")
        total += len(name) + len(value)
        out.append([name.decode("latin-1"), value.decode("latin-1")])
    if total > MAX_HEADER_BYTES or len(out) > MAX_HEADERS:
        raise ProtocolError("response headers too large")
    return out
