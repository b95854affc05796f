"""The sans-I/O wire layer: frame codec, handshake, streams and flow control.

Plain synchronous tests: sessions are pumped in memory, no event loop, no sockets.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections import defaultdict
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import event as statistic
from hypothesis import strategies as st

from burrow.wire import handshake as hs
from burrow.wire.errors import (
    DOCUMENTED_ERRORS,
    BadFrame,
    BadPreface,
    FlowControlError,
    FrameTooLarge,
    HandshakeRejected,
    ProtocolError,
    UnknownFrameType,
    UnknownStream,
)
from burrow.wire.frames import (
    HEADER_SIZE,
    MAX_DATA_CHUNK,
    MAX_DATA_PAYLOAD,
    MAX_META_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_header,
    payload_limit,
)
from burrow.wire.session import (
    MIN_WINDOW,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    HandshakeComplete,
    HandshakeFailed,
    PongReceived,
    Role,
    Session,
    State,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- helpers ------------------------------------------------------------------------------


def raw(frame_type: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame built by hand, bypassing the encoder's checks."""
    size = len(payload) if length is None else length
    return struct.pack(">BBII", frame_type, 0, stream_id, size) + payload


def pump(a: Session, b: Session, log: list[bytes] | None = None) -> list[Any]:
    """Move everything ``a`` queued into ``b``; return ``b``'s events."""
    data = b"".join(a.data_to_send())
    if log is not None:
        log.append(data)
    return b.receive_data(data) if data else []


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """Decode a byte string of whole frames (after any preface)."""
    if data.startswith(hs.PREFACE):
        data = data[len(hs.PREFACE) :]
    decoder = FrameDecoder()
    frames = [(t, s, bytes(p)) for t, s, p in decoder.feed(data)]
    assert decoder.buffered == 0
    return frames


def sent_frames(session: Session) -> list[tuple[int, int, bytes]]:
    return frames_of(b"".join(session.data_to_send()))


def handshake(
    client: Session, relay: Session, log: list[bytes] | None = None
) -> tuple[list[Any], list[Any]]:
    """Run a full handshake; return (client events, relay events)."""
    client.start()
    relay_events = pump(client, relay, log)  # HELLO -> CHALLENGE
    client_events = pump(relay, client, log)  # CHALLENGE -> AUTH
    relay_events += pump(client, relay, log)  # AUTH -> WELCOME | REJECT
    client_events += pump(relay, client, log)  # WELCOME
    return client_events, relay_events


def open_pair(**options: Any) -> tuple[Session, Session]:
    client = Session(Role.CLIENT, **options)
    relay = Session(Role.RELAY, **options)
    client_events, relay_events = handshake(client, relay)
    assert client.state is State.OPEN and relay.state is State.OPEN
    assert [type(e) for e in client_events] == [HandshakeComplete]
    assert [type(e) for e in relay_events] == [HandshakeComplete]
    return client, relay


def client_stream(client: Session, relay: Session, info: dict[str, Any] | None = None) -> int:
    stream_id = client.open_stream(info or {})
    assert pump(client, relay) == [StreamOpened(stream_id, info or {})]
    return stream_id


def relay_stream(client: Session, relay: Session, info: dict[str, Any] | None = None) -> int:
    stream_id = relay.open_stream(info or {})
    assert pump(relay, client) == [StreamOpened(stream_id, info or {})]
    return stream_id


def received(events: list[Any]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))


def assert_goaway_queued(session: Session, code: str) -> None:
    frames = sent_frames(session)
    assert frames, "no GOAWAY queued"
    frame_type, stream_id, payload = frames[-1]
    assert (frame_type, stream_id) == (FrameType.GOAWAY, 0)
    assert json.loads(payload)["code"] == code


# --- frame codec --------------------------------------------------------------------------


def test_header_layout() -> None:
    assert HEADER_SIZE == 10
    assert encode_header(FrameType.DATA, 7, 3) == b"\x00\x00\x00\x00\x00\x07\x00\x00\x00\x03"
    assert encode_header(FrameType.DATA, 7, 3, flags=0x80) == b"\x00\x80\x00\x00\x00\x07" + (
        b"\x00\x00\x00\x03"
    )


def test_encode_frame_exact_bytes() -> None:
    assert encode_frame(FrameType.DATA, 1, b"hi") == b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02hi"
    assert encode_frame(FrameType.WINDOW, 3, struct.pack(">I", 1000)) == (
        b"\x01\x00\x00\x00\x00\x03\x00\x00\x00\x04\x00\x00\x03\xe8"
    )
    assert encode_frame(FrameType.FIN, 5) == b"\x04\x00\x00\x00\x00\x05\x00\x00\x00\x00"
    assert encode_frame(FrameType.PING, 0, b"12345678") == (
        b"\x06\x00\x00\x00\x00\x00\x00\x00\x00\x0812345678"
    )
    assert encode_frame(FrameType.CONTROL, 0, b"{}") == struct.pack(">BBII", 8, 0, 0, 2) + b"{}"
    big_stream = encode_frame(FrameType.ACCEPT, 0xFFFFFFFF)
    assert big_stream == b"\x03\x00\xff\xff\xff\xff\x00\x00\x00\x00"


def test_encode_frame_refuses_oversized_and_unknown() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(FrameType.WINDOW, 1, b"12345")
    with pytest.raises(FrameTooLarge):
        encode_frame(FrameType.FIN, 1, b"x")
    with pytest.raises(FrameTooLarge):
        encode_frame(FrameType.CONTROL, 0, b"x" * (MAX_META_PAYLOAD + 1))
    encode_frame(FrameType.CONTROL, 0, b"x" * MAX_META_PAYLOAD)  # the limit itself is fine
    with pytest.raises(UnknownFrameType):
        encode_frame(0x0A, 0)


def test_payload_limits() -> None:
    assert payload_limit(FrameType.DATA) == MAX_DATA_PAYLOAD
    assert payload_limit(FrameType.WINDOW) == 4
    assert payload_limit(FrameType.PING) == payload_limit(FrameType.PONG) == 8
    assert payload_limit(FrameType.ACCEPT) == payload_limit(FrameType.FIN) == 0
    assert payload_limit(FrameType.HELLO) == MAX_META_PAYLOAD
    for bad in (0x0A, 0x0F, 0x15, 0xFF):
        with pytest.raises(UnknownFrameType):
            payload_limit(bad)


STREAM = (
    raw(FrameType.DATA, 1, b"hello")
    + raw(FrameType.WINDOW, 1, b"\x00\x01\x00\x00")
    + raw(FrameType.FIN, 1)
    + raw(FrameType.DATA, 3, b"")
    + raw(FrameType.CONTROL, 0, b'{"op":"x"}')
    + raw(FrameType.DATA, 3, b"world")
)
STREAM_FRAMES = [
    (0x00, 1, b"hello"),
    (0x01, 1, b"\x00\x01\x00\x00"),
    (0x04, 1, b""),
    (0x00, 3, b""),
    (0x08, 0, b'{"op":"x"}'),
    (0x00, 3, b"world"),
]


def merged(frames: list[tuple[int, int, Any]]) -> list[tuple[int, int, bytes]]:
    """Join consecutive DATA payloads for one stream: the decoder streams a DATA frame that
    spans reads as several pieces, so only the joined bytes are comparable."""
    out: list[tuple[int, int, bytes]] = []
    for frame_type, stream_id, payload in frames:
        if frame_type == FrameType.DATA and out and out[-1][:2] == (FrameType.DATA, stream_id):
            out[-1] = (frame_type, stream_id, out[-1][2] + bytes(payload))
        else:
            out.append((frame_type, stream_id, bytes(payload)))
    return out


def expected_buffered(frames: list[tuple[int, int, bytes]], fed: int) -> int:
    """What the decoder should hold after ``fed`` bytes of ``frames``: a partial header, or a
    partial non-DATA frame; never DATA payload."""
    start = 0
    for frame_type, _, payload in frames:
        end = start + HEADER_SIZE + len(payload)
        if fed < end:
            if frame_type == FrameType.DATA and fed >= start + HEADER_SIZE:
                return 0
            return fed - start
        start = end
    return 0


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, Any]] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return merged(out)


