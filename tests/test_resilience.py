"""Resilience: agents that start before their relay, relays that restart, agents that restart
with the same identity (port leases), dead peers found by heartbeats, and reconnect backoff.

rathole's scenario: an echo and a ping-pong service behind one agent, hit through the relay
before and after each restart, several hitters at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from burrow.errors import TunnelError
from burrow.net.tls import TrustPolicy, load_or_create_relay_cert
from burrow.roles import client as agent_module
from burrow.roles.agent import Agent, AgentConfig, TcpTunnelSpec
from burrow.roles.relay import Relay
from helpers import SCALE, Events, echo_server, free_port, relay_config

ROUNDS = 100


# --------------------------------------------------------------------------- local services


async def _pingpong_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                data = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                break
            if data != b"ping":
                break
            writer.write(b"pong")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def pingpong_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(_pingpong_handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# --------------------------------------------------------------------------- hitters


async def echo_hitter(address: tuple[str, int], rounds: int = ROUNDS) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        async with asyncio.timeout(30 * SCALE):
            for _ in range(rounds):
                payload = os.urandom(1024)
                writer.write(payload)
                await writer.drain()
                assert await reader.readexactly(len(payload)) == payload
    finally:
        writer.close()


async def pingpong_hitter(address: tuple[str, int], rounds: int = ROUNDS) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        async with asyncio.timeout(30 * SCALE):
            for _ in range(rounds):
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"pong"
    finally:
        writer.close()


async def hit_until_ok(hitter: Any, address: tuple[str, int], timeout: float = 10.0) -> None:
    """Run ``hitter`` once the public port accepts streams again (the agent may still be
    re-registering when the test gets there); bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout * SCALE
    while True:
        try:
            await hitter(address, rounds=1)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        break
    await hitter(address)


# --------------------------------------------------------------------------- fixtures


@contextlib.asynccontextmanager
async def started_relay(
    tmp: Path, events: Events | None = None, **options: Any
) -> AsyncIterator[Relay]:
    relay = Relay(relay_config(tmp, **options), on_event=events)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


@contextlib.asynccontextmanager
async def services() -> AsyncIterator[tuple[int, int]]:
    async with echo_server() as echo_port, pingpong_server() as pingpong_port:
        yield echo_port, pingpong_port


def two_tunnels(echo_port: int, pingpong_port: int) -> list[TcpTunnelSpec]:
    return [
        TcpTunnelSpec(local=("127.0.0.1", echo_port), name="echo"),
        TcpTunnelSpec(local=("127.0.0.1", pingpong_port), name="pingpong"),
    ]


