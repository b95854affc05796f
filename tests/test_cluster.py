"""Several relay nodes sharing their leases in Redis (issue 14): any node answers for every
tunnel, a name is never held twice, a killed node's services come back through another node
while other transfers go on, and a Redis that goes away and comes back stops nothing that runs.

Three ``burrow relay`` processes on 127.0.0.1, .2 and .3 share Redis database 15 (emptied per
test); the Redis outage uses a throwaway ``redis-server`` on a free port, since the system
Redis is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from burrow.errors import TunnelError
from burrow.net.tls import TrustPolicy
from burrow.node import Relay
from burrow.roles.agent import Agent, AgentConfig, TcpTunnelSpec
from burrow.roles.client import ClientConfig, RelayClient
from burrow.roles.redis_registry import RedisRegistry
from burrow.tokens import DENY_FILE, TokenKey, mint, parse_token
from burrow.wire.messages import Register, to_message
from cluster_support import (
    REDIS_URL,
    SECRET,
    Download,
    Node,
    Proc,
    agent_up,
    cluster,
    connector,
    download_server,
    echo_server,
    echo_through,
    eventually,
    flush_redis,
    get_through,
    http_server,
)
from helpers import SCALE, Events, free_port, relay_config

pytest.importorskip("redis")

TUNNELS = """
[[tunnel]]
kind = "tcp"
local = "127.0.0.1:{echo}"
name = "echo"

[[tunnel]]
kind = "http"
local = "127.0.0.1:{web}"
name = "web"