def test_decode_whole_buffer() -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(STREAM)
    assert [(t, s, bytes(p)) for t, s, p in frames] == STREAM_FRAMES
    assert decoder.buffered == 0


def test_decode_byte_by_byte() -> None:
    decoder = FrameDecoder()
    out: list[tuple[int, int, Any]] = []
    for i in range(len(STREAM)):
        pieces = decoder.feed(STREAM[i : i + 1])
        assert all(len(p) <= 1 for t, _, p in pieces if t == FrameType.DATA)
        out += pieces
        assert decoder.buffered == expected_buffered(STREAM_FRAMES, i + 1)
    assert merged(out) == merged(STREAM_FRAMES)
    # Every frame came out, the empty DATA frame included.
    assert [t for t, _, p in out if t != FrameType.DATA or not p] == [0x01, 0x04, 0x00, 0x08]


def test_decode_empty_feeds() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(STREAM[:3]) == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 3
    assert feed_all(decoder, [b"", STREAM[3:], b""]) == merged(STREAM_FRAMES)


def test_zero_copy_payloads() -> None:
    data = bytearray(raw(FrameType.DATA, 1, b"abc") + raw(FrameType.CONTROL, 0, b"{}"))
    frames = FrameDecoder().feed(data)
    assert all(isinstance(p, memoryview) and p.obj is data for _, _, p in frames)
    assert [bytes(p) for _, _, p in frames] == [b"abc", b"{}"]
    view = memoryview(bytes(data))
    assert all(p.obj is view.obj for _, _, p in FrameDecoder().feed(view))  # type: ignore[union-attr]


def test_data_spanning_reads_is_streamed_zero_copy() -> None:
    frame = raw(FrameType.DATA, 5, b"abcdef")
    first, second, third = frame[:10], frame[10:12], frame[12:]
    decoder = FrameDecoder()
    assert decoder.feed(first) == []  # the header alone: nothing to deliver yet
    assert decoder.buffered == 0
    [(t1, s1, p1)] = decoder.feed(second)
    [(t2, s2, p2)] = decoder.feed(third)
    assert (t1, s1, t2, s2) == (FrameType.DATA, 5, FrameType.DATA, 5)
    assert isinstance(p1, memoryview) and p1.obj is second and bytes(p1) == b"ab"
    assert isinstance(p2, memoryview) and p2.obj is third and bytes(p2) == b"cdef"
    assert decoder.buffered == 0


def test_meta_frames_spanning_reads_do_not_alias_the_callers_buffers() -> None:
    frame = raw(FrameType.CONTROL, 0, b'{"op":"ping"}')
    first, second = bytearray(frame[:12]), bytearray(frame[12:])
    decoder = FrameDecoder()
    assert decoder.feed(first) == []
    assert decoder.buffered == 12
    [(_, _, payload)] = decoder.feed(second)
    first[:] = b"\xff" * len(first)
    second[:] = b"\xff" * len(second)
    assert bytes(payload) == b'{"op":"ping"}'


def test_oversized_length_refused_at_the_tenth_header_byte() -> None:
    header = raw(FrameType.DATA, 1, length=MAX_DATA_PAYLOAD + 1)
    decoder = FrameDecoder()
    for byte in range(HEADER_SIZE - 1):
        assert decoder.feed(header[byte : byte + 1]) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[-1:])


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [
        (FrameType.DATA, MAX_DATA_PAYLOAD + 1),
        (FrameType.DATA, 0xFFFFFFFF),
        (FrameType.WINDOW, 5),
        (FrameType.FIN, 1),
        (FrameType.ACCEPT, 1),
        (FrameType.PING, 9),
        (FrameType.HELLO, MAX_META_PAYLOAD + 1),
        (FrameType.CONTROL, MAX_META_PAYLOAD + 1),
    ],
)
def test_oversized_length_refused_without_payload(frame_type: int, length: int) -> None:
    header = raw(frame_type, 1, length=length)
    # Alone, after a complete frame in the same read, and completing a partial header.
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(header)
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(raw(FrameType.FIN, 1) + header)
    decoder = FrameDecoder()
    decoder.feed(header[:4])
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[4:])


def test_largest_data_payload_is_streamed_not_buffered() -> None:
    payload = bytes(range(256)) * (MAX_DATA_PAYLOAD // 256)
    frame = raw(FrameType.DATA, 1, payload)
    decoder = FrameDecoder()
    first = decoder.feed(frame[:-1])
    assert decoder.buffered == 0
    last = decoder.feed(frame[-1:])
    assert merged(first + last) == [(FrameType.DATA, 1, payload)]
    assert decoder.buffered == 0


def test_largest_meta_payload_is_buffered_until_whole() -> None:
    frame = raw(FrameType.CONTROL, 0, b"x" * MAX_META_PAYLOAD)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == HEADER_SIZE + MAX_META_PAYLOAD - 1
    [(_, _, payload)] = decoder.feed(frame[-1:])
    assert len(payload) == MAX_META_PAYLOAD
    assert decoder.buffered == 0


@pytest.mark.parametrize("frame_type", [0x0A, 0x0F, 0x15, 0x80, 0xFF])
def test_unknown_frame_type(frame_type: int) -> None:
    with pytest.raises(UnknownFrameType):
        FrameDecoder().feed(raw(frame_type, 0, b""))
    with pytest.raises(UnknownFrameType):
        FrameDecoder().feed(raw(FrameType.FIN, 1) + raw(frame_type, 0))
    decoder = FrameDecoder()
    decoder.feed(raw(frame_type, 0)[:5])
    with pytest.raises(UnknownFrameType):
        decoder.feed(raw(frame_type, 0)[5:])


frame_types = st.sampled_from(list(FrameType))


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[int, int, bytes]:
    frame_type = draw(frame_types)
    limit = min(payload_limit(frame_type), 64)
    return frame_type, draw(st.integers(0, 0xFFFFFFFF)), draw(st.binary(max_size=limit))


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(blob)) for c in cuts})
    return [blob[a:b] for a, b in zip([0, *points], [*points, len(blob)], strict=True)]


