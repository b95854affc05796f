"""Hostile peers against a running relay: garbage, oversized frames, frames for streams that were
never opened, skipping authentication, saying nothing, overrunning the flow-control window.

Each attacker is a raw asyncio connection (plaintext, or TLS with the relay's pinned
certificate) that speaks the handshake with a sans-I/O client ``Session`` when it needs to and
then writes hand-made frames. Every attack must end that session only (GOAWAY with the reason,
then EOF), be reported in the relay's events, and leave a legitimate tunnel on the same relay
moving bytes, with ``health()`` counting just the legitimate session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from burrow.net.tls import TrustPolicy
from burrow.roles import relay as relay_module
from burrow.roles.agent import Agent
from burrow.roles.relay import Relay
from burrow.wire import handshake as hs
from burrow.wire.frames import HEADER, FrameDecoder, FrameType, encode_frame, encode_header
from burrow.wire.session import HandshakeComplete, Role, Session
from helpers import SCALE, Events, agent_config, echo_server, relay_config

SECRET = "hostile-test-secret"
MODES = ["plaintext", "tls"]


# --------------------------------------------------------------------------- the legitimate side


@dataclass
class Stage:
    relay: Relay
    agent: Agent
    public: tuple[str, int]
    events: Events

    @property
    def tls(self) -> bool:
        return not self.relay.config.insecure

    async def legit_still_works(self) -> None:
        """The legitimate tunnel still moves bytes, and it is the relay's only session."""
        payload = os.urandom(256 * 1024)
        reader, writer = await asyncio.open_connection(*self.public)
        try:
            async with asyncio.timeout(10 * SCALE):
                writer.write(payload)
                writer.write_eof()
                assert await reader.read(-1) == payload
        finally:
            writer.close()
        async with asyncio.timeout(5 * SCALE):
            while self.relay.health()["sessions"] != 1:
                await asyncio.sleep(0.02)
        health = self.relay.health()
        assert health["sessions"] == 1, health
        assert [c.session.peer_identity for c in self.relay.sessions] == [
            hs.public_identity(self.agent.identity)
        ]
        assert self.agent.conn is not None and self.agent.conn.is_open


@contextlib.asynccontextmanager
async def stage(tmp: Path, mode: str, **relay_options: Any) -> AsyncIterator[Stage]:
    events = Events()
    options: dict[str, Any] = {"secret": SECRET, "insecure": mode == "plaintext"}
    options.update(relay_options)
    relay = Relay(relay_config(tmp, **options), on_event=events)
    await relay.start()
    try:
        async with echo_server() as echo_port:
            agent = Agent(agent_config(relay, ("127.0.0.1", echo_port)))
            await agent.start()
            try:
                port = agent.tunnels[0].port
                assert port is not None
                st = Stage(relay, agent, ("127.0.0.1", port), events)
                await st.legit_still_works()
                yield st
            finally:
                await agent.close()
    finally:
        await relay.close()


# --------------------------------------------------------------------------- the raw attacker


