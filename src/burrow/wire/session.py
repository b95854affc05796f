"""The session state machine: handshake, then many streams with credit flow control.

Sans-I/O in the manner of websockets and h11: ``receive_data()`` takes bytes and returns events,
the ``send_*``/``open_stream``/... methods queue frames, and ``data_to_send()`` hands over the
buffers to write. No sockets, no clock, no asyncio: timers (heartbeats) belong to the caller.

Streams are numbered by their opener: clients use odd ids, relays even ids, each increasing, so a
frame for an id at or below the highest seen is for a stream that has ended (ignored: frames
cross on the wire), and a frame for a higher id that is not an OPEN is a protocol error.

Each side grants the other ``window`` bytes of credit per stream and tops it up with WINDOW
frames as the application reports bytes consumed, so one slow reader never holds more than its
window in the relay or the agent, and never stalls other streams.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from burrow.errors import BurrowError
from burrow.wire import handshake as hs
from burrow.wire.errors import (
    BadFrame,
    BadPreface,
    FlowControlError,
    HandshakeRejected,
    ProtocolError,
    UnknownStream,
)
from burrow.wire.frames import (
    DATA_TYPE,
    HEADER,
    MAX_DATA_CHUNK,
    MAX_META_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from burrow.wire.messages import ResetCode

DEFAULT_WINDOW: Final = 4 * 1024 * 1024
MIN_WINDOW: Final = 64 * 1024
MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_MAX_STREAMS: Final = 65536
#: Payloads up to this size are joined to their header rather than written beside it.
SMALL_DATA: Final = 8192
_U32: Final = struct.Struct(">I")
_RESET: Final = struct.Struct(">H")

#: RESET codes: why a stream ended abnormally. Values on the wire, names in logs and errors.
RESET_CODES: Final = {
    1: ResetCode.REFUSED,
    2: ResetCode.UNREACHABLE,
    3: ResetCode.TIMEOUT,
    4: ResetCode.NOT_ALLOWED,
    5: ResetCode.NO_SUCH_TUNNEL,
    6: ResetCode.CANCELLED,
    7: ResetCode.ERROR,
    8: ResetCode.TOO_MANY_STREAMS,
    9: ResetCode.CLOSED,
    10: ResetCode.LIMITED,
}
RESET_NUMBERS: Final[dict[str, int]] = {name: number for number, name in RESET_CODES.items()}


class Role(Enum):
    CLIENT = "client"
    RELAY = "relay"


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# --- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class HandshakeComplete:
    session_id: str
    version: int
    identity: str | None
    heartbeat: float


@dataclass(slots=True)
class HandshakeFailed:
    """Relay side: the client was refused (the REJECT frame is queued to tell it why)."""

    code: str
    message: str


@dataclass(slots=True)
class StreamOpened:
    stream_id: int
    info: dict[str, Any]


@dataclass(slots=True)
class StreamAccepted:
    stream_id: int


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class WindowOpened:
    stream_id: int


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed its side: it will send no more data on this stream."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: str
    reason: str


@dataclass(slots=True)
class ControlReceived:
    message: dict[str, Any]


@dataclass(slots=True)
class PongReceived:
    payload: bytes


@dataclass(slots=True)
class GoAwayReceived:
    code: str
    reason: str


Event = (
    HandshakeComplete
    | HandshakeFailed
    | StreamOpened
    | StreamAccepted
    | DataReceived
    | WindowOpened
    | StreamEnded
    | StreamReset
    | ControlReceived
    | PongReceived
    | GoAwayReceived
)


class WindowPool:
    """A budget for the receive windows granted to peers, in bytes: what they may send before
    anyone reads it. A session draws its streams' windows from its own pool, which may draw
    from a shared one (the relay's total), so many streams cannot add up to unbounded memory.

    Windows start at the session's ``window`` whatever the pool holds (the peer already has
    that credit); they grow only while every pool has room and shrink while one is over.
    """

    __slots__ = ("limit", "parent", "used")

    def __init__(self, limit: int, parent: WindowPool | None = None) -> None:
        self.limit = limit
        self.parent = parent
        self.used = 0

    @property
    def over(self) -> int:
        """Bytes granted beyond the budget, here or in a parent."""
        mine = self.used - self.limit
        return max(mine, self.parent.over if self.parent is not None else 0, 0)

    def add(self, size: int) -> None:
        self.used += size
        if self.parent is not None:
            self.parent.add(size)

    def reserve(self, size: int) -> bool:
        """Take ``size`` if every pool up the chain has room; False (and nothing taken) if not."""
        pool: WindowPool | None = self
        while pool is not None:
            if pool.used + size > pool.limit:
                return False
            pool = pool.parent
        self.add(size)
        return True

    def release(self, size: int) -> None:
        self.add(-size)


class _Stream:
    __slots__ = ("credit", "limit", "local_fin", "receivable", "remote_fin", "unacked")

    def __init__(self, credit: int, receivable: int) -> None:
        self.credit = credit  # bytes we may still send
        self.receivable = receivable  # bytes the peer may still send us
        self.limit = receivable  # the window this stream has now (grows and shrinks)
        self.unacked = 0  # bytes consumed by the application, not yet granted back
        self.local_fin = False
        self.remote_fin = False


class Session:
    """One burrow session, seen from one end."""

    def __init__(
        self,
        role: Role,
        *,
        secret: str | None = None,
        identity_key: Ed25519PrivateKey | None = None,
        window: int = DEFAULT_WINDOW,
        max_window: int | None = None,
        pool: WindowPool | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        heartbeat: float = 5.0,
        session_id: str | None = None,
        software: str = "",
        token_prover: Callable[[bytes], tuple[str, str]] | None = None,
        token_verifier: Callable[[str, str, bytes], Any] | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise ValueError(f"window must be between {MIN_WINDOW} and {MAX_WINDOW}")
        self.role = role
        self.state = State.HANDSHAKE
        self.secret = secret
        self.identity_key = identity_key
        self.window = window  # each stream's first window, announced in the handshake
        #: How far a busy stream's window may grow (the same as ``window``: it never grows).
        self.max_window = max(window, min(max_window or window, MAX_WINDOW))
        self.pool = pool if pool is not None else WindowPool(MAX_WINDOW * max_streams)
        self.peer_window = 0
        self.max_streams = max_streams
        self.heartbeat = heartbeat
        self.session_id = session_id or os.urandom(8).hex()
        self.software = software
        self.token_prover = token_prover  # client: transcript -> (claims, mac)
        self.token_verifier = token_verifier  # relay: (claims, mac, transcript) -> scope, or raise
        self.allow_anonymous = allow_anonymous  # relay: clients with neither secret nor token
        self.scope: Any = None  # relay: what the client may do (None: everything)
        self.version = 0
        self.peer_identity: str | None = None
        self.close_reason: ProtocolError | HandshakeRejected | None = None
        #: A bug met while handling the peer's input (a verifier that raised), for the log.
        self.internal_error: Exception | None = None
        self._decoder = FrameDecoder()
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role is Role.CLIENT else 2
        self._peer_parity = 0 if role is Role.CLIENT else 1
        self._highest_peer_id = 0
        self._nonce = os.urandom(hs.NONCE_SIZE)
        self._peer_nonce = b""
        self._preface_needed = len(hs.PREFACE) if role is Role.RELAY else 0
        self._hello_sent = False
        self._auth_expected = False

    # --- inspection -------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete incoming frame held by the decoder."""
        return self._decoder.buffered

    def credit(self, stream_id: int) -> int:
        """How many bytes may be sent on ``stream_id`` now (0 if the stream is gone)."""
        stream = self._streams.get(stream_id)
        return stream.credit if stream is not None and not stream.local_fin else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # --- output -------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | memoryview]:
        """The buffers to write, in order; the list is handed over and cleared."""
        out = self._out
        self._out = []
        return out

    # --- handshake ------------------------------------------------------------------------

    def start(self) -> None:
        """Client: queue the preface and HELLO."""
        if self.role is not Role.CLIENT or self._hello_sent:
            raise RuntimeError("start() is for a client, once")
        self._hello_sent = True
        hello = hs.Hello(
            versions=list(hs.VERSIONS),
            nonce=self._nonce.hex(),
            window=self.window,
            identity=hs.public_identity(self.identity_key) if self.identity_key else None,
            software=self.software,
        )
        self._out.append(hs.PREFACE + encode_frame(FrameType.HELLO, 0, hs.encode(hello)))

    def _on_handshake_frame(self, frame_type: int, payload: bytes | memoryview) -> list[Event]:
        if self.role is Role.RELAY:
            if frame_type == FrameType.HELLO and not self._peer_nonce:
                return self._on_hello(hs.decode(payload, hs.Hello))
            if frame_type == FrameType.AUTH and self._auth_expected:
                return self._on_auth(hs.decode(payload, hs.Auth))
        else:
            if frame_type == FrameType.CHALLENGE and not self._peer_nonce:
                self._on_challenge(hs.decode(payload, hs.Challenge))
                return []
            if frame_type == FrameType.WELCOME and self._peer_nonce:
                welcome = hs.decode(payload, hs.Welcome)
                _check_heartbeat(welcome.heartbeat)
                self.state = State.OPEN
                self.session_id = welcome.session
                self.heartbeat = welcome.heartbeat
                return [HandshakeComplete(welcome.session, self.version, None, welcome.heartbeat)]
            if frame_type == FrameType.REJECT:
                reject = hs.decode(payload, hs.Reject)
                self.state = State.CLOSED
                self.close_reason = HandshakeRejected(reject.code, reject.message)
                raise self.close_reason
        if frame_type == FrameType.GOAWAY and self.role is Role.CLIENT:
            # The relay hit a protocol error in our handshake: keep its reason.
            message = _decode_object(payload, "goaway")
            self.state = State.CLOSED
            self.close_reason = HandshakeRejected(
                str(message.get("code", "error"))[:64], str(message.get("reason", ""))[:512]
            )
            raise self.close_reason
        raise BadFrame(f"unexpected {_name(frame_type)} frame during the handshake")

    def _on_hello(self, hello: hs.Hello) -> list[Event]:
        self._peer_nonce = hs.parse_nonce(hello.nonce)
        common = set(hello.versions) & set(hs.VERSIONS)
        if not common:
            shown = "[" + ", ".join(str(v)[:12] for v in hello.versions[:8]) + "]"
            return self._reject(
                "version",
                f"no common protocol version (client speaks {shown}, relay "
                f"{list(hs.VERSIONS)}); upgrade the older side",
            )
        if not MIN_WINDOW <= hello.window <= MAX_WINDOW:
            raise BadFrame(f"window {hello.window} out of range")
        self.version = max(common)
        self.peer_window = hello.window
        self.peer_identity = hello.identity
        challenge = hs.Challenge(
            version=self.version,
            nonce=self._nonce.hex(),
            auth="none" if self.secret is None else "secret",
            window=self.window,
            heartbeat=self.heartbeat,
        )
        self._out.append(encode_frame(FrameType.CHALLENGE, 0, hs.encode(challenge)))
        self._auth_expected = True
        return []

    def _on_auth(self, auth: hs.Auth) -> list[Event]:
        self._auth_expected = False
        if auth.token is not None:
            return self._on_token_auth(auth)
        if self.secret is None and auth.mac is not None:
            return self._reject(
                "auth",
                "this relay has no secret, but the client sent one; remove --secret "
                "(BURROW_SECRET) or give the relay the same secret",
            )
        if auth.mac is None and (self.secret is not None or not self.allow_anonymous):
            return self._reject(
                "auth",
                "this relay requires a secret or a token; pass --secret (BURROW_SECRET) or "
                "--token (BURROW_TOKEN)",
            )
        if (
            self.secret is not None
            and auth.mac is not None
            and not hs.verify_mac(self.secret, self._peer_nonce, self._nonce, auth.mac)
        ):
            return self._reject("auth", "invalid secret: the relay's secret is different")
        return self._finish_auth(auth)

    def _on_token_auth(self, auth: hs.Auth) -> list[Event]:
        if self.token_verifier is None:
            return self._reject("auth", "this relay does not accept tokens; use its --secret")
        try:
            self.scope = self.token_verifier(
                auth.token or "", auth.token_mac or "", hs.transcript(self._peer_nonce, self._nonce)
            )
        except BurrowError as exc:  # the verifier's refusals are written for the peer
            return self._reject("auth", str(exc)[:512] or "invalid token")
        except Exception as exc:  # anything else is a bug, and its text is not for the peer
            self.internal_error = exc
            return self._reject("auth", "invalid token")
        return self._finish_auth(auth)

    def _finish_auth(self, auth: hs.Auth) -> list[Event]:
        if self.peer_identity is not None and (
            auth.signature is None
            or not hs.verify_identity(
                self.peer_identity, auth.signature, self._peer_nonce, self._nonce
            )
        ):
            self.peer_identity = None
            return self._reject("auth", "the client's identity signature does not verify")
        self.state = State.OPEN
        welcome = hs.Welcome(session=self.session_id, heartbeat=self.heartbeat)
        self._out.append(encode_frame(FrameType.WELCOME, 0, hs.encode(welcome)))
        return [
            HandshakeComplete(self.session_id, self.version, self.peer_identity, self.heartbeat)
        ]

    def _on_challenge(self, challenge: hs.Challenge) -> None:
        self._peer_nonce = hs.parse_nonce(challenge.nonce)
        if challenge.version not in hs.VERSIONS:
            raise BadFrame(f"relay chose version {challenge.version}, which was not offered")
        if not MIN_WINDOW <= challenge.window <= MAX_WINDOW:
            raise BadFrame(f"window {challenge.window} out of range")
        _check_heartbeat(challenge.heartbeat)
        self.version = challenge.version
        self.peer_window = challenge.window
        self.heartbeat = challenge.heartbeat
        auth = hs.Auth(
            mac=(
                hs.compute_mac(self.secret, self._nonce, self._peer_nonce)
                if self.secret is not None
                else None
            ),
            signature=(
                hs.sign_identity(self.identity_key, self._nonce, self._peer_nonce)
                if self.identity_key is not None
                else None
            ),
        )
        if self.token_prover is not None:
            auth.token, auth.token_mac = self.token_prover(
                hs.transcript(self._nonce, self._peer_nonce)
            )
        self._out.append(encode_frame(FrameType.AUTH, 0, hs.encode(auth)))

    def _reject(self, code: str, message: str) -> list[Event]:
        self.state = State.CLOSED
        self._out.append(
            encode_frame(FrameType.REJECT, 0, hs.encode(hs.Reject(code=code, message=message)))
        )
        self.close_reason = HandshakeRejected(code, message)
        return [HandshakeFailed(code, message)]

    # --- input ----------------------------------------------------------------------------

    def receive_data(
        self,
        data: bytes | memoryview,
        on_data: Callable[[int, bytes | memoryview], object] | None = None,
    ) -> list[Event]:
        """Feed bytes from the peer; return what happened.

        With ``on_data``, stream data that comes before any other event of this read is
        handed to it at once, ``on_data(stream_id, payload)``, instead of as ``DataReceived``
        events: the same order, without an object per frame on the hot path.

        Raises ``ProtocolError`` when the peer broke the protocol (a GOAWAY saying why is
        queued first) and ``HandshakeRejected`` when the relay refused this client.
        """
        if self.state is State.CLOSED:
            return []
        try:
            if self._preface_needed:
                data = self._take_preface(data)
            events: list[Event] = []
            streams = self._streams
            for frame_type, stream_id, payload in self._decoder.feed(data):
                if self.state is State.OPEN:
                    if frame_type == DATA_TYPE and on_data is not None and not events:
                        stream = streams.get(stream_id)
                        size = len(payload)
                        if stream is not None and not stream.remote_fin:
                            if size > stream.receivable:
                                raise FlowControlError(
                                    f"stream {stream_id}: {size} bytes sent with "
                                    f"{stream.receivable} of credit"
                                )
                            stream.receivable -= size
                            on_data(stream_id, payload)
                            continue
                    event = self._on_frame(frame_type, stream_id, payload)
                    if event is not None:
                        events.append(event)
                elif self.state is State.HANDSHAKE:
                    events.extend(self._on_handshake_frame(frame_type, payload))
                else:
                    break
            return events
        except ProtocolError as exc:
            self.state = State.CLOSED
            self.close_reason = exc
            self._queue_goaway(exc.code, str(exc))
            raise

    def _take_preface(self, data: bytes | memoryview) -> bytes | memoryview:
        done = len(hs.PREFACE) - self._preface_needed
        chunk = data[: self._preface_needed]
        if chunk != hs.PREFACE[done : done + len(chunk)]:
            raise BadPreface("the first bytes are not a burrow client's preface")
        self._preface_needed -= len(chunk)
        return data[len(chunk) :]

    def _on_frame(
        self, frame_type: int, stream_id: int, payload: bytes | memoryview
    ) -> Event | None:
        if frame_type == FrameType.DATA:
            stream = self._stream_for(stream_id, frame_type)
            if stream is None:
                return None
            size = len(payload)
            if stream.remote_fin:
                raise BadFrame(f"DATA on stream {stream_id} after its FIN")
            if size > stream.receivable:
                raise FlowControlError(
                    f"stream {stream_id}: {size} bytes sent with {stream.receivable} of credit"
                )
            stream.receivable -= size
            return DataReceived(stream_id, payload)
        if frame_type == FrameType.WINDOW:
            stream = self._stream_for(stream_id, frame_type)
            if stream is None:
                return None
            (increment,) = _U32.unpack(payload) if len(payload) == 4 else (-1,)
            if increment <= 0:
                raise BadFrame(f"WINDOW on stream {stream_id} with a bad increment")
            stream.credit += increment
            if stream.credit > MAX_WINDOW:
                raise FlowControlError(f"stream {stream_id}: credit above {MAX_WINDOW}")
            return WindowOpened(stream_id)
        if frame_type == FrameType.OPEN:
            return self._on_open(stream_id, payload)
        if frame_type == FrameType.ACCEPT:
            return StreamAccepted(stream_id) if self._stream_for(stream_id, frame_type) else None
        if frame_type == FrameType.FIN:
            stream = self._stream_for(stream_id, frame_type)
            if stream is None:
                return None
            if stream.remote_fin:
                raise BadFrame(f"second FIN on stream {stream_id}")
            stream.remote_fin = True
            if stream.local_fin:
                self._forget(stream_id)
            return StreamEnded(stream_id)
        if frame_type == FrameType.RESET:
            if self._stream_for(stream_id, frame_type) is None:
                return None
            self._forget(stream_id)
            code, reason = _decode_reset(payload)
            return StreamReset(stream_id, code, reason)
        if frame_type == FrameType.PING:
            self._out.append(encode_frame(FrameType.PONG, 0, bytes(payload)))
            return None
        if frame_type == FrameType.PONG:
            return PongReceived(bytes(payload))
        if frame_type == FrameType.CONTROL:
            if stream_id != 0:
                raise BadFrame("CONTROL frame on a stream")
            return ControlReceived(_decode_object(payload, "control message"))
        if frame_type == FrameType.GOAWAY:
            message = _decode_object(payload, "goaway")
            code, reason = str(message.get("code", "error"))[:64], str(message.get("reason", ""))
            self.state = State.CLOSED
            return GoAwayReceived(code, reason)
        raise BadFrame(f"unexpected {_name(frame_type)} frame after the handshake")

    def _stream_for(self, stream_id: int, frame_type: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if stream_id == 0:
            raise BadFrame(f"{_name(frame_type)} frame on stream 0")
        ours = stream_id % 2 != self._peer_parity
        if (ours and stream_id < self._next_id) or (
            not ours and stream_id <= self._highest_peer_id
        ):
            return None  # an ended stream: frames were in flight when it closed
        raise UnknownStream(f"{_name(frame_type)} frame for stream {stream_id}, never opened")

    def _on_open(self, stream_id: int, payload: bytes | memoryview) -> Event | None:
        if stream_id % 2 != self._peer_parity or stream_id <= self._highest_peer_id:
            raise BadFrame(f"OPEN with stream id {stream_id} out of sequence")
        self._highest_peer_id = stream_id
        info = _decode_object(payload, "open request")
        if len(self._streams) >= self.max_streams:
            self._out.append(_reset_frame(stream_id, "too_many_streams", "too many open streams"))
            return None
        self._new_stream(stream_id)
        return StreamOpened(stream_id, info)

    def _new_stream(self, stream_id: int) -> None:
        self._streams[stream_id] = _Stream(self.peer_window, self.window)
        self.pool.add(self.window)

    def _forget(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self.pool.release(stream.limit)
        return stream

    # --- streams ----------------------------------------------------------------------------

    def open_stream(self, info: dict[str, Any]) -> int:
        """Open a stream; the peer sees ``info`` in its ``StreamOpened`` event."""
        self._require_open()
        stream_id = self._next_id
        self._next_id += 2
        self._new_stream(stream_id)
        self._out.append(encode_frame(FrameType.OPEN, stream_id, _encode_object(info)))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        if stream_id in self._streams:
            self._out.append(encode_frame(FrameType.ACCEPT, stream_id))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """Queue ``data``; the caller must stay within ``credit(stream_id)``."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            raise RuntimeError(f"stream {stream_id} is not open for sending")
        size = len(data)
        if size > stream.credit:
            raise RuntimeError(f"stream {stream_id}: {size} bytes with {stream.credit} credit")
        stream.credit -= size
        out = self._out
        pack = HEADER.pack
        if size <= SMALL_DATA:
            # One buffer, so TLS sends header and payload in one record.
            out.append(pack(FrameType.DATA, 0, stream_id, size) + data)
            return
        if size <= MAX_DATA_CHUNK:
            out.append(pack(FrameType.DATA, 0, stream_id, size))
            out.append(data)
            return
        view = memoryview(data)
        for start in range(0, size, MAX_DATA_CHUNK):
            chunk = view[start : start + MAX_DATA_CHUNK]
            out.append(pack(FrameType.DATA, 0, stream_id, len(chunk)))
            out.append(chunk)

    def consume(self, stream_id: int, size: int) -> None:
        """Report ``size`` bytes of received data as delivered, returning credit to the peer.

        Credit goes back a quarter window at a time. A stream whose sender was waiting for it
        (less than a quarter left) gets a doubled window, up to ``max_window``, while the pools
        have room; while a pool is over its budget, grown windows shrink back instead.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin:
            return
        stream.unacked += size
        limit = stream.limit
        if stream.unacked < limit >> 2:
            return
        grant = stream.unacked
        stream.unacked = 0
        if limit < self.max_window and stream.receivable < limit >> 2:
            grow = min(limit, self.max_window - limit)
            if self.pool.reserve(grow):
                stream.limit += grow
                grant += grow
        elif limit > self.window and (over := self.pool.over):
            shrink = min(over, limit - self.window, grant)
            stream.limit -= shrink
            self.pool.release(shrink)
            grant -= shrink
        if grant:
            self._out.append(encode_frame(FrameType.WINDOW, stream_id, _U32.pack(grant)))
            stream.receivable += grant

    def send_fin(self, stream_id: int) -> None:
        """Half-close: no more data from this side on ``stream_id``."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            return
        stream.local_fin = True
        self._out.append(encode_frame(FrameType.FIN, stream_id))
        if stream.remote_fin:
            self._forget(stream_id)

    def reset_stream(self, stream_id: int, code: str = "error", reason: str = "") -> None:
        """Abort ``stream_id`` in both directions, telling the peer why."""
        if self._forget(stream_id) is not None and self.state is State.OPEN:
            self._out.append(_reset_frame(stream_id, code, reason))

    def send_control(self, message: dict[str, Any]) -> None:
        self._require_open()
        self._out.append(encode_frame(FrameType.CONTROL, 0, _encode_object(message)))

    def ping(self, payload: bytes) -> None:
        """Queue a PING; the peer's PONG carries ``payload`` (8 bytes) back."""
        if self.state is State.OPEN:
            self._out.append(encode_frame(FrameType.PING, 0, payload[:8].ljust(8, b"\0")))

    def go_away(self, code: str = "shutdown", reason: str = "") -> None:
        """Announce the end of the session; the caller closes after flushing."""
        if self.state is State.OPEN:
            self._queue_goaway(code, reason)
        self.state = State.CLOSED

    def _queue_goaway(self, code: str, reason: str) -> None:
        payload = json.dumps({"code": code, "reason": reason[:512]}).encode()
        self._out.append(encode_frame(FrameType.GOAWAY, 0, payload))

    def drop_streams(self) -> None:
        """The transport is gone: forget every stream and give their windows back to the pool."""
        self._streams.clear()
        self.pool.release(self.pool.used)

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise RuntimeError(f"session is {self.state.value}")


def _check_heartbeat(interval: float) -> None:
    if not 0.05 <= interval <= 3600:
        raise BadFrame(f"heartbeat {interval} out of range (0.05 to 3600 s)")


def _name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return f"0x{frame_type:02x}"


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


def _encode_object(message: dict[str, Any]) -> bytes:
    payload = _json_encode(message)
    if len(payload) > MAX_META_PAYLOAD:
        raise ValueError(f"message of {len(payload)} bytes > {MAX_META_PAYLOAD}")
    return payload


def _decode_object(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        message = _json_decode(payload)
    except (ValueError, RecursionError):
        raise BadFrame(f"malformed {what}") from None
    if not isinstance(message, dict):
        raise BadFrame(f"{what} is not a JSON object")
    return message


def _reset_frame(stream_id: int, code: str, reason: str) -> bytes:
    number = RESET_NUMBERS.get(code, RESET_NUMBERS["error"])
    payload = _RESET.pack(number) + reason.encode()[:512]
    return encode_frame(FrameType.RESET, stream_id, payload)


def _decode_reset(payload: bytes | memoryview) -> tuple[str, str]:
    """RESET carries a u16 code, then a UTF-8 reason."""
    raw = bytes(payload)
    if len(raw) < 2:
        raise BadFrame("RESET without a code")
    (number,) = _RESET.unpack_from(raw)
    return RESET_CODES.get(number, "error"), raw[2:].decode("utf-8", "replace")