@PROPERTY
@given(st.lists(valid_frames(), max_size=12), st.lists(st.integers(0, 2000), max_size=30))
def test_decoder_split_invariance(frames: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    blob = b"".join(encode_frame(t, s, p) for t, s, p in frames)
    decoder = FrameDecoder()
    out: list[tuple[int, int, Any]] = []
    fed = 0
    for chunk in split(blob, cuts):
        out += decoder.feed(chunk)
        fed += len(chunk)
        assert decoder.buffered == expected_buffered(frames, fed)
        assert decoder.buffered <= HEADER_SIZE + MAX_META_PAYLOAD
    assert merged(out) == merged(frames)
    # Non-DATA frames come out whole and in order, DATA ones at least once each.
    meta = [(t, s, bytes(p)) for t, s, p in out if t != FrameType.DATA]
    assert meta == [f for f in frames if f[0] != FrameType.DATA]
    assert merged(FrameDecoder().feed(blob)) == merged(frames)
    assert [(t, s, bytes(p)) for t, s, p in FrameDecoder().feed(blob)] == frames
    one_by_one = FrameDecoder()
    assert feed_all(one_by_one, [blob[i : i + 1] for i in range(len(blob))]) == merged(frames)


@PROPERTY
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_decoder_on_garbage_is_bounded(blob: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    for chunk in split(blob, cuts):
        try:
            decoder.feed(chunk)
        except (FrameTooLarge, UnknownFrameType):
            return
        assert decoder.buffered <= HEADER_SIZE + MAX_META_PAYLOAD


# --- handshake ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "abc"])
def test_handshake_succeeds_with_matching_secrets(secret: str | None) -> None:
    client = Session(Role.CLIENT, secret=secret)
    relay = Session(Role.RELAY, secret=secret, heartbeat=7.5, session_id="s-1")
    client_events, relay_events = handshake(client, relay)
    assert relay_events == [HandshakeComplete("s-1", 1, None, 7.5)]
    assert client_events == [HandshakeComplete("s-1", 1, None, 7.5)]
    assert client.state is relay.state is State.OPEN
    assert client.session_id == "s-1" and client.heartbeat == 7.5
    assert client.version == relay.version == 1
    assert client.data_to_send() == [] and relay.data_to_send() == []
    assert client.close_reason is None and relay.close_reason is None


def test_challenge_announces_whether_a_secret_is_needed() -> None:
    for secret, auth in ((None, "none"), ("", "secret"), ("abc", "secret")):
        client, relay = Session(Role.CLIENT), Session(Role.RELAY, secret=secret)
        client.start()
        pump(client, relay)
        [(frame_type, _, payload)] = sent_frames(relay)
        assert frame_type == FrameType.CHALLENGE
        assert json.loads(payload)["auth"] == auth


@pytest.mark.parametrize(
    ("relay_secret", "client_secret", "fragment"),
    [
        ("abc", None, "requires a secret"),
        ("", None, "requires a secret"),
        (None, "abc", "has no secret"),
        (None, "", "has no secret"),
        ("abc", "abd", "invalid secret"),
        ("abc", "", "invalid secret"),
        ("", "abc", "invalid secret"),
    ],
)
def test_secret_mismatch_tells_both_sides(
    relay_secret: str | None, client_secret: str | None, fragment: str
) -> None:
    client = Session(Role.CLIENT, secret=client_secret)
    relay = Session(Role.RELAY, secret=relay_secret)
    client.start()
    assert pump(client, relay) == []
    assert pump(relay, client) == []
    [failed] = pump(client, relay)
    assert isinstance(failed, HandshakeFailed)
    assert failed.code == "auth"
    assert fragment in failed.message
    assert relay.state is State.CLOSED
    assert isinstance(relay.close_reason, HandshakeRejected)
    assert relay.close_reason.code == "auth"
    with pytest.raises(HandshakeRejected) as info:
        pump(relay, client)
    assert info.value.code == "auth"
    assert info.value.message == failed.message
    assert client.state is State.CLOSED
    # Nothing more happens on either side, and nothing is sent back.
    assert client.receive_data(raw(FrameType.WELCOME, 0, b"{}")) == []
    assert relay.receive_data(raw(FrameType.AUTH, 0, b"{}")) == []
    assert client.data_to_send() == []


@pytest.mark.parametrize(
    ("relay_secret", "client_secret"),
    [
        ("correct horse battery staple", "correct horse battery staple"),
        ("correct horse battery staple", "correct horse battery stapler"),
        (None, "correct horse battery staple"),
        ("correct horse battery staple", None),
    ],
)
def test_no_secret_crosses_the_wire(relay_secret: str | None, client_secret: str | None) -> None:
    client = Session(Role.CLIENT, secret=client_secret)
    relay = Session(Role.RELAY, secret=relay_secret)
    log: list[bytes] = []
    try:
        handshake(client, relay, log)
    except HandshakeRejected:
        pass
    wire = b"".join(log)
    for secret in {relay_secret, client_secret} - {None}:
        assert secret is not None
        digest = hashlib.sha256(secret.encode()).digest()
        for forbidden in (secret.encode(), digest, digest.hex().encode(), hs.secret_key(secret)):
            assert forbidden not in wire
            assert forbidden.lower() not in wire.lower()


def test_replayed_auth_fails_on_another_session() -> None:
    client = Session(Role.CLIENT, secret="s3cret")
    relay = Session(Role.RELAY, secret="s3cret")
    client.start()
    hello = b"".join(client.data_to_send())
    relay.receive_data(hello)
    challenge = b"".join(relay.data_to_send())
    client.receive_data(challenge)
    auth = b"".join(client.data_to_send())
    assert relay.receive_data(auth) == [HandshakeComplete(relay.session_id, 1, None, 5.0)]

    other = Session(Role.RELAY, secret="s3cret")
    other.receive_data(hello)
    other_challenge = b"".join(other.data_to_send())
    nonce = json.loads(frames_of(challenge)[0][2])["nonce"]
    assert json.loads(frames_of(other_challenge)[0][2])["nonce"] != nonce
    [failed] = other.receive_data(auth)
    assert failed == HandshakeFailed("auth", "invalid secret: the relay's secret is different")
    assert other.state is State.CLOSED


def test_mac_binds_both_nonces() -> None:
    a, b = bytes(32), bytes([1]) * 32
    mac = hs.compute_mac("k", a, b)
    assert hs.verify_mac("k", a, b, mac)
    assert not hs.verify_mac("k", b, a, mac)
    assert not hs.verify_mac("k", a, a, mac)
    assert not hs.verify_mac("K", a, b, mac)
    assert not hs.verify_mac("k", a, b, "")
    assert not hs.verify_mac("k", a, b, "é" * 64)
    assert hs.compute_mac("", a, b) != hs.compute_mac("\0", a, b)


def test_identity_signature_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    client = Session(Role.CLIENT, identity_key=key)
    relay = Session(Role.RELAY, secret=None)
    client_events, relay_events = handshake(client, relay)
    identity = hs.public_identity(key)
    assert relay.peer_identity == identity
    assert relay_events == [HandshakeComplete(relay.session_id, 1, identity, 5.0)]
    assert client_events == [HandshakeComplete(relay.session_id, 1, None, 5.0)]


def test_identity_with_secret() -> None:
    key = Ed25519PrivateKey.generate()
    client = Session(Role.CLIENT, secret="x", identity_key=key)
    relay = Session(Role.RELAY, secret="x")
    _, relay_events = handshake(client, relay)
    assert relay_events[0].identity == hs.public_identity(key)


@pytest.mark.parametrize("swap", ["other_key", "no_signature"])
def test_bad_identity_signature_is_rejected(swap: str) -> None:
    client = Session(Role.CLIENT, identity_key=Ed25519PrivateKey.generate())
    relay = Session(Role.RELAY)
    client.start()  # HELLO carries the first key's identity ...
    client.identity_key = Ed25519PrivateKey.generate() if swap == "other_key" else None
    pump(client, relay)
    pump(relay, client)  # ... AUTH is signed by another key, or not at all
    [failed] = pump(client, relay)
    assert failed == HandshakeFailed("auth", "the client's identity signature does not verify")
    with pytest.raises(HandshakeRejected) as info:
        pump(relay, client)
    assert info.value.code == "auth"


@pytest.mark.parametrize("identity", ["", "!!!", "A" * 200, "é", "AAAA"])
def test_garbage_identity_is_rejected_not_crashing(identity: str) -> None:
    client_nonce = bytes(32)
    relay = Session(Role.RELAY)
    hello = {"versions": [1], "nonce": client_nonce.hex(), "window": MIN_WINDOW}
    payload = json.dumps(hello | {"identity": identity}).encode()
    relay.receive_data(hs.PREFACE + raw(FrameType.HELLO, 0, payload))
    relay.data_to_send()
    auth = json.dumps({"signature": "A" * 86}).encode()
    [failed] = relay.receive_data(raw(FrameType.AUTH, 0, auth))
    assert failed.code == "auth"


def test_version_mismatch_is_rejected() -> None:
    relay = Session(Role.RELAY)
    hello = {"versions": [2, 3], "nonce": bytes(32).hex(), "window": MIN_WINDOW}
    [failed] = relay.receive_data(hs.PREFACE + raw(FrameType.HELLO, 0, json.dumps(hello).encode()))
    assert failed.code == "version"
    assert "[2, 3]" in failed.message
    [(frame_type, _, payload)] = sent_frames(relay)
    assert frame_type == FrameType.REJECT
    client = Session(Role.CLIENT)
    with pytest.raises(HandshakeRejected) as info:
        client.receive_data(raw(FrameType.REJECT, 0, payload))
    assert info.value.code == "version"


@pytest.mark.parametrize(
    "hello",
    [
        {"versions": [1], "nonce": "zz", "window": MIN_WINDOW},
        {"versions": [1], "nonce": "00" * 31, "window": MIN_WINDOW},
        {"versions": [1], "nonce": "00" * 32, "window": MIN_WINDOW - 1},
        {"versions": [1], "nonce": "00" * 32, "window": 1 << 31},
        {"versions": [1], "nonce": "00" * 32},
        {"versions": "1", "nonce": "00" * 32, "window": MIN_WINDOW},
        [1, 2],
    ],
)
def test_malformed_hello_is_a_bad_frame(hello: Any) -> None:
    relay = Session(Role.RELAY)
    with pytest.raises(BadFrame):
        relay.receive_data(hs.PREFACE + raw(FrameType.HELLO, 0, json.dumps(hello).encode()))
    assert_goaway_queued(relay, "bad_frame")


def test_window_option_is_checked() -> None:
    with pytest.raises(ValueError):
        Session(Role.CLIENT, window=MIN_WINDOW - 1)
    with pytest.raises(ValueError):
        Session(Role.RELAY, window=1 << 31)


def test_start_is_for_a_client_once() -> None:
    client = Session(Role.CLIENT)
    client.start()
    with pytest.raises(RuntimeError):
        client.start()
    with pytest.raises(RuntimeError):
        Session(Role.RELAY).start()


def test_client_sends_preface_then_hello() -> None:
    client = Session(Role.CLIENT, window=MIN_WINDOW, software="burrow/test")
    client.start()
    data = b"".join(client.data_to_send())
    assert data.startswith(b"BURROW\r\n\x10\x00\x00\x00\x00\x00")
    [(frame_type, stream_id, payload)] = frames_of(data)
    assert (frame_type, stream_id) == (FrameType.HELLO, 0)
    hello = json.loads(payload)
    assert hello["versions"] == [1] and hello["window"] == MIN_WINDOW
    assert len(bytes.fromhex(hello["nonce"])) == 32
    assert hello["software"] == "burrow/test"


def test_bad_preface_at_the_first_wrong_byte() -> None:
    relay = Session(Role.RELAY)
    with pytest.raises(BadPreface):
        relay.receive_data(b"G")
    assert relay.state is State.CLOSED
    assert isinstance(relay.close_reason, BadPreface)
    assert_goaway_queued(relay, "bad_preface")
    assert relay.receive_data(b"ET / HTTP/1.1\r\n") == []

    relay = Session(Role.RELAY)
    with pytest.raises(BadPreface):
        relay.receive_data(b"GET / HTTP/1.1\r\n")

    relay = Session(Role.RELAY)
    for byte in b"BURR":
        assert relay.receive_data(bytes([byte])) == []
    with pytest.raises(BadPreface):
        relay.receive_data(b"x" + hs.PREFACE)  # wrong at once, whatever follows


def test_bad_preface_wrong_last_byte() -> None:
    relay = Session(Role.RELAY)
    assert relay.receive_data(b"BURROW\r") == []
    with pytest.raises(BadPreface):
        relay.receive_data(b"\r")


def test_preface_split_anywhere() -> None:
    client, relay = Session(Role.CLIENT), Session(Role.RELAY)
    client.start()
    hello = b"".join(client.data_to_send())
    for byte in range(len(hello)):
        assert relay.receive_data(hello[byte : byte + 1]) == []
    assert [t for t, _, _ in sent_frames(relay)] == [FrameType.CHALLENGE]


def test_data_frame_during_handshake_is_a_bad_frame() -> None:
    relay = Session(Role.RELAY)
    with pytest.raises(BadFrame):
        relay.receive_data(hs.PREFACE + raw(FrameType.DATA, 1, b"x"))
    assert_goaway_queued(relay, "bad_frame")

    client = Session(Role.CLIENT)
    client.start()
    client.data_to_send()
    with pytest.raises(BadFrame):
        client.receive_data(raw(FrameType.OPEN, 2, b"{}"))
    assert_goaway_queued(client, "bad_frame")


@pytest.mark.parametrize("frame_type", [FrameType.AUTH, FrameType.WELCOME, FrameType.PING])
def test_frames_out_of_order_in_the_handshake(frame_type: int) -> None:
    relay = Session(Role.RELAY)
    with pytest.raises(BadFrame):
        relay.receive_data(hs.PREFACE + raw(frame_type, 0, b"{}"[: payload_limit(frame_type)]))


def test_second_hello_is_a_bad_frame() -> None:
    client, relay = Session(Role.CLIENT), Session(Role.RELAY)
    client.start()
    hello = b"".join(client.data_to_send())
    relay.receive_data(hello)
    with pytest.raises(BadFrame):
        relay.receive_data(hello[len(hs.PREFACE) :])


@pytest.mark.parametrize(
    "frame_type",
    [FrameType.HELLO, FrameType.CHALLENGE, FrameType.AUTH, FrameType.WELCOME, FrameType.REJECT],
)
def test_handshake_frames_after_open_are_bad_frames(frame_type: int) -> None:
    for side in ("client", "relay"):
        client, relay = open_pair()
        session = client if side == "client" else relay
        with pytest.raises(BadFrame):
            session.receive_data(raw(frame_type, 0, b"{}"))
        assert session.state is State.CLOSED
        assert_goaway_queued(session, "bad_frame")


def test_goaway_is_queued_on_protocol_error_and_received_by_peer() -> None:
    client, relay = open_pair()
    with pytest.raises(UnknownStream) as info:
        relay.receive_data(raw(FrameType.DATA, 99, b"x"))
    assert relay.close_reason is info.value
    [event] = pump(relay, client)
    assert isinstance(event, GoAwayReceived)
    assert event.code == "unknown_stream"
    assert "99" in event.reason
    assert client.state is State.CLOSED


def test_go_away() -> None:
    client, relay = open_pair()
    client.go_away("shutdown", "bye")
    assert client.state is State.CLOSED
    assert pump(client, relay) == [GoAwayReceived("shutdown", "bye")]
    assert relay.state is State.CLOSED
    # A closed session ignores input and refuses new work.
    assert relay.receive_data(raw(FrameType.PING, 0, bytes(8))) == []
    with pytest.raises(RuntimeError):
        relay.open_stream({})
    with pytest.raises(RuntimeError):
        relay.send_control({})


def test_client_heartbeat_range_from_challenge() -> None:
    for heartbeat in (0.0, 0.01, 3601.0):
        client = Session(Role.CLIENT)
        client.start()
        client.data_to_send()
        challenge = {
            "version": 1,
            "nonce": bytes(32).hex(),
            "auth": "none",
            "window": MIN_WINDOW,
            "heartbeat": heartbeat,
        }
        with pytest.raises(BadFrame):
            client.receive_data(raw(FrameType.CHALLENGE, 0, json.dumps(challenge).encode()))


def _client_after_challenge() -> Session:
    client = Session(Role.CLIENT)
    client.start()
    challenge = {"version": 1, "nonce": bytes(32).hex(), "auth": "none", "window": MIN_WINDOW}
    assert client.receive_data(raw(FrameType.CHALLENGE, 0, json.dumps(challenge).encode())) == []
    client.data_to_send()
    return client


@pytest.mark.parametrize("heartbeat", [-1.0, 0.0, 0.049, 3600.5, 1e9])
def test_welcome_heartbeat_is_range_checked(heartbeat: float) -> None:
    # Like CHALLENGE's: the client uses it as its ping interval and dead-peer timer.
    client = _client_after_challenge()
    welcome = json.dumps({"session": "s", "heartbeat": heartbeat}).encode()
    with pytest.raises(BadFrame):
        client.receive_data(raw(FrameType.WELCOME, 0, welcome))
    assert client.state is State.CLOSED


@pytest.mark.parametrize("heartbeat", [0.05, 12.5, 3600.0])
def test_welcome_heartbeat_in_range_is_taken(heartbeat: float) -> None:
    client = _client_after_challenge()
    welcome = json.dumps({"session": "s", "heartbeat": heartbeat}).encode()
    assert client.receive_data(raw(FrameType.WELCOME, 0, welcome)) == [
        HandshakeComplete("s", 1, None, heartbeat)
    ]
    assert client.heartbeat == heartbeat


NESTED = b"[" * 1000 + b"]" * 1000


def test_deeply_nested_hello_is_a_bad_frame() -> None:
    # msgspec raises RecursionError (even for an ignored field): it must become a BadFrame.
    relay = Session(Role.RELAY)
    hello = b'{"versions":[1],"nonce":"' + b"00" * 32 + b'","window":65536,"x":' + NESTED + b"}"
    assert len(hello) < MAX_META_PAYLOAD
    with pytest.raises(BadFrame):
        relay.receive_data(hs.PREFACE + raw(FrameType.HELLO, 0, hello))
    assert relay.state is State.CLOSED
    assert_goaway_queued(relay, "bad_frame")


@pytest.mark.parametrize("frame_type", [FrameType.CHALLENGE, FrameType.REJECT])
def test_deeply_nested_handshake_reply_is_a_bad_frame(frame_type: int) -> None:
    client = Session(Role.CLIENT)
    client.start()
    client.data_to_send()
    with pytest.raises(BadFrame):
        client.receive_data(raw(frame_type, 0, b'{"x":' + NESTED + b"}"))
    assert_goaway_queued(client, "bad_frame")


def test_version_reject_message_fits_in_a_frame() -> None:
    digits = (MAX_META_PAYLOAD - 110) // 4
    versions = ",".join(["9" * digits] * 4)
    hello = f'{{"versions":[{versions}],"nonce":"{"00" * 32}","window":65536}}'.encode()
    assert len(hello) <= MAX_META_PAYLOAD
    relay = Session(Role.RELAY)
    [failed] = relay.receive_data(hs.PREFACE + raw(FrameType.HELLO, 0, hello))
    assert failed.code == "version"
    [(frame_type, _, _)] = sent_frames(relay)
    assert frame_type == FrameType.REJECT


def test_deeply_nested_json_after_open_is_a_bad_frame() -> None:
    _client, relay = open_pair()
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.CONTROL, 0, b'{"x":' + NESTED * 4 + b"}"))