class Raw:
    """A raw connection to the relay's control port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.session: Session | None = None

    @classmethod
    async def connect(cls, st: Stage, *, tls: bool | None = None) -> Raw:
        assert st.relay.control_address is not None
        host, port = st.relay.control_address
        context: ssl.SSLContext | None = None
        if st.tls if tls is None else tls:
            context = TrustPolicy(fingerprint=st.relay.fingerprint).ssl_context()
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def handshake(self, secret: str | None = SECRET) -> HandshakeComplete:
        """Complete a real handshake (preface, HELLO, AUTH) with a client ``Session``."""
        session = self.session = Session(Role.CLIENT, secret=secret)
        session.start()
        self.writer.writelines(session.data_to_send())
        async with asyncio.timeout(5 * SCALE):
            while True:
                data = await self.reader.read(65536)
                assert data, "the relay closed during the handshake"
                events = session.receive_data(data)
                self.writer.writelines(session.data_to_send())
                for event in events:
                    if isinstance(event, HandshakeComplete):
                        return event

    async def read_frames(self, count: int) -> list[tuple[int, int, bytes]]:
        """Read until ``count`` whole frames are in (bounded)."""
        decoder = FrameDecoder()
        frames: list[tuple[int, int, bytes]] = []
        async with asyncio.timeout(5 * SCALE):
            while len(frames) < count:
                data = await self.reader.read(65536)
                assert data, "closed early"
                frames += [(t, s, bytes(p)) for t, s, p in decoder.feed(data)]
        return frames

    async def until_closed(self, timeout: float = 5.0) -> tuple[list[tuple[int, int, bytes]], str]:
        """Read until EOF or a reset; return the frames received and how it ended."""
        chunks: list[bytes] = []
        how = "eof"
        try:
            async with asyncio.timeout(timeout * SCALE):
                while data := await self.reader.read(65536):
                    chunks.append(data)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            how = "reset"
        finally:
            self.writer.close()
        frames = [(t, s, bytes(p)) for t, s, p in FrameDecoder().feed(b"".join(chunks))]
        return frames, how


def goaway_codes(frames: list[tuple[int, int, bytes]]) -> list[str]:
    return [json.loads(p)["code"] for t, _, p in frames if t == FrameType.GOAWAY]


def hello_frame() -> bytes:
    hello = hs.Hello(
        versions=list(hs.VERSIONS), nonce=os.urandom(hs.NONCE_SIZE).hex(), window=1 << 20
    )
    return encode_frame(FrameType.HELLO, 0, hs.encode(hello))


async def closed_event(st: Stage, name: str, count: int = 1) -> dict[str, Any]:
    return await st.events.wait_for(name, count, timeout=5)


# --------------------------------------------------------------------------- the attacks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_garbage_closes_only_that_session(tmp_path: Path, mode: str) -> None:
    async with stage(tmp_path, mode) as st:
        raw = await Raw.connect(st)
        raw.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n" + os.urandom(512))
        frames, how = await raw.until_closed()
        assert how in ("eof", "reset")
        if how == "eof":
            assert goaway_codes(frames) == ["bad_preface"]
        refused = await closed_event(st, "session_refused")
        assert "bad_preface" in refused["reason"], refused
        assert not st.events.named("session_closed")
        await st.legit_still_works()

        # Garbage after a valid preface: an unknown frame type.
        raw = await Raw.connect(st)
        raw.send(hs.PREFACE + b"\x7f" + os.urandom(64))
        frames, _ = await raw.until_closed()
        refused = await closed_event(st, "session_refused", 2)
        assert "unknown_frame" in refused["reason"], refused
        await st.legit_still_works()

        # Garbage after a complete handshake.
        raw = await Raw.connect(st)
        await raw.handshake()
        raw.send(encode_frame(FrameType.CONTROL, 0, b"{not json"))
        frames, how = await raw.until_closed()
        assert how == "eof" and goaway_codes(frames) == ["bad_frame"]
        closed = await closed_event(st, "session_closed")
        assert "bad_frame" in closed["reason"], closed
        await st.legit_still_works()


async def test_garbage_at_the_tls_layer(tmp_path: Path) -> None:
    """Not even a TLS ClientHello: the TLS handshake fails and the connection is dropped."""
    async with stage(tmp_path, "tls") as st:
        raw = await Raw.connect(st, tls=False)
        raw.send(hs.PREFACE + os.urandom(2048))
        frames, _ = await raw.until_closed()
        assert frames == [] or all(t != FrameType.WELCOME for t, _, _ in frames)
        await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_oversized_frame_header(tmp_path: Path, mode: str) -> None:
    async with stage(tmp_path, mode) as st:
        raw = await Raw.connect(st)
        await raw.handshake()
        raw.send(encode_header(FrameType.DATA, 1, 2**31))
        frames, how = await raw.until_closed()
        assert how == "eof", how
        assert goaway_codes(frames) == ["frame_too_large"], frames
        goaway = json.loads(next(p for t, _, p in frames if t == FrameType.GOAWAY))
        assert str(2**31) in goaway["reason"]
        closed = await closed_event(st, "session_closed")
        assert "frame_too_large" in closed["reason"], closed
        await st.legit_still_works()

        # The same for a metadata frame just over its limit, before the handshake.
        raw = await Raw.connect(st)
        raw.send(hs.PREFACE + encode_header(FrameType.HELLO, 0, 16 * 1024 + 1))
        frames, how = await raw.until_closed()
        assert goaway_codes(frames) == ["frame_too_large"]
        refused = await closed_event(st, "session_refused")
        assert "frame_too_large" in refused["reason"], refused
        await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_frames_for_unknown_stream(tmp_path: Path, mode: str) -> None:
    async with stage(tmp_path, mode) as st:
        for count, frame in enumerate(
            (
                encode_frame(FrameType.DATA, 999, b"x" * 10),
                encode_frame(FrameType.WINDOW, 1001, (4096).to_bytes(4, "big")),
                encode_frame(FrameType.FIN, 1003),
            ),
            start=1,
        ):
            raw = await Raw.connect(st)
            await raw.handshake()
            raw.send(frame)
            frames, how = await raw.until_closed()
            assert how == "eof" and goaway_codes(frames) == ["unknown_stream"], frames
            closed = await closed_event(st, "session_closed", count)
            assert "unknown_stream" in closed["reason"], closed
            await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_open_without_auth(tmp_path: Path, mode: str) -> None:
    async with stage(tmp_path, mode) as st:
        # PREFACE + HELLO, wait for the CHALLENGE, then OPEN instead of AUTH.
        raw = await Raw.connect(st)
        raw.send(hs.PREFACE + hello_frame())
        [(frame_type, _, payload)] = await raw.read_frames(1)
        assert frame_type == FrameType.CHALLENGE
        assert hs.decode(payload, hs.Challenge).auth == "secret"
        raw.send(encode_frame(FrameType.OPEN, 1, b'{"port": 1}'))
        frames, how = await raw.until_closed()
        assert how == "eof" and goaway_codes(frames) == ["bad_frame"], frames
        refused = await closed_event(st, "session_refused")
        assert "bad_frame" in refused["reason"] and "handshake" in refused["reason"], refused
        assert not st.events.named("session_opened")[1:], "an unauthenticated session opened"
        await st.legit_still_works()

        # The same in one write, and a register request before AUTH.
        for count, frame in enumerate(
            (
                encode_frame(FrameType.OPEN, 1, b"{}"),
                encode_frame(FrameType.CONTROL, 0, b'{"op":"register","kind":"tcp","id":1}'),
            ),
            start=2,
        ):
            raw = await Raw.connect(st)
            raw.send(hs.PREFACE + hello_frame() + frame)
            frames, _ = await raw.until_closed()
            assert [t for t, _, _ in frames] == [FrameType.CHALLENGE, FrameType.GOAWAY]
            refused = await closed_event(st, "session_refused", count)
            assert "bad_frame" in refused["reason"], refused
        assert len(st.relay.tunnels) == 1
        await st.legit_still_works()

        # A wrong secret is refused with a REJECT, not a protocol error.
        raw = await Raw.connect(st)
        with pytest.raises(Exception, match="secret"):
            await raw.handshake(secret="wrong")
        frames, _ = await raw.until_closed()
        refused = await closed_event(st, "session_refused", 4)
        assert "secret" in refused["reason"], refused
        await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_silent_client_hits_handshake_deadline(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "HANDSHAKE_TIMEOUT", 0.5)
    async with stage(tmp_path, mode) as st:
        loop = asyncio.get_running_loop()
        attackers = []
        # Silent after connecting (after the TLS handshake, in TLS mode) ...
        attackers.append(await Raw.connect(st))
        # ... silent after part of the preface, and after a HELLO header with no payload.
        slow = await Raw.connect(st)
        slow.send(hs.PREFACE[:3])
        attackers.append(slow)
        partial = await Raw.connect(st)
        partial.send(hs.PREFACE + encode_header(FrameType.HELLO, 0, 200) + b"{")
        attackers.append(partial)
        # ... and silent after the CHALLENGE (never sends AUTH).
        stuck = await Raw.connect(st)
        stuck.send(hs.PREFACE + hello_frame())
        attackers.append(stuck)
        if st.tls:
            # ... and a plain TCP connection that never starts TLS.
            attackers.append(await Raw.connect(st, tls=False))
        started = loop.time()
        results = await asyncio.gather(*(a.until_closed(timeout=5) for a in attackers))
        elapsed = loop.time() - started
        assert all(how in ("eof", "reset") for _, how in results)
        assert elapsed < 0.5 + 2.0 * SCALE, elapsed
        for frames, _ in results:
            assert FrameType.WELCOME not in [t for t, _, _ in frames]
        assert st.relay.health()["sessions"] == 1
        await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_flow_control_overrun(tmp_path: Path, mode: str) -> None:
    """A client that registers a tunnel, gets a visitor's stream, and sends beyond its credit."""
    async with stage(tmp_path, mode, lease_grace=0) as st:
        raw = await Raw.connect(st)
        await raw.handshake()
        raw.send(encode_frame(FrameType.CONTROL, 0, b'{"op":"register","kind":"tcp","id":7}'))
        [(frame_type, _, payload)] = await raw.read_frames(1)
        assert frame_type == FrameType.CONTROL
        reply = json.loads(payload)
        assert reply["op"] == "registered" and reply["id"] == 7
        # A visitor that reads nothing, with a small receive buffer: the relay soon stops
        # consuming the stream and returns no more credit.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", reply["port"]))
        vreader, vwriter = await asyncio.open_connection(sock=sock, limit=4096)
        frames = await raw.read_frames(1)
        while frames[-1][0] != FrameType.OPEN:  # skip heartbeat PINGs
            frames = await raw.read_frames(1)
        stream_id = frames[-1][1]
        assert stream_id % 2 == 0
        # The relay granted its window (4 MiB by default) and tops it up only as the visitor
        # takes bytes; ignore the WINDOW frames and send up to 32 MiB in 1 MiB frames.
        raw.send(encode_frame(FrameType.ACCEPT, stream_id))
        chunk = os.urandom(1 << 20)
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(20 * SCALE):
                for _ in range(32):
                    if raw.reader.at_eof() or raw.writer.is_closing():
                        break
                    raw.send(HEADER.pack(FrameType.DATA, 0, stream_id, len(chunk)) + chunk)
                    await raw.writer.drain()
        frames, how = await raw.until_closed(timeout=10)
        assert "flow_control" in goaway_codes(frames) or how == "reset", (goaway_codes(frames), how)
        closed = await closed_event(st, "session_closed")
        assert "flow_control" in closed["reason"], closed
        # The visitor of the hostile tunnel is cut off, and the tunnel is gone.
        async with asyncio.timeout(10 * SCALE):
            with contextlib.suppress(ConnectionError):
                while await vreader.read(1 << 20):
                    pass
        vwriter.close()
        assert reply["port"] not in st.relay.tunnels
        await st.legit_still_works()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
