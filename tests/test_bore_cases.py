"""bore's end-to-end cases (tests/e2e_test.rs), re-expressed against the in-process Relay and
Agent with TLS on and the relay's fingerprint pinned. Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from burrow.errors import AuthError, ConfigError, ConnectError, TunnelError
from burrow.roles.agent import Agent
from burrow.roles.relay import Relay, RelayConfig
from helpers import (
    SCALE,
    Events,
    agent_config,
    echo_server,
    free_port,
    running_relay,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def relay_with_events(tmp: Path, **overrides: Any) -> AsyncIterator[tuple[Relay, Events]]:
    """A relay whose events are recorded (running_relay with an Events sink)."""
    events = Events()
    async with running_relay(tmp, on_event=events, **overrides) as relay:
        yield relay, events


@contextlib.asynccontextmanager
async def started_agent(
    relay: Relay, local_port: int, events: Events | None = None, **overrides: Any
) -> AsyncIterator[Agent]:
    agent = Agent(agent_config(relay, ("127.0.0.1", local_port), **overrides), on_event=events)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()


@contextlib.asynccontextmanager
async def local_service(handler: Handler, port: int = 0) -> AsyncIterator[asyncio.Server]:
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def public_address(agent: Agent) -> tuple[str, int]:
    port = agent.tunnels[0].port
    assert port is not None
    return "127.0.0.1", port


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def free_port_in(low: int, high: int) -> int:
    """A port in [low, high] nothing listens on (bounded number of tries)."""
    for _ in range(100):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def timeout(seconds: float) -> Any:
    return asyncio.timeout(seconds * SCALE)


# --- 1. basic proxy ------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "abc"], ids=["no-secret", "empty", "abc"])
async def test_basic_proxy(tmp_path: Path, secret: str | None) -> None:
    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert await reader.readexactly(11) == b"hello world"
            writer.write(b"I can send a message too!")
            await writer.drain()
        finally:
            writer.close()

    agent_events = Events()
    async with (
        relay_with_events(tmp_path, secret=secret) as (relay, _),
        local_service(service) as server,
    ):
        local_port = server.sockets[0].getsockname()[1]
        async with started_agent(relay, local_port, agent_events) as agent:
            public = public_address(agent)

            async with timeout(5):
                reader, writer = await asyncio.open_connection(*public)
                writer.write(b"hello world")
                await writer.drain()
                assert await reader.readexactly(25) == b"I can send a message too!"
                assert await reader.read(100) == b""
                await closed(writer)

            # No local service: the visitor sees a clean close (EOF, not a reset).
            server.close()
            await server.wait_closed()
            async with timeout(5):
                reader, writer = await asyncio.open_connection(*public)
                assert await reader.read(100) == b""
                await closed(writer)
            warning = await agent_events.wait_for("warning", timeout=5)
            assert f"127.0.0.1:{local_port}" in warning["message"]
            assert "refused" in warning["message"]

            # The tunnel stayed up: a local service back on the same port is reached again.
            async with local_service(service, local_port), timeout(5):
                reader, writer = await asyncio.open_connection(*public)
                writer.write(b"hello world")
                await writer.drain()
                assert await reader.readexactly(25) == b"I can send a message too!"
                assert await reader.read(100) == b""
                await closed(writer)


# --- 2. mismatched secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("relay_secret", "agent_secret"),
    [(None, "my secret"), ("my secret", None), ("a", "b")],
    ids=["relay-none", "agent-none", "different"],
)
async def test_mismatched_secret(
    tmp_path: Path, relay_secret: str | None, agent_secret: str | None
) -> None:
    async with relay_with_events(tmp_path, secret=relay_secret) as (relay, events):
        agent = Agent(agent_config(relay, ("127.0.0.1", 9), secret=agent_secret))
        started = time.monotonic()
        try:
            with pytest.raises(AuthError):
                async with timeout(5):
                    await agent.start()
        finally:
            await agent.close()
        assert time.monotonic() - started < 2 * SCALE
        refused = await events.wait_for("session_refused", timeout=5)
        assert refused["reason"]
        assert not events.named("session_opened")


# --- 3. invalid addresses ------------------------------------------------------------------


async def test_relay_name_does_not_resolve(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        config = agent_config(relay, ("127.0.0.1", 9), connect_timeout=2)
    config.relay = ("nonexistent.invalid", 7835)
    agent = Agent(config)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError, match="does not resolve"):
            async with timeout(10):
                await agent.start()
    finally:
        await agent.close()
    assert time.monotonic() - started < 5 * SCALE


def test_malformed_relay_address_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "burrow.cli", "tcp", "5432", "--to", "malformed !$uri$%"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("burrow: error:")
    assert "Traceback" not in result.stderr + result.stdout


async def test_nothing_listening(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:
        config = agent_config(relay, ("127.0.0.1", 9), connect_timeout=2)
    # The relay is closed now: its control port refuses connections.
    agent = Agent(config)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError, match="refused"):
            async with timeout(10):
                await agent.start()
    finally:
        await agent.close()
    assert time.monotonic() - started < 4 * SCALE


async def test_listener_that_never_speaks_tls(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, then say nothing

    async with running_relay(tmp_path) as relay:
        template = agent_config(relay, ("127.0.0.1", 9), connect_timeout=2)
    async with local_service(silent) as server:
        template.relay = ("127.0.0.1", server.sockets[0].getsockname()[1])
        agent = Agent(template)
        started = time.monotonic()
        try:
            with pytest.raises(ConnectError) as failed:
                async with timeout(10):
                    await agent.start()
        finally:
            await agent.close()
            for writer in held:
                writer.close()
        assert held, "the agent never connected to the silent listener"
        assert time.monotonic() - started < 5 * SCALE
        assert "did not answer" in str(failed.value) or "handshake" in str(failed.value)


# --- 4. very long frame --------------------------------------------------------------------


@pytest.mark.parametrize("insecure", [False, True], ids=["tls", "insecure"])
async def test_very_long_frame(tmp_path: Path, insecure: bool) -> None:
    async with running_relay(tmp_path, insecure=insecure) as relay:
        assert relay.control_address is not None
        reader, writer = await asyncio.open_connection(*relay.control_address)
        sent = 0
        failure: BaseException | None = None
        try:
            async with timeout(10):
                for _ in range(10):
                    writer.write(b"*" * 100_000)
                    await writer.drain()
                    sent += 100_000
                    await asyncio.sleep(0.01)
                # Everything went into socket buffers: the relay must still hang up.
                await reader.read()
                failure = AssertionError(f"sent all {sent} bytes and read EOF without an error")
        except (ConnectionError, OSError) as exc:
            failure = exc
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        assert isinstance(failure, (ConnectionError, OSError)), failure
        assert sent < 1_000_000

        # The relay shrugged it off and still serves tunnels.
        async with (
            echo_server() as echo_port,
            started_agent(relay, echo_port) as agent,
            timeout(5),
        ):
            reader, writer = await asyncio.open_connection(*public_address(agent))
            writer.write(b"still alive")
            await writer.drain()
            assert await reader.readexactly(11) == b"still alive"
            await closed(writer)


# --- 5. empty port range -------------------------------------------------------------------


def test_empty_port_range() -> None:
    config = RelayConfig(listen_host="127.0.0.1", listen_port=0, min_port=5000, max_port=3000)
    with pytest.raises(ConfigError, match="port range is empty"):
        config.validate()
    with pytest.raises(ConfigError, match="port range is empty"):
        Relay(config)


def test_empty_port_range_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "burrow.cli",
            "relay",
            "--listen",
            f"127.0.0.1:{free_port()}",  # the CLI refuses port 0 (see test_cli.py)
            "--state-dir",
            str(tmp_path / "relay"),
            "--min-port",
            "5000",
            "--max-port",
            "3000",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("burrow: error:")
    assert "port range is empty" in lines[0]
    assert "Traceback" not in result.stderr


# --- 6. half-close -------------------------------------------------------------------------


async def test_half_closed_visitor(tmp_path: Path) -> None:
    """The visitor shuts down its write side first; the other direction keeps flowing."""
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read()  # to EOF
            seen.set_result(data)
            writer.write(b"hello from the other side!")
            await writer.drain()
        except Exception as exc:
            if not seen.done():
                seen.set_exception(exc)
        finally:
            writer.close()

    async with (
        running_relay(tmp_path) as relay,
        local_service(service) as server,
        started_agent(relay, server.sockets[0].getsockname()[1]) as agent,
        timeout(10),
    ):
        reader, writer = await asyncio.open_connection(*public_address(agent))
        writer.write(b"message before shutdown")
        await writer.drain()
        writer.write_eof()
        assert await seen == b"message before shutdown"
        assert await reader.read() == b"hello from the other side!"
        assert await reader.read(10) == b""
        await closed(writer)


async def test_half_closed_local_service(tmp_path: Path) -> None:
    """The mirror image: the local service shuts down its write side first."""
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"message before shutdown")
            await writer.drain()
            writer.write_eof()
            seen.set_result(await reader.read())  # to EOF
        except Exception as exc:
            if not seen.done():
                seen.set_exception(exc)
        finally:
            writer.close()

    async with (
        running_relay(tmp_path) as relay,
        local_service(service) as server,
        started_agent(relay, server.sockets[0].getsockname()[1]) as agent,
        timeout(10),
    ):
        reader, writer = await asyncio.open_connection(*public_address(agent))
        assert await reader.read() == b"message before shutdown"  # to EOF
        writer.write(b"hello from the other side!")
        await writer.drain()
        writer.write_eof()
        assert await seen == b"hello from the other side!"
        assert await reader.read(10) == b""
        await closed(writer)


# --- 7. port requests ----------------------------------------------------------------------


async def test_port_requests(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay, echo_server() as echo_port:
        config = relay.config
        want = free_port_in(config.min_port, min(config.max_port, 32000))
        async with started_agent(relay, echo_port, port=want) as first:
            assert first.tunnels[0].port == want
            async with timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", want)
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"ping"
                await closed(writer)

            # Another agent (a fresh identity) asking for the same port is refused.
            second = Agent(agent_config(relay, ("127.0.0.1", echo_port), port=want))
            assert second.identity is not first.identity
            try:
                with pytest.raises(TunnelError) as refused:
                    async with timeout(5):
                        await second.start()
            finally:
                await second.close()
            assert refused.value.code == "port_in_use"
            assert first.tunnels[0].port == want

        outside = config.max_port + 1
        third = Agent(agent_config(relay, ("127.0.0.1", echo_port), port=outside))
        try:
            with pytest.raises(TunnelError, match="outside the relay's range") as refused:
                async with timeout(5):
                    await third.start()
        finally:
            await third.close()
        assert refused.value.code == "port_out_of_range"