# --- streams --------------------------------------------------------------------------------


def test_stream_ids_by_opener() -> None:
    client, relay = open_pair()
    assert [client_stream(client, relay) for _ in range(3)] == [1, 3, 5]
    assert [relay_stream(client, relay) for _ in range(3)] == [2, 4, 6]
    assert client.open_streams == relay.open_streams == 6


def test_open_frame_exact_bytes_and_accept() -> None:
    client, relay = open_pair()
    stream_id = relay.open_stream({"host": "db", "port": 5432})
    payload = b'{"host":"db","port":5432}'
    assert relay.data_to_send() == [struct.pack(">BBII", 2, 0, 2, len(payload)) + payload]
    relay.data_to_send()
    client.receive_data(struct.pack(">BBII", 2, 0, 2, len(payload)) + payload)
    relay.open_stream({})
    assert pump(relay, client) == [StreamOpened(4, {})]
    client.accept_stream(stream_id)
    assert client.data_to_send() == [b"\x03\x00\x00\x00\x00\x02\x00\x00\x00\x00"]
    client.accept_stream(99)  # not a stream: nothing queued
    assert client.data_to_send() == []
    relay.receive_data(encode_frame(FrameType.ACCEPT, 2))
    assert relay.receive_data(encode_frame(FrameType.ACCEPT, 4)) == [StreamAccepted(4)]