def publics(agent: Agent) -> tuple[tuple[str, int], tuple[str, int]]:
    ports = [t.port for t in agent.tunnels]
    assert all(p is not None for p in ports)
    return ("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])  # type: ignore[return-value]


async def four_hitters(echo: tuple[str, int], pingpong: tuple[str, int]) -> None:
    async with asyncio.timeout(60 * SCALE):
        await asyncio.gather(
            echo_hitter(echo),
            echo_hitter(echo),
            pingpong_hitter(pingpong),
            pingpong_hitter(pingpong),
        )


async def close_quietly(agent: Agent) -> None:
    async with asyncio.timeout(10 * SCALE):
        await agent.close()


# --------------------------------------------------------------------------- agent before relay


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
async def test_agent_started_before_relay(tmp_path: Path, tls: bool) -> None:
    control = free_port()
    state_dir = tmp_path / "relay-state"
    trust = None
    if tls:
        # The relay reuses the certificate in its state dir, so its fingerprint is known now.
        trust = TrustPolicy(fingerprint=load_or_create_relay_cert(state_dir).fingerprint)
    agent_events = Events()
    async with services() as (echo_port, pingpong_port):
        agent = Agent(
            AgentConfig(
                relay=("127.0.0.1", control),
                trust=trust,
                tunnels=two_tunnels(echo_port, pingpong_port),
                connect_timeout=10,
            ),
            on_event=agent_events,
        )
        starting = asyncio.create_task(agent.start())
        try:
            await asyncio.sleep(1.0)
            assert not starting.done(), "the agent gave up before the relay started"
            assert agent_events.named("reconnecting"), "the agent did not retry"
            async with started_relay(tmp_path, listen_port=control, insecure=not tls) as relay:
                if tls:
                    assert trust is not None and relay.fingerprint == trust.fingerprint
                async with asyncio.timeout(15 * SCALE):
                    await starting
                await agent_events.wait_for("tunnel_ready", 2)
                echo, pingpong = publics(agent)
                await echo_hitter(echo)
                await pingpong_hitter(pingpong)
                await four_hitters(echo, pingpong)
                await close_quietly(agent)
        finally:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            await close_quietly(agent)


async def test_agent_gives_up_after_connect_timeout(tmp_path: Path) -> None:
    """The other side of the coin: with no relay at all, start() fails within its budget."""
    from burrow.errors import ConnectError

    agent = Agent(
        AgentConfig(
            relay=("127.0.0.1", free_port()),
            tunnels=[TcpTunnelSpec(local=("127.0.0.1", 9))],
            connect_timeout=1.0,
        )
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectError, match="gave up"):
        async with asyncio.timeout(10 * SCALE):
            await agent.start()
    assert loop.time() - started < 5 * SCALE


# --------------------------------------------------------------------------- relay restart


@pytest.mark.timeout(90)
async def test_relay_restart_agent_reconnects_same_port(tmp_path: Path) -> None:
    control = free_port()
    state_dir = tmp_path / "relay-state"
    fingerprint = load_or_create_relay_cert(state_dir).fingerprint
    agent_events = Events()
    relay_options = {"listen_port": control, "heartbeat": 0.2, "lease_grace": 30.0}
    async with services() as (echo_port, pingpong_port):
        agent = Agent(
            AgentConfig(
                relay=("127.0.0.1", control),
                trust=TrustPolicy(fingerprint=fingerprint),
                tunnels=two_tunnels(echo_port, pingpong_port),
                state_dir=tmp_path / "agent-state",
            ),
            on_event=agent_events,
        )
        try:
            async with started_relay(tmp_path, **relay_options):
                await agent.start()
                echo, pingpong = publics(agent)
                await echo_hitter(echo)
                await pingpong_hitter(pingpong)
            # The relay is gone: the agent notices and retries.
            await agent_events.wait_for("session_lost", 1)
            for restart in (1, 2):
                relay_events = Events()
                async with started_relay(tmp_path, relay_events, **relay_options) as relay:
                    assert relay.fingerprint == fingerprint
                    # Two tunnels per registration: the restart brings tunnel_ready 3 and 4.
                    await agent_events.wait_for("tunnel_ready", 2 + 2 * restart, timeout=20)
                    assert publics(agent) == (echo, pingpong), "the public ports changed"
                    assert sorted(relay.tunnels) == sorted([echo[1], pingpong[1]])
                    await hit_until_ok(echo_hitter, echo)
                    await hit_until_ok(pingpong_hitter, pingpong)
                    await four_hitters(echo, pingpong)
                    assert relay.health()["sessions"] == 1
                    assert len(relay_events.named("session_opened")) == 1
                await agent_events.wait_for("session_lost", 1 + restart)
            ports_file = tmp_path / "agent-state" / "ports.json"
            assert str(echo[1]) in ports_file.read_text()
            assert agent.failed is not None and not agent.failed.done()
        finally:
            await close_quietly(agent)


# --------------------------------------------------------------------------- leases


@pytest.mark.timeout(60)
async def test_agent_restart_same_identity_keeps_port(tmp_path: Path) -> None:
    relay_events = Events()
    identity = Ed25519PrivateKey.generate()
    async with (
        services() as (echo_port, pingpong_port),
        started_relay(tmp_path, relay_events, lease_grace=30.0) as relay,
    ):
        assert relay.control_address is not None

        def config(key: Ed25519PrivateKey, **extra: Any) -> AgentConfig:
            return AgentConfig(
                relay=relay.control_address,  # type: ignore[arg-type]
                trust=TrustPolicy(fingerprint=relay.fingerprint),
                tunnels=extra.pop("tunnels", None) or two_tunnels(echo_port, pingpong_port),
                identity_key=key,
                **extra,
            )

        first = Agent(config(identity, state_dir=tmp_path / "agent-state"))
        await first.start()
        echo, pingpong = publics(first)
        await echo_hitter(echo)
        await close_quietly(first)
        await relay_events.wait_for("session_closed", 1)
        # Within the grace the tunnel is held: the port stays bound but refuses visitors.
        assert echo[1] in relay.tunnels and pingpong[1] in relay.tunnels

        # Another identity asking for that very port during the grace is refused.
        intruder = Agent(
            config(
                Ed25519PrivateKey.generate(),
                tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port), port=echo[1], name="echo")],
            )
        )
        with pytest.raises(TunnelError) as refused:
            await intruder.start()
        assert refused.value.code == "port_in_use"
        assert relay_events.named("tunnel_refused")[-1]["code"] == "port_in_use"
        await close_quietly(intruder)

        # The same identity (and state dir) gets both ports back.
        second = Agent(config(identity, state_dir=tmp_path / "agent-state"))
        try:
            await second.start()
            assert publics(second) == (echo, pingpong)
            await four_hitters(echo, pingpong)
        finally:
            await close_quietly(second)
        await relay_events.wait_for("session_closed", 3)

        # The same identity without its state dir still gets them (the lease is by identity).
        third = Agent(config(identity))
        try:
            await third.start()
            assert publics(third) == (echo, pingpong)
            await echo_hitter(echo)
        finally:
            await close_quietly(third)


