"""Load: many concurrent streams through one TLS session keep every byte intact, and one stalled
reader neither slows the others nor makes the relay or the agent buffer without bound."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from burrow.net.bridge import StreamBridge
from burrow.roles.agent import Agent
from burrow.roles.relay import Relay
from burrow.wire.session import DEFAULT_WINDOW
from helpers import SCALE, Events, agent_config, echo_server, relay_config

MiB = 1024 * 1024
CHUNK = 64 * 1024


@contextlib.asynccontextmanager
async def tls_tunnel(
    tmp: Path, local_port: int, **relay_options: Any
) -> AsyncIterator[tuple[Relay, Agent, tuple[str, int]]]:
    relay = Relay(relay_config(tmp, **relay_options), on_event=Events())
    await relay.start()
    try:
        agent = Agent(agent_config(relay, ("127.0.0.1", local_port)), on_event=Events())
        await agent.start()
        try:
            port = agent.tunnels[0].port
            assert port is not None
            yield relay, agent, ("127.0.0.1", port)
        finally:
            await agent.close()
    finally:
        await relay.close()


def stream_bytes(seed: int, size: int, chunk: int = CHUNK) -> tuple[list[int], str]:
    """The chunk sizes and SHA-256 of the ``size`` bytes ``chunks(seed, size)`` yields."""
    digest = hashlib.sha256()
    sizes = []
    rng = random.Random(seed)
    left = size
    while left:
        n = min(chunk, left)
        digest.update(rng.randbytes(n))
        sizes.append(n)
        left -= n
    return sizes, digest.hexdigest()


async def send_and_check(
    address: tuple[str, int], seed: int, size: int, chunk: int = CHUNK
) -> tuple[int, float]:
    """Send ``size`` seeded random bytes while reading the echo; compare SHA-256 both ways."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*address)
    sent = hashlib.sha256()

    async def write() -> None:
        rng = random.Random(seed)
        left = size
        while left:
            block = rng.randbytes(min(chunk, left))
            sent.update(block)
            writer.write(block)
            await writer.drain()
            left -= len(block)
        writer.write_eof()

    async def read() -> tuple[int, str]:
        received = hashlib.sha256()
        total = 0
        while data := await reader.read(256 * 1024):
            received.update(data)
            total += len(data)
        return total, received.hexdigest()

    try:
        _, (total, got) = await asyncio.gather(write(), read())
    finally:
        writer.close()
    assert total == size, f"stream {seed}: {total} bytes back of {size}"
    assert got == sent.hexdigest(), f"stream {seed}: SHA-256 differs"
    return total, time.monotonic() - started


# --------------------------------------------------------------------------- integrity


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_64_streams_of_8_mib_keep_integrity(tmp_path: Path) -> None:
    streams, size = 64, 8 * MiB
    async with echo_server() as echo_port, tls_tunnel(tmp_path, echo_port) as (relay, agent, pub):
        started = time.monotonic()
        results = await asyncio.gather(
            *(send_and_check(pub, seed, size) for seed in range(streams))
        )
        elapsed = time.monotonic() - started
        assert sum(total for total, _ in results) == streams * size
        mb = streams * size / MiB
        slowest = max(t for _, t in results)
        print(
            f"\n{streams} streams x {size // MiB} MiB echoed over TLS in {elapsed:.1f} s "
            f"({mb / elapsed:.1f} MiB/s each way); slowest stream {slowest:.1f} s"
        )
        # Every stream ended cleanly: nothing left open on either side.
        async with asyncio.timeout(10 * SCALE):
            while relay.health()["streams"] or agent._bridges:
                await asyncio.sleep(0.05)
        assert relay.health()["sessions"] == 1
        assert agent.conn is not None and agent.conn.session.open_streams == 0


# --------------------------------------------------------------------------- a stalled reader