def test_data_flows_both_ways() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    client.send_data(stream_id, b"ping")
    assert client.data_to_send() == [struct.pack(">BBII", 0, 0, stream_id, 4) + b"ping"]
    client.send_data(stream_id, b"ping")
    assert received(pump(client, relay)) == b"ping"
    relay.send_data(stream_id, memoryview(b"pong"))
    relay.send_data(stream_id, bytearray(b"!"))
    assert pump(relay, client) == [DataReceived(1, b"pong"), DataReceived(1, b"!")]


def test_large_writes_are_split_into_chunks() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    payload = bytes(range(256)) * (3 * MAX_DATA_CHUNK // 256 + 7)
    client.send_data(stream_id, payload)
    frames = frames_of(b"".join(client.data_to_send()))
    assert [len(p) for _, _, p in frames] == [MAX_DATA_CHUNK] * 3 + [7 * 256]
    assert b"".join(p for _, _, p in frames) == payload
    medium = b"m" * 20000  # above the small-write size, below a chunk: header then payload
    client.send_data(stream_id, medium)
    out = client.data_to_send()
    assert b"".join(out) == struct.pack(">BBII", 0, 0, stream_id, len(medium)) + medium
    client.send_data(stream_id, b"")
    assert b"".join(client.data_to_send()) == struct.pack(">BBII", 0, 0, stream_id, 0)


def test_send_beyond_credit_raises() -> None:
    client, relay = open_pair(window=MIN_WINDOW)
    stream_id = client_stream(client, relay)
    assert client.credit(stream_id) == MIN_WINDOW
    with pytest.raises(RuntimeError):
        client.send_data(stream_id, bytes(MIN_WINDOW + 1))
    assert client.data_to_send() == []
    assert client.credit(stream_id) == MIN_WINDOW
    client.send_data(stream_id, bytes(MIN_WINDOW))
    assert client.credit(stream_id) == 0
    with pytest.raises(RuntimeError):
        client.send_data(stream_id, b"x")
    with pytest.raises(RuntimeError):
        client.send_data(99, b"x")
    assert client.credit(99) == 0


def test_peer_sending_beyond_the_window_is_a_flow_control_error() -> None:
    client, relay = open_pair(window=MIN_WINDOW)
    stream_id = client_stream(client, relay)
    half = MIN_WINDOW // 2
    relay.receive_data(raw(FrameType.DATA, stream_id, bytes(half)))
    relay.receive_data(raw(FrameType.DATA, stream_id, bytes(half)))
    with pytest.raises(FlowControlError):
        relay.receive_data(raw(FrameType.DATA, stream_id, b"x"))
    assert_goaway_queued(relay, "flow_control")

    client, relay = open_pair(window=MIN_WINDOW)
    stream_id = relay_stream(client, relay)
    with pytest.raises(FlowControlError):
        client.receive_data(raw(FrameType.DATA, stream_id, bytes(MIN_WINDOW + 1)))


def test_consume_returns_credit_per_quarter_window() -> None:
    client, relay = open_pair(window=MIN_WINDOW)
    stream_id = client_stream(client, relay)
    quarter = MIN_WINDOW // 4
    client.send_data(stream_id, bytes(MIN_WINDOW))
    assert received(pump(client, relay)) == bytes(MIN_WINDOW)
    relay.consume(stream_id, quarter - 1)
    assert relay.data_to_send() == []
    relay.consume(stream_id, 1)
    window_frame = struct.pack(">BBII", 1, 0, stream_id, 4) + struct.pack(">I", quarter)
    assert relay.data_to_send() == [window_frame]
    assert client.receive_data(window_frame) == [WindowOpened(stream_id)]
    assert client.credit(stream_id) == quarter
    relay.consume(stream_id, quarter + 5)
    assert pump(relay, client) == [WindowOpened(stream_id)]
    assert client.credit(stream_id) == 2 * quarter + 5
    # The granted credit really may be used: the relay accepts exactly that much more.
    client.send_data(stream_id, bytes(2 * quarter + 5))
    assert len(received(pump(client, relay))) == 2 * quarter + 5
    with pytest.raises(FlowControlError):
        relay.receive_data(raw(FrameType.DATA, stream_id, b"x"))


def test_window_increments_are_checked() -> None:
    for payload in (b"\x00\x00\x00\x00", b"\x00\x01", b""):
        client, relay = open_pair()
        stream_id = client_stream(client, relay)
        with pytest.raises(BadFrame):
            client.receive_data(raw(FrameType.WINDOW, stream_id, payload))
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    with pytest.raises(FlowControlError):
        client.receive_data(raw(FrameType.WINDOW, stream_id, b"\xff\xff\xff\xff"))


def test_fin_half_closes_one_direction() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    client.send_data(stream_id, b"request")
    client.send_fin(stream_id)
    assert client.data_to_send()[-1] == b"\x04\x00\x00\x00\x00\x01\x00\x00\x00\x00"
    assert client.is_open(stream_id) and client.credit(stream_id) == 0
    with pytest.raises(RuntimeError):
        client.send_data(stream_id, b"more")
    client.send_fin(stream_id)  # a second FIN is not sent
    assert client.data_to_send() == []

    relay.receive_data(raw(FrameType.DATA, stream_id, b"request") + raw(FrameType.FIN, stream_id))
    assert relay.is_open(stream_id)
    relay.send_data(stream_id, b"response")
    assert pump(relay, client) == [DataReceived(stream_id, b"response")]
    relay.send_fin(stream_id)
    assert not relay.is_open(stream_id)
    assert pump(relay, client) == [StreamEnded(stream_id)]
    assert not client.is_open(stream_id)
    assert client.open_streams == relay.open_streams == 0


def test_fin_from_each_side_pumped() -> None:
    client, relay = open_pair()
    stream_id = relay_stream(client, relay)
    relay.send_fin(stream_id)
    assert pump(relay, client) == [StreamEnded(stream_id)]
    client.send_data(stream_id, b"late answer")
    assert pump(client, relay) == [DataReceived(stream_id, b"late answer")]
    client.send_fin(stream_id)
    assert pump(client, relay) == [StreamEnded(stream_id)]
    assert not client.is_open(stream_id) and not relay.is_open(stream_id)


def test_data_after_fin_is_a_bad_frame() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    client.send_fin(stream_id)
    pump(client, relay)
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.DATA, stream_id, b"x"))
    assert_goaway_queued(relay, "bad_frame")

    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.FIN, stream_id) + raw(FrameType.FIN, stream_id))