async def test_streams_opened_by_a_client_are_refused_not_fatal(tmp_path: Path, mode: str) -> None:
    """An OPEN from an authenticated client is reset (not_allowed); the session stays up."""
    async with stage(tmp_path, mode) as st:
        raw = await Raw.connect(st)
        await raw.handshake()
        raw.send(encode_frame(FrameType.OPEN, 1, b'{"port": 1}'))
        frames = await raw.read_frames(1)
        while frames[-1][0] == FrameType.PING:
            frames = await raw.read_frames(1)
        frame_type, stream_id, payload = frames[-1]
        assert (frame_type, stream_id) == (FrameType.RESET, 1)
        assert int.from_bytes(payload[:2], "big") == 4  # not_allowed
        assert st.relay.health()["sessions"] == 2
        raw.writer.close()
        await closed_event(st, "session_closed")
        await st.legit_still_works()


@pytest.mark.timeout(60)
async def test_authenticated_client_that_goes_silent_is_dropped(tmp_path: Path) -> None:
    async with stage(tmp_path, "plaintext", heartbeat=0.2) as st:
        raw = await Raw.connect(st)
        welcome = await raw.handshake()
        assert welcome.heartbeat == 0.2
        # Never answer the relay's PINGs, never send anything.
        frames, _ = await raw.until_closed(timeout=5)
        assert FrameType.PING in [t for t, _, _ in frames]
        closed = await closed_event(st, "session_closed")
        assert "heartbeat" in closed["reason"], closed
        await st.legit_still_works()