[[tunnel]]
kind = "private"
local = "127.0.0.1:{echo}"
name = "db"
"""


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    flush_redis()
    with cluster(tmp_path) as running:
        yield running


def public_port(agent: Proc, count: int = 1) -> int:
    ready = agent.wait("tunnel_ready", count=count, kind="tcp")
    return int(ready["public"].rpartition(":")[2])


def registry_status() -> dict[str, object]:
    """``burrow relay status --registry ... --json``."""
    from burrow.cli import main

    result = CliRunner().invoke(main, ["relay", "status", "--registry", REDIS_URL, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_any_node_answers_for_an_agent_on_node_1(nodes: list[Node], tmp_path: Path) -> None:
    n1, n2, n3 = nodes
    body = os.urandom(300 * 1024)
    with echo_server() as echo, http_server(body) as web:
        agent = agent_up(tmp_path, nodes, TUNNELS.format(echo=echo, web=web))
        connectors: list[tuple[Proc, tuple[str, int]]] = []
        try:
            assert agent.wait("connected")["relay"] == n1.address
            port = public_port(agent)
            agent.wait("tunnel_ready", kind="http", name="web")
            agent.wait("tunnel_ready", kind="private", name="db")
            connectors += [connector(node, "db") for node in (n2, n3)]
            deadline = time.monotonic() + 10 * SCALE
            for node, (_, local) in zip((n2, n3), connectors, strict=True):
                node.wait("peer_port_open", port=port, node="n1")
                echo_through((node.host, port), 1024 * 1024)
                assert eventually(lambda n=node: get_through(n.http, "web"), deadline) == body
                echo_through(local, 1024 * 1024)
            # The agent's node carried each of them over its links: visitors came from n2, n3.
            report = registry_status()
            nodes_seen = {n["id"]: n for n in report["nodes"]}  # type: ignore[attr-defined]
            assert sorted(nodes_seen) == ["n1", "n2", "n3"]
            assert nodes_seen["n1"]["address"] == n1.address
            assert nodes_seen["n1"]["fingerprint"] == n1.fingerprint
            held = {x["key"]: x for x in report["leases"]}  # type: ignore[attr-defined]
            assert {held[k]["node"] for k in (f"port:{port}", "http:web", "svc:db")} == {"n1"}
            assert all(held[k]["state"] == "held" for k in held)
        finally:
            for proc, _ in connectors:
                proc.stop()
            agent.stop()


async def test_fifty_races_for_a_name_on_two_nodes_have_one_winner_each(
    nodes: list[Node],
) -> None:
    """Two agents (two identities) on two nodes ask for the same new name at the same time,
    fifty times: exactly one gets it, every time; the other is told it is in use."""
    clients = []
    for node in nodes[:2]:
        client = RelayClient(
            ClientConfig(
                relay=node.control,
                secret=SECRET,
                trust=TrustPolicy(fingerprint=node.fingerprint),
                identity_key=Ed25519PrivateKey.generate(),
            )
        )
        await client.start()
        clients.append(client)
    try:
        for race in range(50):
            ask = to_message(Register(kind="private", key="svc", name=f"race-{race}", exact=True))
            replies = await asyncio.gather(
                *(client.request(client.conn, dict(ask)) for client in clients)  # type: ignore[arg-type]
            )
            ops = sorted(reply["op"] for reply in replies)
            assert ops == ["error", "registered"], replies
            loser = next(reply for reply in replies if reply["op"] == "error")
            assert loser["code"] == "name_in_use", loser
    finally:
        for client in clients:
            await client.close()


@pytest.mark.timeout(120)
def test_a_killed_node_s_services_answer_through_the_others_and_other_transfers_go_on(
    nodes: list[Node], tmp_path: Path
) -> None:
    n1, n2, n3 = nodes
    body = os.urandom(200 * 1024)
    payload = os.urandom(16 * 1024 * 1024)
    with (
        echo_server() as echo,
        http_server(body) as web,
        download_server(payload) as files,
    ):
        # Another agent's service, held on node 2 and downloaded through node 3.
        other = Proc("tcp", str(files), "--to", n2.address, "--secret", SECRET, "--json")
        agent = agent_up(tmp_path, nodes, TUNNELS.format(echo=echo, web=web))
        connectors: list[tuple[Proc, tuple[str, int]]] = []
        try:
            files_port = public_port(other)
            port = public_port(agent)
            agent.wait("tunnel_ready", kind="private", name="db")
            n3.wait("peer_port_open", port=files_port, node="n2")
            for node in (n2, n3):
                node.wait("peer_port_open", port=port, node="n1")
            connectors += [connector(node, "db") for node in (n2, n3)]
            echo_through((n3.host, port))

            download = Download((n3.host, files_port), payload)
            thread = download.start()
            assert download.started.wait(30 * SCALE) and download.error is None

            n1.kill()
            killed = time.monotonic()
            deadline = killed + 10 * SCALE
            reconnected = agent.wait("connected", count=2, timeout=10)
            assert reconnected["relay"] == n2.address  # the next one in --to
            for node in (n2, n3):
                eventually(lambda n=node: echo_through((n.host, port)), deadline)
                assert eventually(lambda n=node: get_through(n.http, "web"), deadline) == body
            for _, local in connectors:
                eventually(lambda a=local: echo_through(a), deadline)
            assert time.monotonic() < deadline  # the services answered again within 10 s

            thread.join(60 * SCALE)
            assert download.error is None, download.error
            assert len(download.received) == len(payload)
            assert hashlib.sha256(download.received).digest() == hashlib.sha256(payload).digest()
            held = {x["key"]: x["node"] for x in registry_status()["leases"]}  # type: ignore[attr-defined]
            assert held[f"port:{port}"] == held["http:web"] == held["svc:db"] == "n2"
            assert held[f"port:{files_port}"] == "n2"
        finally:
            for proc, _ in connectors:
                proc.stop()
            agent.stop()
            other.stop()


# --- Redis going away ---------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(port: int, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A throwaway redis-server on ``port`` that keeps nothing on disk."""
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10 * SCALE
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        server.terminate()
        server.wait(10)


@contextlib.asynccontextmanager
async def node(tmp: Path, index: int, url: str, events: Events) -> AsyncIterator[Relay]:
    state = tmp / f"n{index}"
    if not (state / "token.key").exists():
        state.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "n1" / "token.key", state / "token.key")
    config = relay_config(
        tmp,
        listen_host=f"127.0.0.{index}",
        state_dir=state,
        secret=SECRET,
        node_id=f"n{index}",
        admin=(f"127.0.0.{index}", 0),
        min_port=43000,
        max_port=43999,
    )
    relay = Relay(
        config, on_event=events, registry=RedisRegistry(url, grace=30, node_id=f"n{index}")
    )
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


def tcp_agent(relay: Relay, local: int) -> Agent:
    return Agent(
        AgentConfig(
            relay=relay.control_address,  # type: ignore[arg-type]
            secret=SECRET,
            trust=TrustPolicy(fingerprint=relay.fingerprint),
            tunnels=[TcpTunnelSpec(local=("127.0.0.1", local))],
        )
    )


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = os.urandom(64 * 1024)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10 * SCALE):
        assert await reader.readexactly(len(data)) == data