def test_reset_carries_code_and_reason() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    relay.reset_stream(stream_id, "refused", "connection refused by 10.0.0.5:5432")
    reason = b"connection refused by 10.0.0.5:5432"
    assert relay.data_to_send() == [
        struct.pack(">BBII", 5, 0, stream_id, 2 + len(reason)) + b"\x00\x01" + reason
    ]
    relay.reset_stream(stream_id)  # already gone: nothing more
    assert relay.data_to_send() == []
    relay.receive_data(b"")
    assert not relay.is_open(stream_id)
    frame = encode_frame(FrameType.RESET, stream_id, b"\x00\x01" + reason)
    assert client.receive_data(frame) == [StreamReset(stream_id, "refused", reason.decode())]
    assert not client.is_open(stream_id)


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"\x00\x06", "cancelled", ""),
        (b"\x00\x08full", "too_many_streams", "full"),
        (b"\x03\xe7odd", "error", "odd"),
        (b"\x00\x07\xff\xfe", "error", "\ufffd\ufffd"),
    ],
)
def test_reset_codes_decoded(payload: bytes, code: str, reason: str) -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    assert relay.receive_data(raw(FrameType.RESET, stream_id, payload)) == [
        StreamReset(stream_id, code, reason)
    ]


def test_reset_round_trip_with_unknown_code_name() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    client.reset_stream(stream_id, "no-such-code", "é" * 300)
    [event] = pump(client, relay)
    assert isinstance(event, StreamReset)
    assert event.code == "error"
    assert event.reason.startswith("é" * 256)


def test_reset_without_code_is_a_bad_frame() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.RESET, stream_id, b"\x01"))


@pytest.mark.parametrize("ended_by", ["reset_here", "reset_there", "both_fin"])
@pytest.mark.parametrize("opener", ["client", "relay"])
def test_frames_for_an_ended_stream_are_ignored(ended_by: str, opener: str) -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay) if opener == "client" else relay_stream(client, relay)
    if ended_by == "reset_here":
        relay.reset_stream(stream_id)
        relay.data_to_send()
    elif ended_by == "reset_there":
        client.reset_stream(stream_id)
        pump(client, relay)
    else:
        relay.send_fin(stream_id)
        client.send_fin(stream_id)
        pump(relay, client)
        pump(client, relay)
    assert not relay.is_open(stream_id)
    late = (
        raw(FrameType.DATA, stream_id, b"in flight")
        + raw(FrameType.WINDOW, stream_id, b"\x00\x00\x10\x00")
        + raw(FrameType.ACCEPT, stream_id)
        + raw(FrameType.FIN, stream_id)
        + raw(FrameType.RESET, stream_id, b"\x00\x06")
    )
    assert relay.receive_data(late) == []
    assert relay.state is State.OPEN
    assert relay.data_to_send() == []


@pytest.mark.parametrize("stream_id", [3, 99, 4, 100])
@pytest.mark.parametrize(
    "frame_type", [FrameType.DATA, FrameType.WINDOW, FrameType.ACCEPT, FrameType.FIN]
)
def test_frame_for_a_never_opened_stream(frame_type: int, stream_id: int) -> None:
    client, relay = open_pair()
    client_stream(client, relay)  # 1
    relay_stream(client, relay)  # 2
    payload = b"\x00\x00\x00\x01" if frame_type == FrameType.WINDOW else b""
    with pytest.raises(UnknownStream):
        relay.receive_data(raw(frame_type, stream_id, payload))
    assert relay.state is State.CLOSED
    assert_goaway_queued(relay, "unknown_stream")


@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.FIN, FrameType.RESET])
def test_stream_frames_on_stream_zero_are_bad(frame_type: int) -> None:
    _client, relay = open_pair()
    payload = b"\x00\x01" if frame_type == FrameType.RESET else b""
    with pytest.raises(BadFrame):
        relay.receive_data(raw(frame_type, 0, payload))


@pytest.mark.parametrize(
    ("side", "stream_id"),
    [("relay", 2), ("relay", 1), ("client", 1), ("client", 2), ("relay", 0), ("client", 0)],
)
def test_open_out_of_sequence_or_wrong_parity(side: str, stream_id: int) -> None:
    client, relay = open_pair()
    if side == "relay":
        client_stream(client, relay)  # the relay has seen 1 already
    else:
        relay_stream(client, relay)  # the client has seen 2 already
    session = relay if side == "relay" else client
    with pytest.raises(BadFrame):
        session.receive_data(raw(FrameType.OPEN, stream_id, b"{}"))


def test_open_may_skip_ids_and_skipped_ids_count_as_ended() -> None:
    _client, relay = open_pair()
    assert relay.receive_data(raw(FrameType.OPEN, 7, b"{}")) == [StreamOpened(7, {})]
    assert relay.receive_data(raw(FrameType.DATA, 3, b"x")) == []


@pytest.mark.parametrize("payload", [b"{", b"[]", b'"x"', b"\xff\xfe", b"", b"null", b"1e999999"])
def test_malformed_open_is_a_bad_frame(payload: bytes) -> None:
    _client, relay = open_pair()
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.OPEN, 1, payload))
    assert_goaway_queued(relay, "bad_frame")


def test_too_many_streams_resets_the_new_one_only() -> None:
    client = Session(Role.CLIENT)
    relay = Session(Role.RELAY, max_streams=2)
    handshake(client, relay)
    first, second = client_stream(client, relay), client_stream(client, relay)
    third = client.open_stream({"n": 3})
    client.send_data(third, b"eager")  # sent before the refusal arrives
    assert pump(client, relay) == []
    assert relay.state is State.OPEN
    assert relay.open_streams == 2 and not relay.is_open(third)
    assert pump(relay, client) == [StreamReset(third, "too_many_streams", "too many open streams")]
    assert not client.is_open(third)
    # The others still work, and a slot freed by a reset can be reused.
    client.send_data(first, b"ok")
    assert pump(client, relay) == [DataReceived(first, b"ok")]
    client.reset_stream(second)
    pump(client, relay)
    fourth = client.open_stream({})
    assert pump(client, relay) == [StreamOpened(fourth, {})]


def test_max_streams_counts_streams_of_both_openers() -> None:
    client = Session(Role.CLIENT)
    relay = Session(Role.RELAY, max_streams=1)
    handshake(client, relay)
    relay_stream(client, relay)
    client.open_stream({})
    assert pump(client, relay) == []
    [event] = pump(relay, client)
    assert isinstance(event, StreamReset) and event.code == "too_many_streams"


def test_ping_is_answered_with_the_same_payload() -> None:
    client, relay = open_pair()
    client.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert client.data_to_send() == [
        b"\x06\x00\x00\x00\x00\x00\x00\x00\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"
    ]
    client.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert pump(client, relay) == []
    assert relay.data_to_send() == [
        b"\x07\x00\x00\x00\x00\x00\x00\x00\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"
    ]
    relay.ping(b"abc")  # padded to 8 bytes
    assert pump(relay, client) == []
    assert pump(client, relay) == [PongReceived(b"abc\0\0\0\0\0")]
    assert relay.receive_data(raw(FrameType.PING, 0, b"")) == []
    assert relay.data_to_send() == [raw(FrameType.PONG, 0, b"")]


def test_ping_before_open_is_not_sent() -> None:
    client = Session(Role.CLIENT)
    client.ping(bytes(8))
    assert client.data_to_send() == []


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"op": "register", "kind": "tcp", "port": 5432, "id": 1},
        {"nested": {"a": [1, None]}},
        {"text": "é\u2028\x00"},
    ],
)
def test_control_round_trip(message: dict[str, Any]) -> None:
    client, relay = open_pair()
    client.send_control(message)
    assert pump(client, relay) == [ControlReceived(message)]
    relay.send_control(message)
    assert pump(relay, client) == [ControlReceived(message)]