def _flood(kind: str, count: int, first_id: int = 1) -> bytes:
    if kind == "ping":
        return encode_frame(FrameType.PING, 0, b"12345678") * count
    return b"".join(encode_frame(FrameType.OPEN, first_id + 2 * k, b"{}") for k in range(count))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["ping", "open"])
async def test_control_frame_flood_without_reading_is_bounded(tmp_path: Path, kind: str) -> None:
    """HTTP/2's ping and reset floods (CVE-2019-9512, -9514): replies the peer never reads must
    not pile up in the relay. A bounded relay either stops reading (the flood's writes block)
    or drops the session."""
    async with stage(tmp_path, "plaintext") as st:
        assert st.relay.control_address is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, st.relay.control_address)
        raw = Raw(*await asyncio.open_connection(sock=sock, limit=4096))
        await raw.handshake()
        [conn] = [c for c in st.relay.sessions if c.session.peer_identity is None]
        # 16 MiB of PINGs (PONGs are as big) or 4 MiB of OPENs (RESETs are ~3x bigger): more
        # than the kernel's socket buffers (4 MiB at most here) can take off the relay's hands.
        batch, batches = 4096, (228 if kind == "ping" else 85)
        peak = 0
        sent = 0
        next_id = 1

        def sample() -> None:
            nonlocal peak
            if conn.transport is not None:
                peak = max(peak, conn.transport.get_write_buffer_size())

        async def relay_keeps_reading(until: int | None = None) -> bool:
            """Wait for our writes to drain (or the relay to read ``until`` bytes); False once
            the relay reads nothing for 2 s (it applies backpressure, as it should)."""
            while conn.transport is not None:
                before = conn.bytes_in
                try:
                    async with asyncio.timeout(2 * SCALE):
                        if until is None:
                            await raw.writer.drain()
                            return True
                        while conn.transport is not None and conn.bytes_in < until:
                            sample()
                            await asyncio.sleep(0.05)
                        return True
                except TimeoutError:
                    if conn.bytes_in == before:
                        return False
            return False

        try:
            async with asyncio.timeout(60 * SCALE):
                for _ in range(batches):
                    if conn.transport is None:
                        break
                    data = _flood(kind, batch, next_id)
                    next_id += 2 * batch
                    raw.send(data)
                    sent += len(data)
                    if not await relay_keeps_reading():
                        break
                    sample()
                # Let the relay work through what it was sent (it reads slower than we write).
                await relay_keeps_reading(until=sent)
                sample()
        except ConnectionError:
            pass
        finally:
            raw.writer.transport.abort()
        print(f"\n{kind} flood: sent {sent / 2**20:.1f} MiB, relay buffered {peak / 2**20:.1f} MiB")
        assert peak <= 4 * 2**20, f"relay buffered {peak / 2**20:.1f} MiB of unread replies"
        await st.legit_still_works()