async def echo_once(address: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        await round_trip(reader, writer)
    finally:
        writer.close()


@pytest.mark.timeout(90)
async def test_redis_away_for_a_while_stops_no_tunnel_and_refuses_new_ones_meanwhile(
    tmp_path: Path,
) -> None:
    import redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    TokenKey.create(tmp_path / "n1")
    a_events, b_events = Events(), Events()
    with redis_server(port, tmp_path) as server:
        async with (
            node(tmp_path, 1, url, a_events) as a,
            node(tmp_path, 2, url, b_events) as b,
            contextlib.AsyncExitStack() as stack,
        ):
            await a_events.wait_for("node_link_up")
            await b_events.wait_for("node_link_up")
            echo = await stack.enter_async_context(_echo_server())
            first = tcp_agent(a, echo)
            await first.start()
            stack.push_async_callback(first.close)
            public = first.tunnels[0].port
            assert public is not None
            await b_events.wait_for("peer_port_open")
            reader, writer = await asyncio.open_connection(b.config.listen_host, public)
            stack.callback(writer.close)
            await round_trip(reader, writer)

            server.terminate()
            server.wait(10)
            reason = (await a_events.wait_for("registry_unavailable"))["reason"]
            await b_events.wait_for("registry_unavailable")
            # Tunnels keep working from every node's mirror: the open connection, new ones.
            loop = asyncio.get_running_loop()
            outage = loop.time() + 2.0  # Redis stays away a while; traffic goes on meanwhile
            while loop.time() < outage:
                await round_trip(reader, writer)
            await echo_once((b.config.listen_host, public))
            await echo_once((a.config.listen_host, public))
            assert b.health()["status"] == "degraded"
            assert "burrow_registry_up 0.0" in _metrics(b)
            # A new registration is refused, saying why and what to do.
            second = tcp_agent(a, echo)
            with pytest.raises(TunnelError) as refused:
                await second.start()
            assert refused.value.code == "registry_unavailable"
            assert f"registry unavailable: {reason}; try again" in str(refused.value)
            await second.close()

            with redis_server(port, tmp_path):  # back, and empty: it kept nothing
                await a_events.wait_for("registry_available", timeout=15)
                await b_events.wait_for("registry_available", timeout=15)
                scraped = _metrics(b)
                assert "burrow_registry_up 1.0" in scraped
                assert 'burrow_node_link_up{node="n1"} 1.0' in scraped
                await round_trip(reader, writer)
                await echo_once((b.config.listen_host, public))
                third = tcp_agent(a, echo)
                await third.start()
                stack.push_async_callback(third.close)
                await b_events.wait_for("peer_port_open", count=2)
                await echo_once((b.config.listen_host, third.tunnels[0].port))  # type: ignore[arg-type]
                # Node a claimed its agent's port again in the new Redis.
                client = redis.Redis.from_url(url)
                try:
                    held = client.hgetall(f"burrow:lease:port:{public}")
                finally:
                    client.close()
                assert held[b"node"] == b"n1" and held[b"connected"] == b"1"
                # Node b never stopped serving the first port (it did not forget it meanwhile).
                opened = [e for e in b_events.named("peer_port_open") if e["port"] == public]
                assert len(opened) == 1 and public in b.tunnels


def _metrics(relay: Relay) -> str:
    assert relay.metrics is not None
    return relay.metrics.render().decode()


@contextlib.asynccontextmanager
async def _echo_server() -> AsyncIterator[int]:
    from helpers import echo_server as async_echo

    async with async_echo() as port:
        yield port


class _WhoAsks:
    """A private service that notes who the relay says opened each stream, then refuses it."""

    kind = "private"
    name = "who"
    key = "private:who"

    def __init__(self) -> None:
        self.peers: list[str | None] = []
        self.asked = asyncio.Event()

    def describe(self) -> dict[str, object]:
        return {}

    def registered(self, tunnel: object) -> None:
        pass

    def serve(self, stream: Any) -> None:
        self.peers.append(stream.opened.peer)
        stream.conn.reset(stream.stream_id, "refused", "noted")
        self.asked.set()


async def test_an_exit_and_the_connector_s_name_cross_a_node_link(tmp_path: Path) -> None:
    """A connector on node 2 reaches an exit on node 1's agent (the target travels with the
    stream), and the agent hears the connector's own name (its token's subject), not the
    node's."""
    from burrow.allowlist import AllowList
    from burrow.roles.agent import ExitSpec
    from burrow.roles.connector import Connector, ConnectorConfig
    from burrow.tokens import mint

    flush_redis()
    key, _ = TokenKey.create(tmp_path / "n1")
    events = [Events(), Events()]
    who = _WhoAsks()
    async with (
        _echo_server() as echo,
        node(tmp_path, 1, REDIS_URL, events[0]) as a,
        node(tmp_path, 2, REDIS_URL, events[1]) as b,
    ):
        await events[1].wait_for("node_link_up")
        agent = Agent(
            AgentConfig(
                relay=a.control_address,  # type: ignore[arg-type]
                secret=SECRET,
                trust=TrustPolicy(fingerprint=a.fingerprint),
                tunnels=[ExitSpec("vpc", AllowList.parse([f"127.0.0.1/32:{echo}"])), who],  # type: ignore[list-item]
            )
        )
        token = mint(key, (), ("vpc", "who"), 600, time.time(), subject="alice")
        connector = Connector(
            ConnectorConfig(
                relay=b.control_address,  # type: ignore[arg-type]
                token=token,
                trust=TrustPolicy(fingerprint=b.fingerprint),
            )
        )
        await agent.start()
        await connector.start()
        try:
            channel = connector.open_channel("vpc", target=f"127.0.0.1:{echo}")
            async with asyncio.timeout(10 * SCALE):
                await channel.wait_accepted()
                channel.write(b"through two nodes")
                assert await channel.readexactly(17) == b"through two nodes"
            channel.reset("cancelled", "done")
            connector.open_channel("who")
            async with asyncio.timeout(10 * SCALE):
                await who.asked.wait()
            assert who.peers == ["token:alice"]
        finally:
            await connector.close()
            await agent.close()


# --- clients with several relays; the CLI's words ----------------------------------------------


async def test_a_client_given_several_relays_uses_the_first_that_answers_and_moves_on(
    tmp_path: Path,
) -> None:
    """No cluster needed: a dead address is skipped, and when the relay in use goes away the
    agent moves to the next one (each relay gives it a port of its own here)."""
    from helpers import echo_server as async_echo
    from helpers import running_relay

    async with (
        async_echo() as echo,
        running_relay(tmp_path / "a", insecure=True) as a,
        running_relay(tmp_path / "b", insecure=True) as b,
    ):
        dead = ("127.0.0.1", free_port())
        events = Events()
        agent = Agent(
            AgentConfig(
                relay=dead,
                relays=(dead, a.control_address, b.control_address),  # type: ignore[arg-type]
                tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo))],
            ),
            on_event=events,
        )
        await agent.start()
        try:
            assert agent.connected_relay == "{}:{}".format(*a.control_address)  # type: ignore[str-format]
            await a.close()
            moved = await events.wait_for("connected", count=2)
            assert moved["relay"] == "{}:{}".format(*b.control_address)  # type: ignore[str-format]
            await events.wait_for("tunnel_ready", count=2)
            await echo_once(("127.0.0.1", agent.tunnels[0].port))  # type: ignore[arg-type]
        finally:
            await agent.close()