def test_control_frame_exact_bytes() -> None:
    client, _relay = open_pair()
    client.send_control({"op": "x", "id": 1})
    assert client.data_to_send() == [raw(FrameType.CONTROL, 0, b'{"op":"x","id":1}')]


def test_control_too_large_is_refused_locally() -> None:
    client, _relay = open_pair()
    with pytest.raises(ValueError):
        client.send_control({"blob": "x" * MAX_META_PAYLOAD})
    assert client.data_to_send() == []


def test_control_on_a_stream_is_a_bad_frame() -> None:
    client, relay = open_pair()
    client_stream(client, relay)
    with pytest.raises(BadFrame):
        relay.receive_data(raw(FrameType.CONTROL, 1, b"{}"))
    assert_goaway_queued(relay, "bad_frame")


@pytest.mark.parametrize("payload", [b"{", b"[1]", b"\xff", b""])
def test_malformed_control_or_goaway_is_a_bad_frame(payload: bytes) -> None:
    for frame_type in (FrameType.CONTROL, FrameType.GOAWAY):
        client, _relay = open_pair()
        with pytest.raises(BadFrame):
            client.receive_data(raw(frame_type, 0, payload))


def test_goaway_fields_are_coerced() -> None:
    client, _ = open_pair()
    payload = json.dumps({"code": 7, "reason": ["x"], "extra": 1}).encode()
    assert client.receive_data(raw(FrameType.GOAWAY, 0, payload)) == [GoAwayReceived("7", "['x']")]
    client, _relay = open_pair()
    assert client.receive_data(raw(FrameType.GOAWAY, 0, b"{}")) == [GoAwayReceived("error", "")]


def test_frames_after_goaway_in_the_same_read_are_dropped() -> None:
    client, relay = open_pair()
    stream_id = client_stream(client, relay)
    data = raw(FrameType.GOAWAY, 0, b"{}") + raw(FrameType.DATA, stream_id, b"x")
    assert relay.receive_data(data) == [GoAwayReceived("error", "")]


def test_handshake_and_first_frames_in_one_read() -> None:
    client, relay = Session(Role.CLIENT), Session(Role.RELAY)
    client.start()
    pump(client, relay)
    pump(relay, client)
    pump(client, relay)
    relay.open_stream({"x": 1})
    relay.send_data(2, b"early")
    events = pump(relay, client)  # WELCOME, OPEN, DATA together
    assert [type(e) for e in events] == [HandshakeComplete, StreamOpened, DataReceived]
    assert events[2] == DataReceived(2, b"early")


# --- properties -----------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` or ``bad``: plausible values half the time, so random handshakes get further."""
    return good | bad


hex_nonces = st.binary(min_size=32, max_size=32).map(bytes.hex)
nonces = mostly(hex_nonces, st.text(max_size=70) | JSON_SCALARS)
windows = mostly(
    st.sampled_from([MIN_WINDOW, (1 << 31) - 1]),
    st.sampled_from([MIN_WINDOW - 1, 1 << 31]) | JSON_SCALARS,
)
texts = mostly(st.text(max_size=8), JSON_SCALARS)
hello_messages = st.fixed_dictionaries(
    {
        "versions": mostly(st.lists(st.integers(-2, 3), max_size=3), JSON_SCALARS),
        "nonce": nonces,
        "window": windows,
    },
    optional={"identity": st.text(max_size=90) | JSON_SCALARS, "software": texts},
)
challenge_messages = st.fixed_dictionaries(
    {
        "version": mostly(st.just(1), st.integers(0, 2) | JSON_SCALARS),
        "nonce": nonces,
        "auth": mostly(st.sampled_from(["none", "secret"]), JSON_SCALARS),
        "window": windows,
    },
    optional={"heartbeat": mostly(st.floats(0.05, 3600), st.floats(-1, 4000) | JSON_SCALARS)},
)
auth_messages = st.fixed_dictionaries(
    {},
    optional={
        "mac": mostly(st.none(), st.text(max_size=70) | JSON_SCALARS),
        "signature": st.text(max_size=90),
    },
)
welcome_messages = st.fixed_dictionaries(
    {"session": texts},
    optional={"heartbeat": mostly(st.floats(0.05, 3600), JSON_SCALARS)},
)
reject_messages = st.fixed_dictionaries({"code": texts, "message": texts})
other_messages = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
handshake_messages = st.one_of(
    hello_messages,
    challenge_messages,
    auth_messages,
    welcome_messages,
    reject_messages,
    other_messages,
)