class Blaster:
    """A local service: a client that sends b"B" gets ``size`` seeded bytes as fast as the
    socket takes them; any other first byte makes it an echo server."""

    def __init__(self, size: int, seed: int = 1234) -> None:
        self.size = size
        self.seed = seed
        self.written = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            mode = await reader.read(1)
            if mode == b"B":
                await self._blast(writer)
            elif mode:
                writer.write(mode)
                while data := await reader.read(256 * 1024):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _blast(self, writer: asyncio.StreamWriter) -> None:
        rng = random.Random(self.seed)
        left = self.size
        while left:
            block = rng.randbytes(min(CHUNK, left))
            writer.write(block)
            await writer.drain()
            self.written += len(block)
            left -= len(block)
        writer.write_eof()
        self.done.set()


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def echo_mode_stream(address: tuple[str, int], seed: int, size: int) -> float:
    """Like send_and_check, with the b"E" mode byte first (echoed back, then checked)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"E")
        assert await reader.readexactly(1) == b"E"
        sent = hashlib.sha256()
        received = hashlib.sha256()

        async def write() -> None:
            rng = random.Random(seed)
            left = size
            while left:
                block = rng.randbytes(min(CHUNK, left))
                sent.update(block)
                writer.write(block)
                await writer.drain()
                left -= len(block)
            writer.write_eof()

        async def read() -> int:
            total = 0
            while data := await reader.read(256 * 1024):
                received.update(data)
                total += len(data)
            return total

        _, total = await asyncio.gather(write(), read())
    finally:
        writer.close()
    assert total == size and received.hexdigest() == sent.hexdigest()
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_stalled_reader_does_not_stall_others_and_stays_bounded(tmp_path: Path) -> None:
    offered = 64 * MiB
    blaster = Blaster(offered)
    server = await asyncio.start_server(blaster.handle, "127.0.0.1", 0)
    local_port = server.sockets[0].getsockname()[1]
    try:
        async with tls_tunnel(tmp_path, local_port) as (relay, agent, pub):
            # Warm up (TLS, allocator) with the 8 streams alone: their time without a stall.
            alone_started = time.monotonic()
            await asyncio.gather(*(echo_mode_stream(pub, seed, 4 * MiB) for seed in range(8)))
            alone = time.monotonic() - alone_started
            baseline = rss()

            reader, writer = await asyncio.open_connection(*pub, limit=64 * 1024)
            writer.write(b"B")
            await writer.drain()
            client_port = writer.get_extra_info("sockname")[1]
            # The client reads nothing: wait until the blaster is held back.
            async with asyncio.timeout(30 * SCALE):
                last = -1
                while blaster.written != last or blaster.written == 0:
                    last = blaster.written
                    await asyncio.sleep(0.5)
            assert not blaster.done.is_set(), "the local service wrote everything: no stall"

            [tunnel] = relay.tunnels.values()
            [stalled] = [
                b
                for b in tunnel.visitors
                if b.transport is not None
                and b.transport.get_extra_info("peername")[1] == client_port
            ]

            def held() -> dict[str, int]:
                """Bytes burrow itself holds for the stalled stream, relay side + agent side."""
                assert agent.conn is not None and agent.conn.transport is not None
                [agent_bridge] = [b for b in agent._bridges if b.stream_id == stalled.stream_id]
                return {
                    "relay_visitor_write_buffer": _write_buffer(stalled),
                    "relay_session_decoder": next(iter(relay.sessions)).session.buffered,
                    "agent_pending": len(agent_bridge._pending or b""),
                    "agent_session_write_buffer": agent.conn.transport.get_write_buffer_size(),
                    "agent_credit_left": agent.conn.session.credit(stalled.stream_id),
                }

            bound = DEFAULT_WINDOW + 4 * MiB
            samples = [held()]
            stalled_rss = rss() - baseline

            # Meanwhile 8 other streams move 4 MiB each, through the same session.
            others_started = time.monotonic()
            others = asyncio.gather(*(echo_mode_stream(pub, seed, 4 * MiB) for seed in range(8)))
            while not others.done():
                samples.append(held())
                await asyncio.sleep(0.05)
            times = await others
            others_elapsed = time.monotonic() - others_started
            samples.append(held())
            peak_rss = rss() - baseline

            def total(sample: dict[str, int]) -> int:
                return sum(v for k, v in sample.items() if k != "agent_credit_left")

            worst = max(samples, key=total)
            print(
                f"\nstalled stream: local service wrote {blaster.written / MiB:.1f} MiB of "
                f"{offered // MiB}; burrow held at most {total(worst) / MiB:.2f} MiB {worst}; "
                f"RSS +{stalled_rss / MiB:.1f} MiB stalled, +{peak_rss / MiB:.1f} MiB with 8 "
                f"others; 8 x 4 MiB took {others_elapsed:.2f} s (slowest {max(times):.2f} s), "
                f"{alone:.2f} s without the stalled stream"
            )
            assert total(worst) < bound, worst
            # The stream's credit is spent: the agent stops reading the local service.
            assert samples[-1]["agent_credit_left"] < DEFAULT_WINDOW
            assert not blaster.done.is_set()
            assert blaster.written < offered / 2
            assert stalled_rss < 64 * MiB
            assert peak_rss < 64 * MiB
            assert others_elapsed < max(5 * alone, alone + 5) * SCALE

            # Resume reading: everything arrives, complete and in order.
            _, expected = stream_bytes(blaster.seed, offered)
            got = hashlib.sha256()
            count = 0
            async with asyncio.timeout(120 * SCALE):
                while data := await reader.read(256 * 1024):
                    got.update(data)
                    count += len(data)
            writer.close()
            assert count == offered
            assert got.hexdigest() == expected
            assert blaster.done.is_set()
    finally:
        server.close()


class Sink:
    """A local service that reads nothing until ``release`` is set, then reads everything."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.digest = hashlib.sha256()
        self.received = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.release.wait()
            while data := await reader.read(256 * 1024):
                self.digest.update(data)
                self.received += len(data)
            self.done.set()
        finally:
            writer.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_stalled_local_service_holds_back_the_visitor(tmp_path: Path) -> None:
    """The other direction: the local service reads nothing while a visitor writes 64 MiB.
    The relay stops reading the visitor once the stream's credit is spent, and neither end
    holds more than about one window for the stream."""
    offered = 64 * MiB
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0, limit=64 * 1024)
    local_port = server.sockets[0].getsockname()[1]
    try:
        async with tls_tunnel(tmp_path, local_port) as (relay, agent, pub):
            reader, writer = await asyncio.open_connection(*pub)
            sizes, expected = stream_bytes(4321, offered)
            written = 0
            rng = random.Random(4321)

            async def write_all() -> None:
                nonlocal written
                for size in sizes:
                    writer.write(rng.randbytes(size))
                    await writer.drain()
                    written += size
                writer.write_eof()

            writing = asyncio.create_task(write_all())
            try:
                async with asyncio.timeout(30 * SCALE):
                    last = -1
                    while written != last:
                        last = written
                        await asyncio.sleep(0.5)
                assert not writing.done(), "the visitor wrote everything: nothing held it back"
                [tunnel] = relay.tunnels.values()
                [relay_bridge] = tunnel.visitors
                [agent_bridge] = agent._bridges
                assert agent.conn is not None and agent.conn.transport is not None
                held = {
                    "agent_local_write_buffer": _write_buffer(agent_bridge),
                    "relay_pending": len(relay_bridge._pending or b""),
                    "relay_session_write_buffer": next(
                        iter(relay.sessions)
                    ).transport.get_write_buffer_size(),  # type: ignore[union-attr]
                    "agent_session_decoder": agent.conn.session.buffered,
                }
                print(
                    f"\nstalled local service: visitor got {written / MiB:.1f} MiB of "
                    f"{offered // MiB} out; burrow held {sum(held.values()) / MiB:.2f} MiB {held}"
                )
                assert sum(held.values()) < DEFAULT_WINDOW + 4 * MiB, held
                assert written < offered / 2
                assert relay.tunnels and relay.health()["sessions"] == 1

                # Release the service: the rest flows, complete and in order.
                sink.release.set()
                async with asyncio.timeout(120 * SCALE):
                    await writing
                    await sink.done.wait()
                    assert await reader.read() == b""  # the service closed: EOF back
                assert sink.received == offered
                assert sink.digest.hexdigest() == expected
            finally:
                writing.cancel()
                writer.close()
    finally:
        server.close()


def _write_buffer(bridge: StreamBridge) -> int:
    return bridge.transport.get_write_buffer_size() if bridge.transport is not None else 0
