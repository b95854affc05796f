"""Shared pieces for burrow's tests: relays and agents in-process, local servers, a loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from burrow.net.tls import TrustPolicy
from burrow.node import Relay, RelayConfig
from burrow.roles.agent import Agent, AgentConfig, TcpTunnelSpec

T = TypeVar("T")

#: One timeout unit, scaled on slow machines with BURROW_TEST_SCALE (websockets' MS idea).
SCALE = float(os.environ.get("BURROW_TEST_SCALE", "1"))


class Events(list[dict[str, Any]]):
    """An event sink that records and lets a test wait for an event by name."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def __call__(self, record: dict[str, Any]) -> None:
        self.append(record)
        self._changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self if e["event"] == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout * SCALE):
            while len(self.named(name)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.named(name)[count - 1]


def relay_config(tmp: Path, **overrides: Any) -> RelayConfig:
    options: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "state_dir": tmp / "relay-state",
        "min_port": 20000,
        "max_port": 40000,
    }
    options.update(overrides)
    return RelayConfig(**options)


def agent_config(relay: Relay, local: tuple[str, int], **overrides: Any) -> AgentConfig:
    assert relay.control_address is not None
    tunnel = overrides.pop("tunnel", None) or TcpTunnelSpec(
        local=local,
        port=overrides.pop("port", None),
        proxy_protocol=overrides.pop("proxy_protocol", None),
    )
    trust = None
    if not relay.config.insecure:
        trust = TrustPolicy(fingerprint=relay.fingerprint)
    options: dict[str, Any] = {
        "relay": relay.control_address,
        "secret": relay.config.secret,
        "trust": trust,
        "tunnels": [tunnel],
    }
    options.update(overrides)
    return AgentConfig(**options)


@contextlib.asynccontextmanager
async def running_relay(tmp: Path, **overrides: Any) -> AsyncIterator[Relay]:
    on_event = overrides.pop("on_event", None)
    relay = Relay(relay_config(tmp, **overrides), on_event=on_event)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


@contextlib.asynccontextmanager
async def tunnel(
    tmp: Path, local_port: int, relay_options: dict[str, Any] | None = None, **agent_options: Any
) -> AsyncIterator[tuple[Relay, Agent, tuple[str, int]]]:
    """A relay and an agent exposing 127.0.0.1:local_port; yields the public address."""
    async with running_relay(tmp, **(relay_options or {})) as relay:
        agent = Agent(agent_config(relay, ("127.0.0.1", local_port), **agent_options))
        await agent.start()
        try:
            port = agent.tunnels[0].port
            assert port is not None
            yield relay, agent, ("127.0.0.1", port)
        finally:
            await agent.close()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopThread:
    """An event loop in a background thread, for tests whose clients are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * SCALE)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def burrow_cli(
    *args: str, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    """Start the ``burrow`` CLI of this checkout as a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "burrow.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        **kwargs,
    )


_pending_lines: dict[int, list[bytes]] = {}


def read_event(proc: subprocess.Popen[str], name: str, timeout: float = 15.0) -> dict[str, Any]:
    """Read JSON lines from ``proc``'s stdout until the event ``name`` (bounded by ``timeout``).

    Reads the pipe's fd directly and keeps unconsumed lines per process, so a line that arrived
    together with an earlier one is never stranded in a buffer ``select()`` cannot see."""
    import json
    import select
    import time

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines = _pending_lines.setdefault(proc.pid, [b""])
    deadline = time.monotonic() + timeout * SCALE
    while True:
        while len(lines) > 1:
            line = lines.pop(0)
            event = json.loads(line)
            if event.get("event") == name:
                return dict(event)
            if event.get("event") == "error":
                raise AssertionError(f"error event before {name!r}: {event}")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"no {name!r} event within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process ended before {name!r}: {err.strip()}")
        parts = (lines.pop() + chunk).split(b"\n")
        lines.extend(parts)


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


Factory = Callable[..., tuple[str, int]]


def iter_chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