@pytest.mark.timeout(60)
async def test_lease_expires_after_grace(tmp_path: Path) -> None:
    relay_events = Events()
    async with (
        echo_server() as echo_port,
        started_relay(tmp_path, relay_events, lease_grace=0.5) as relay,
    ):
        assert relay.control_address is not None

        def config(**extra: Any) -> AgentConfig:
            return AgentConfig(
                relay=relay.control_address,  # type: ignore[arg-type]
                trust=TrustPolicy(fingerprint=relay.fingerprint),
                identity_key=Ed25519PrivateKey.generate(),
                **extra,
            )

        owner = Agent(config(tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port))]))
        await owner.start()
        port = owner.tunnels[0].port
        assert port is not None
        await echo_hitter(("127.0.0.1", port), rounds=5)
        await close_quietly(owner)
        await relay_events.wait_for("session_closed", 1)
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        expired = await relay_events.wait_for("lease_expired", 1, timeout=5)
        assert expired["port"] == port
        assert loop.time() - closed_at >= 0.4
        assert port not in relay.tunnels and relay.leases.get(port) is None

        # After the grace another identity may take the port.
        other = Agent(config(tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port), port=port)]))
        try:
            await other.start()
            assert other.tunnels[0].port == port
            await echo_hitter(("127.0.0.1", port))
        finally:
            await close_quietly(other)