def as_json(messages: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return messages.map(lambda m: json.dumps(m).encode())


reset_payloads = st.tuples(st.integers(0, 9), st.text(max_size=8)).map(
    lambda t: struct.pack(">H", t[0]) + t[1].encode()
)
any_payload = st.one_of(
    st.binary(max_size=40),
    as_json(handshake_messages),
    as_json(json_values),
    st.integers(0, 2**32 - 1).map(struct.Struct(">I").pack),
    reset_payloads,
)
#: Payloads that fit each type, so that most frames get past the codec into the session.
fitting_payloads: dict[int, st.SearchStrategy[bytes]] = {
    FrameType.DATA: st.binary(max_size=40),
    FrameType.WINDOW: st.integers(0, 2**32 - 1).map(struct.Struct(">I").pack),
    FrameType.ACCEPT: st.just(b""),
    FrameType.FIN: st.just(b""),
    FrameType.RESET: reset_payloads,
    FrameType.PING: st.binary(max_size=8),
    FrameType.PONG: st.binary(max_size=8),
    FrameType.OPEN: as_json(json_values),
    FrameType.CONTROL: as_json(json_values),
    FrameType.GOAWAY: as_json(json_values),
    FrameType.HELLO: as_json(mostly(hello_messages, handshake_messages)),
    FrameType.CHALLENGE: as_json(mostly(challenge_messages, handshake_messages)),
    FrameType.AUTH: as_json(mostly(auth_messages, handshake_messages)),
    FrameType.WELCOME: as_json(mostly(welcome_messages, handshake_messages)),
    FrameType.REJECT: as_json(mostly(reject_messages, handshake_messages)),
}
#: Mostly types this version defines, sometimes not.
UNDEFINED_TYPES = [0x0A, 0x0F, 0x15, 0xFF]
any_frame_type = st.sampled_from([*list(FrameType) * 4, *UNDEFINED_TYPES])
#: After the handshake: mostly stream and session frames.
open_frame_type = st.sampled_from(
    [*[t for t in FrameType if t < FrameType.HELLO] * 6, *FrameType, *UNDEFINED_TYPES]
)

#: During the handshake: mostly handshake frames.
handshake_frame_type = st.sampled_from(
    [*[t for t in FrameType if t >= FrameType.HELLO] * 8, *FrameType, *UNDEFINED_TYPES]
)


@st.composite
def wire_frames(
    draw: st.DrawFn,
    stream_ids: st.SearchStrategy[int],
    frame_types: st.SearchStrategy[int] = any_frame_type,
) -> bytes:
    """A frame of any type; its payload usually fits the type, and its length rarely lies."""
    frame_type = draw(frame_types)
    fitting = fitting_payloads.get(frame_type, any_payload)
    payload = draw(mostly(fitting, any_payload))
    length = len(payload)
    if draw(st.integers(0, 19)) == 0:
        length = draw(st.integers(0, 64) | st.integers(0, 2**32 - 1))
    return raw(frame_type, draw(stream_ids), payload, length=length)


small_ids = st.integers(0, 9) | st.just(0xFFFFFFFF)
#: Mostly the streams open in ``test_open_session_survives_arbitrary_frames``.
open_ids = st.sampled_from([1, 2, 3] * 4 + [0, 4, 5, 6, 7, 9, 0xFFFFFFFF])
preambles = st.sampled_from(
    [hs.PREFACE] * 6 + [b"", hs.PREFACE[:5], b"BURROW\r\r", b"GET / HTTP/1.1\r\n"]
)


def feed_checked(session: Session, chunks: list[bytes]) -> list[Any]:
    """Feed ``chunks``; only documented errors may come out, and the state stays coherent."""
    events: list[Any] = []
    for chunk in chunks:
        try:
            events += session.receive_data(chunk)
        except ProtocolError as exc:
            statistic(f"{session.role.value}: {type(exc).__name__}")
            assert session.state is State.CLOSED
            assert session.close_reason is exc
            assert_goaway_queued(session, exc.code)
            assert session.receive_data(chunk) == []
            return events
        except DOCUMENTED_ERRORS:
            statistic(f"{session.role.value}: rejected")
            assert session.role is Role.CLIENT  # only a client is told it was rejected
            assert session.state is State.CLOSED
            return events
        assert session.buffered <= HEADER_SIZE + MAX_META_PAYLOAD
        if session.state is State.CLOSED:
            assert session.receive_data(b"anything") == []
    statistic(f"{session.role.value}: {session.state.value}, {len(events)} events")
    return events


@PROPERTY
@given(
    st.one_of(
        st.tuples(preambles, st.binary(max_size=200)).map(b"".join),
        st.tuples(
            preambles, st.lists(wire_frames(small_ids, handshake_frame_type), max_size=6)
        ).map(lambda t: t[0] + b"".join(t[1])),
    ),
    st.lists(st.integers(0, 400), max_size=12),
    st.sampled_from([None, "s"]),
)
def test_relay_survives_arbitrary_input(blob: bytes, cuts: list[int], secret: str | None) -> None:
    feed_checked(Session(Role.RELAY, secret=secret), split(blob, cuts))


@PROPERTY
@given(
    st.lists(wire_frames(small_ids, handshake_frame_type), max_size=6).map(b"".join)
    | st.binary(max_size=200),
    st.lists(st.integers(0, 400), max_size=12),
    st.sampled_from([None, "s"]),
    st.integers(1, 2),
)
def test_relay_after_real_steps_survives_arbitrary_input(
    blob: bytes, cuts: list[int], secret: str | None, steps: int
) -> None:
    """After a real HELLO (1), or a real HELLO and AUTH (2: the session is open)."""
    client = Session(Role.CLIENT, secret=secret)
    relay = Session(Role.RELAY, secret=secret)
    client.start()
    pump(client, relay)
    if steps == 2:
        pump(relay, client)
        assert pump(client, relay)[0].session_id == relay.session_id
    relay.data_to_send()
    feed_checked(relay, split(blob, cuts))


@PROPERTY
@given(
    st.lists(wire_frames(small_ids, handshake_frame_type), max_size=6).map(b"".join)
    | st.binary(max_size=200),
    st.lists(st.integers(0, 400), max_size=12),
    st.integers(0, 2),
)
def test_client_survives_arbitrary_input(blob: bytes, cuts: list[int], steps: int) -> None:
    """After start() (0), a real CHALLENGE (1), or a real CHALLENGE and WELCOME (2: open)."""
    client = Session(Role.CLIENT, secret="s")
    relay = Session(Role.RELAY, secret="s")
    client.start()
    pump(client, relay)
    if steps >= 1:
        assert pump(relay, client) == []
    if steps == 2:
        pump(client, relay)
        assert [type(e) for e in pump(relay, client)] == [HandshakeComplete]
    client.data_to_send()
    feed_checked(client, split(blob, cuts))


@PROPERTY
@given(
    st.sampled_from(["client", "relay"]),
    st.lists(wire_frames(open_ids, open_frame_type), min_size=1, max_size=8),
    st.lists(st.integers(0, 400), max_size=12),
)
def test_open_session_survives_arbitrary_frames(
    side: str, frames: list[bytes], cuts: list[int]
) -> None:
    client, relay = open_pair(window=MIN_WINDOW)
    client_stream(client, relay)  # 1
    relay_stream(client, relay)  # 2
    client_stream(client, relay)  # 3
    session = client if side == "client" else relay
    events = feed_checked(session, split(b"".join(frames), cuts))
    for event in events:
        assert isinstance(
            event,
            DataReceived
            | WindowOpened
            | StreamOpened
            | StreamAccepted
            | StreamEnded
            | StreamReset
            | ControlReceived
            | PongReceived
            | GoAwayReceived,
        )


@st.composite
def write_plans(draw: st.DrawFn) -> list[tuple[int, bool, int, int]]:
    """(stream index, from client?, size, seed) writes."""
    return draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.booleans(),
                st.integers(0, 40000) | st.integers(0, 300),
                st.integers(0, 2**16),
            ),
            max_size=12,
        )
    )


@settings(PROPERTY, max_examples=150)
@given(write_plans(), st.integers(0, 2**32), st.booleans())
def test_data_round_trip(plan: list[tuple[int, bool, int, int]], seed: int, fin: bool) -> None:
    rng = random.Random(seed)
    client, relay = open_pair(window=MIN_WINDOW)
    streams = [client_stream(client, relay), relay_stream(client, relay)]
    streams += [client_stream(client, relay), relay_stream(client, relay)]
    sides = {True: (client, relay), False: (relay, client)}
    pending: dict[tuple[bool, int], bytearray] = defaultdict(bytearray)
    expected: dict[tuple[bool, int], bytes] = defaultdict(bytes)
    got: dict[tuple[bool, int], bytearray] = defaultdict(bytearray)
    ended: set[tuple[bool, int]] = set()
    for index, from_client, size, data_seed in plan:
        data = random.Random(data_seed).randbytes(size)
        pending[from_client, streams[index]] += data
        expected[from_client, streams[index]] += data

    def deliver(from_client: bool) -> bool:
        sender, receiver = sides[from_client]
        blob = b"".join(sender.data_to_send())
        if not blob:
            return False
        cuts = [rng.randrange(len(blob) + 1) for _ in range(rng.randrange(4))]
        for chunk in split(blob, cuts):
            for event in receiver.receive_data(chunk):
                if isinstance(event, DataReceived):
                    got[from_client, event.stream_id] += event.data
                    receiver.consume(event.stream_id, len(event.data))
                elif isinstance(event, StreamEnded):
                    ended.add((from_client, event.stream_id))
        return True

    for _ in range(10000):
        progress = False
        for (from_client, stream_id), buffer in pending.items():
            sender = sides[from_client][0]
            size = min(len(buffer), sender.credit(stream_id), rng.choice([1, 5000, MIN_WINDOW]))
            if size:
                sender.send_data(stream_id, bytes(buffer[:size]))
                del buffer[:size]
                progress = True
        progress |= deliver(True)
        progress |= deliver(False)
        if not progress:
            break
    assert not any(pending.values()), "flow control stalled"
    assert {k: bytes(v) for k, v in got.items()} == {k: v for k, v in expected.items() if v}
    if fin:
        for stream_id in streams:
            client.send_fin(stream_id)
            relay.send_fin(stream_id)
        deliver(True)
        deliver(False)
        assert ended == {(side, s) for side in (True, False) for s in streams}
        assert client.open_streams == relay.open_streams == 0


def test_data_goes_to_the_sink_until_another_event_comes_first() -> None:
    """``receive_data(data, on_data)``: DATA frames before any other event of the read go to
    the sink at once; after one, they stay events, so an OPEN and its first bytes in one read
    keep their order (the handler for the new stream exists only once the OPEN is handled)."""
    client, relay = open_pair()
    first = client.open_stream({})
    pump(client, relay)
    client.send_data(first, b"early")
    second = client.open_stream({"n": 2})
    client.send_data(second, b"after the open")
    client.send_data(first, b"late")
    sunk: list[tuple[int, bytes]] = []
    events = relay.receive_data(
        b"".join(bytes(b) for b in client.data_to_send()),
        lambda stream_id, payload: sunk.append((stream_id, bytes(payload))),
    )
    assert sunk == [(first, b"early")]
    assert events == [
        StreamOpened(second, {"n": 2}),
        DataReceived(second, b"after the open"),
        DataReceived(first, b"late"),
    ]


def test_data_to_the_sink_is_still_flow_controlled() -> None:
    client, relay = open_pair(window=MIN_WINDOW)
    stream_id = client.open_stream({})
    pump(client, relay)
    with pytest.raises(FlowControlError):
        relay.receive_data(raw(FrameType.DATA, stream_id, bytes(MIN_WINDOW + 1)), lambda s, p: None)


def test_the_decoders_data_constant_is_the_data_frame_type() -> None:
    from burrow.wire import frames

    assert frames.DATA_TYPE == FrameType.DATA