async def test_a_relay_name_with_several_addresses_is_tried_address_by_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--to relays.example:PORT`` resolving to several addresses: a dead one is skipped,
    and when the relay in use goes away the agent tries the others first."""
    from helpers import echo_server as async_echo
    from helpers import running_relay

    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    order = ["127.0.0.3", "127.0.0.2"]

    async def resolve(host: str, port: int, **kwargs: object) -> list[tuple[object, ...]]:
        if host != "relays.example":
            return await real(host, port, **kwargs)  # type: ignore[arg-type]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in order]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    port = free_port()
    async with async_echo() as echo:
        events = Events()
        async with running_relay(
            tmp_path / "a", insecure=True, listen_host="127.0.0.2", listen_port=port
        ):
            agent = Agent(
                AgentConfig(
                    relay=("relays.example", port),
                    tunnels=[TcpTunnelSpec(local=("127.0.0.1", echo))],
                ),
                on_event=events,
            )
            await agent.start()  # 127.0.0.3 refused: 127.0.0.2 answered
        try:
            async with running_relay(
                tmp_path / "b", insecure=True, listen_host="127.0.0.3", listen_port=port
            ) as b:
                await events.wait_for("tunnel_ready", count=2)
                await echo_once((b.config.listen_host, agent.tunnels[0].port))  # type: ignore[arg-type]
                assert agent.connected_relay == f"relays.example:{port}"
        finally:
            await agent.close()


def _refused_visitor(address: tuple[str, int]) -> None:
    """A connection through a connector whose stream the relay refuses: closed, no echo."""
    with (
        socket.create_connection(address, timeout=10 * SCALE) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendall(b"ping")
        assert sock.recv(16) == b""


def test_a_token_revoked_in_the_registry_is_refused_by_every_node(
    nodes: list[Node], tmp_path: Path
) -> None:
    """`burrow token revoke ID --registry URL` reaches every node at once, though no node's
    state directory changed: the connectors holding the token get their next stream refused
    on n2 and n3, and a new session with it is refused at its handshake on n1."""
    from burrow.cli import main

    n1, n2, n3 = nodes
    token = mint(TokenKey.load(tmp_path / "n1"), [], ["db"], 3600, time.time(), "lambda-orders")
    token_id = parse_token(token)[0]["id"]
    with echo_server() as echo:
        agent = agent_up(tmp_path, nodes, TUNNELS.format(echo=echo, web=echo))
        connectors: list[tuple[Proc, tuple[str, int]]] = []
        try:
            agent.wait("tunnel_ready", kind="private", name="db")
            for node in (n2, n3):
                proc = Proc("connect", "db", "--to", node.address, "--token", token, "--json")
                connectors.append((proc, ("", 0)))
                host, _, port = proc.wait("tunnel_ready", kind="connect")["local"].rpartition(":")
                connectors[-1] = (proc, (host, int(port)))
            deadline = time.monotonic() + 10 * SCALE
            for _, local in connectors:
                eventually(lambda local=local: echo_through(local, 64 * 1024), deadline)

            result = CliRunner().invoke(
                main, ["token", "revoke", token_id, "--registry", REDIS_URL]
            )
            assert result.exit_code == 0, result.output
            assert result.output.startswith(f"revoked {token_id} in the registry"), result.output
            assert not any((tmp_path / f"n{i}" / DENY_FILE).exists() for i in (1, 2, 3))

            deadline = time.monotonic() + 5 * SCALE  # the nodes hear it on the channel
            for proc, local in connectors:
                eventually(lambda local=local: _refused_visitor(local), deadline)
                refused = proc.wait("connection_refused", service="db")
                assert "revoked" in refused["reason"], refused
            late = Proc("connect", "db", "--to", n1.address, "--token", token, "--json")
            try:
                assert "revoked" in late.wait("error")["message"]
            finally:
                late.stop()
        finally:
            for proc, _ in connectors:
                proc.stop()
            agent.stop()


def test_revoking_in_an_unreachable_registry_says_so() -> None:
    from burrow.cli import main

    port = free_port()
    result = CliRunner().invoke(
        main, ["token", "revoke", "0123456789ab", "--registry", f"redis://127.0.0.1:{port}/15"]
    )
    assert result.exit_code == 2, result.output
    assert "cannot reach the registry" in result.output and "not revoked" in result.output
    assert "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["token", "revoke", "nope", "--registry", REDIS_URL])
    assert bad.exit_code == 2 and "is not a token id" in bad.output, bad.output


def test_cluster_flags_are_checked_before_anything_starts() -> None:
    from burrow.cli import main

    runner = CliRunner()
    cases = {
        ("relay", "--registry", "http://x"): "is not a Redis URL",
        ("relay", "--registry", "redis://127.0.0.1/15", "--node-id", "a b"): "invalid --node-id",
        ("relay", "--node-id", "n1"): "give --registry too",
        ("tcp", "5432", "--to", "a:7835,,b:7835"): "invalid relay list",
    }
    for args, words in cases.items():
        result = runner.invoke(main, list(args))
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_a_node_needs_the_cluster_s_token_key_and_an_address_to_advertise(
    tmp_path: Path,
) -> None:
    from burrow.cli import main

    flush_redis()
    runner = CliRunner()
    common = ["relay", "--registry", REDIS_URL, "--state-dir", str(tmp_path / "state")]
    result = runner.invoke(main, [*common, "--listen", "127.0.0.1:0", "--secret", "s"])
    assert result.exit_code == 2, result.output
    assert "needs the cluster's token key" in result.output
    assert "copy token.key into every node's --state-dir" in result.output
    result = runner.invoke(main, [*common, "--listen", "0.0.0.0:0"])  # it makes a key here
    assert result.exit_code == 2, result.output
    assert "needs --advertise HOST:PORT" in result.output
    assert "Traceback" not in result.output