async def test_visitor_during_grace_is_closed_cleanly(tmp_path: Path) -> None:
    """While the agent is away its port stays bound, and a visitor is closed at once."""
    relay_events = Events()
    async with (
        echo_server() as echo_port,
        started_relay(tmp_path, relay_events, lease_grace=30.0) as relay,
    ):
        assert relay.control_address is not None
        agent = Agent(
            AgentConfig(
                relay=relay.control_address,
                trust=TrustPolicy(fingerprint=relay.fingerprint),
                tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port))],
            )
        )
        await agent.start()
        port = agent.tunnels[0].port
        assert port is not None
        await close_quietly(agent)
        await relay_events.wait_for("session_closed", 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(5 * SCALE):
                assert await reader.read(100) == b""
        finally:
            writer.close()


# --------------------------------------------------------------------------- dead peers


def _freeze(conn: Any) -> None:
    """Make one end of a session go silent: it reads nothing and sends no more heartbeats."""
    assert conn.transport is not None
    conn.transport.pause_reading()
    task = conn._heartbeat_task
    assert task is not None
    task.cancel()


@pytest.mark.timeout(60)
async def test_relay_detects_frozen_agent(tmp_path: Path) -> None:
    relay_events = Events()
    agent_events = Events()
    heartbeat = 0.2
    async with (
        echo_server() as echo_port,
        started_relay(tmp_path, relay_events, heartbeat=heartbeat, lease_grace=30.0) as relay,
    ):
        assert relay.control_address is not None
        agent = Agent(
            AgentConfig(
                relay=relay.control_address,
                trust=TrustPolicy(fingerprint=relay.fingerprint),
                tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port))],
            ),
            on_event=agent_events,
        )
        await agent.start()
        try:
            assert agent.conn is not None
            assert agent.conn.session.heartbeat == heartbeat  # the relay's interval is adopted
            port = agent.tunnels[0].port
            assert port is not None
            await echo_hitter(("127.0.0.1", port), rounds=5)
            # A few heartbeats go by without trouble.
            await asyncio.sleep(heartbeat * 5)
            assert not relay_events.named("session_closed")
            loop = asyncio.get_running_loop()
            _freeze(agent.conn)
            frozen_at = loop.time()
            closed = await relay_events.wait_for("session_closed", 1, timeout=5)
            elapsed = loop.time() - frozen_at
            assert "heartbeat" in closed["reason"], closed
            # Silence counts from the last frame received, a moment before the freeze.
            assert heartbeat * 2 <= elapsed <= heartbeat * 4 + 1.0 * SCALE, elapsed
            assert relay.health()["sessions"] == 0
        finally:
            await close_quietly(agent)


@pytest.mark.timeout(60)
async def test_agent_detects_frozen_relay_and_reconnects(tmp_path: Path) -> None:
    relay_events = Events()
    agent_events = Events()
    heartbeat = 0.2
    async with (
        echo_server() as echo_port,
        started_relay(tmp_path, relay_events, heartbeat=heartbeat, lease_grace=30.0) as relay,
    ):
        assert relay.control_address is not None
        agent = Agent(
            AgentConfig(
                relay=relay.control_address,
                trust=TrustPolicy(fingerprint=relay.fingerprint),
                tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo_port))],
            ),
            on_event=agent_events,
        )
        await agent.start()
        try:
            port = agent.tunnels[0].port
            assert port is not None
            await echo_hitter(("127.0.0.1", port), rounds=5)
            [relay_side] = relay.sessions
            first_conn = agent.conn
            loop = asyncio.get_running_loop()
            _freeze(relay_side)
            frozen_at = loop.time()
            lost = await agent_events.wait_for("session_lost", 1, timeout=5)
            elapsed = loop.time() - frozen_at
            assert "heartbeat" in lost["reason"], lost
            assert elapsed <= heartbeat * 4 + 1.0 * SCALE, elapsed
            # It reconnects by itself, registers again and keeps its port.
            await agent_events.wait_for("tunnel_ready", 2, timeout=15)
            assert agent.conn is not first_conn
            assert agent.tunnels[0].port == port
            await hit_until_ok(echo_hitter, ("127.0.0.1", port))
            moved_to = relay.tunnels[port].conn
            assert agent.conn is not None and moved_to is not None
            assert moved_to.session.session_id == agent.conn.session.session_id
            # Its own takeover of the tunnel is not mistaken for another agent's.
            assert agent.failed is not None and not agent.failed.done()
        finally:
            await close_quietly(agent)


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    base, cap = agent_module.BACKOFF_BASE, agent_module.BACKOFF_CAP
    assert cap == 30.0
    for attempt in range(1, 8):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        samples = [agent_module.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (attempt, samples)
        assert len(set(samples)) > 150, "no jitter"
    medians = [statistics.median(agent_module.backoff(a) for _ in range(200)) for a in range(1, 7)]
    for smaller, larger in itertools.pairwise(medians):
        assert larger > smaller * 1.5, medians
    for attempt in (10, 16, 17, 50, 1000, 10**6):
        samples = [agent_module.backoff(attempt) for _ in range(200)]
        assert max(samples) <= 30.0
        assert min(samples) >= 15.0  # still jittered in [cap/2, cap]
        assert len(set(samples)) > 150