# --------------------------------------------------------------------------- all at once


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
async def test_all_attacks_at_once_leave_only_the_legitimate_session(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "HANDSHAKE_TIMEOUT", 0.5)
    async with stage(tmp_path, mode, lease_grace=0) as st:

        async def garbage() -> None:
            raw = await Raw.connect(st)
            raw.send(os.urandom(4096))
            await raw.until_closed()

        async def oversized() -> None:
            raw = await Raw.connect(st)
            await raw.handshake()
            raw.send(encode_header(FrameType.DATA, 1, 2**31))
            frames, _ = await raw.until_closed()
            assert goaway_codes(frames) == ["frame_too_large"]

        async def unknown_stream() -> None:
            raw = await Raw.connect(st)
            await raw.handshake()
            raw.send(encode_frame(FrameType.DATA, 999, b"boo"))
            frames, _ = await raw.until_closed()
            assert goaway_codes(frames) == ["unknown_stream"]

        async def unauthenticated_open() -> None:
            raw = await Raw.connect(st)
            raw.send(hs.PREFACE + hello_frame() + encode_frame(FrameType.OPEN, 1, b"{}"))
            frames, _ = await raw.until_closed()
            assert goaway_codes(frames) == ["bad_frame"]

        async def silent() -> None:
            raw = await Raw.connect(st)
            await raw.until_closed()

        async def legit_traffic() -> None:
            for _ in range(5):
                await st.legit_still_works()

        attacks = [garbage, oversized, unknown_stream, unauthenticated_open, silent] * 4
        async with asyncio.timeout(30 * SCALE):
            await asyncio.gather(legit_traffic(), *(attack() for attack in attacks))
        await st.legit_still_works()
        async with asyncio.timeout(5 * SCALE):
            while st.relay.health()["streams"]:
                await asyncio.sleep(0.02)
        health = st.relay.health()
        assert {k: health[k] for k in ("status", "sessions", "tunnels", "streams")} == {
            "status": "ok",
            "sessions": 1,
            "tunnels": 1,
            "streams": 0,
        }, health
        assert len(st.events.named("session_closed")) == 8
        assert len(st.events.named("session_refused")) == 8
        assert all(e["reason"] for e in st.events.named("session_refused"))
