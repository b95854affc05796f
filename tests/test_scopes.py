"""Scoped tokens end to end: what a token lets its holder expose and reach, checked by the
relay at the handshake (signature, expiry, revocation, key) and at every stream open (scope).

A relay with a token key (minted before it starts: it loads ``state_dir/token.key`` at start);
an agent offering the private services "a" and "b" (echo servers); connectors holding tokens
for some of them, in-process and through the real CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from burrow.errors import AuthError, TunnelError
from burrow.net.channel import ChannelReset
from burrow.net.proxy_server import ProxyServer
from burrow.net.tls import TrustPolicy
from burrow.roles.agent import Agent, AgentConfig, ExitSpec, TcpTunnelSpec
from burrow.roles.connector import Connector, ConnectorConfig
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, deny, mint, parse_token
from helpers import SCALE, LoopThread, echo_handler, relay_config

pytestmark = pytest.mark.timeout(60)


@dataclass
class World:
    loop: LoopThread
    relay: Relay
    key: TokenKey
    state: Path
    tmp: Path
    fingerprint: str
    control: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def token(self, expose: list[str], connect: list[str], ttl: int | None = 3600) -> str:
        return mint(self.key, expose, connect, ttl, time.time())

    def client_fields(self, token: str | None) -> dict[str, Any]:
        assert self.relay.control_address is not None
        return {
            "relay": self.relay.control_address,
            "token": token,
            "trust": TrustPolicy(fingerprint=self.fingerprint),
        }

    def connector(self, token: str | None) -> Connector:
        """A started connector (closed by the caller through ``close``)."""

        async def start() -> Connector:
            connector = Connector(ConnectorConfig(**self.client_fields(token)))
            await connector.start()
            return connector

        return self.loop.run(start())

    def close(self, role: Any) -> None:
        self.loop.run(role.close())


@contextlib.asynccontextmanager
async def _started(role: Any) -> Any:
    await role.start()
    try:
        yield role
    finally:
        await role.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("scopes")
    state = tmp / "relay-state"
    key = TokenKey.load_or_create(state)
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()
    events: list[dict[str, Any]] = []
    try:

        async def up() -> World:
            echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
            stack.callback(echo.close)
            echo_port = echo.sockets[0].getsockname()[1]
            relay = Relay(relay_config(tmp), on_event=events.append)
            await stack.enter_async_context(_started(relay))
            assert relay.control_address is not None and relay.fingerprint
            agent = Agent(
                AgentConfig(
                    relay=relay.control_address,
                    token=mint(key, ["a", "b"], [], 3600, time.time()),
                    trust=TrustPolicy(fingerprint=relay.fingerprint),
                    tunnels=[
                        TcpTunnelSpec(local=("127.0.0.1", echo_port), name=name, private=True)
                        for name in ("a", "b")
                    ],
                )
            )
            await stack.enter_async_context(_started(agent))
            host, port = relay.control_address
            return World(
                loop=loop,
                relay=relay,
                key=key,
                state=state,
                tmp=tmp,
                fingerprint=relay.fingerprint,
                control=f"{host}:{port}",
                events=events,
            )

        yield loop.run(up())
    finally:
        loop.run(stack.aclose())
        loop.stop()


# ---- helpers ---------------------------------------------------------------------------------


async def _echo_once(connector: Connector, service: str, payload: bytes) -> bytes:
    channel = connector.open_channel(service)
    async with asyncio.timeout(10 * SCALE):
        await channel.wait_accepted()
        channel.write(payload)
        data = await channel.readexactly(len(payload))
    channel.close()
    return data


async def _refusal(connector: Connector, service: str) -> ChannelReset:
    channel = connector.open_channel(service)
    try:
        async with asyncio.timeout(10 * SCALE):
            await channel.wait_accepted()
    except ChannelReset as exc:
        return exc
    channel.reset("cancelled", "test")
    raise AssertionError(f"the stream to {service!r} was accepted")


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout * SCALE,
        check=False,
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("burrow: error: "), stderr
    return lines[0]


def _assert_one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


def _socks_rep(port: int, name: str) -> tuple[int, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    raw = name.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x01")
    reply = b""
    while len(reply) < 10:  # failures and our successes both bind an IPv4 address
        chunk = sock.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    assert reply[:1] == b"\x05" and len(reply) == 10, reply
    return reply[1], sock


# ---- connect scope: checked at every stream open ------------------------------------------------


def test_connect_scope_is_checked_per_stream_on_one_session(world: World) -> None:
    connector = world.connector(world.token([], ["a"]))
    try:
        session = connector.conn
        assert session is not None
        assert world.loop.run(_echo_once(connector, "a", b"first")) == b"first"

        refused = world.loop.run(_refusal(connector, "b"))
        assert refused.code == "not_allowed"
        assert "'b'" in refused.reason and "may connect to: a" in refused.reason, refused.reason

        # The refusal was a stream reset, not the end of the session: A still works on it.
        assert connector.conn is session and session.is_open
        assert world.loop.run(_echo_once(connector, "a", b"again")) == b"again"
        # A service nobody offers, inside the scope or not, is refused at the relay too.
        assert world.loop.run(_refusal(connector, "zzz")).code == "not_allowed"
    finally:
        world.close(connector)


def test_glob_scope(world: World) -> None:
    connector = world.connector(world.token([], ["[ab]"]))
    try:
        for name in ("a", "b"):
            assert world.loop.run(_echo_once(connector, name, name.encode())) == name.encode()
        assert world.loop.run(_refusal(connector, "ab")).code == "not_allowed"
    finally:
        world.close(connector)


def test_socks_refuses_a_service_outside_the_scope(world: World) -> None:
    connector = world.connector(world.token([], ["a"]))

    async def listen() -> tuple[ProxyServer, int, int]:
        server = ProxyServer(connector)
        socks_at = await server.listen("socks", "127.0.0.1", 0)
        http_at = await server.listen("http", "127.0.0.1", 0)
        return server, socks_at[1], http_at[1]

    server, socks_port, http_port = world.loop.run(listen())
    try:
        rep, sock = _socks_rep(socks_port, "a")
        with sock:
            assert rep == 0x00
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        rep, sock = _socks_rep(socks_port, "b.burrow")
        sock.close()
        assert rep == 0x02
        rep, sock = _socks_rep(socks_port, "a")  # same connector session, still fine
        sock.close()
        assert rep == 0x00

        with socket.create_connection(("127.0.0.1", http_port), timeout=10 * SCALE) as sock:
            sock.sendall(b"CONNECT b.burrow:1 HTTP/1.1\r\nHost: b.burrow:1\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        assert head.startswith(b"HTTP/1.1 403 "), head
        assert b"Burrow-Error: not_allowed: this token may not connect to 'b'" in head, head
    finally:
        world.loop.loop.call_soon_threadsafe(server.close)
        world.close(connector)


# ---- handshake: expiry, missing credentials --------------------------------------------------


def test_expired_token_is_refused_at_the_handshake(world: World) -> None:
    expired = mint(world.key, [], ["a"], 1, time.time() - 60)
    started = time.monotonic()
    with pytest.raises(AuthError) as caught:
        world.connector(expired)
    assert time.monotonic() - started < 5 * SCALE  # refused, not retried
    message = _assert_one_line(caught.value)
    assert "expired" in message and "burrow token issue" in message, message
    assert world.control in message, message
    # The relay logs the refusal as its side of the session closes (bounded wait).
    deadline = time.monotonic() + 5 * SCALE
    while time.monotonic() < deadline:
        refused = [e for e in world.events if e["event"] == "session_refused"]
        if refused and "expired" in refused[-1]["reason"]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"no session_refused event for the expired token: {world.events}")


def test_expired_token_cli_is_one_line(world: World) -> None:
    expired = mint(world.key, [], ["a"], 1, time.time() - 60)
    proc = _cli(
        "connect",
        "a=127.0.0.1:0",
        "--to",
        world.control,
        "--token",
        expired,
        "--fingerprint",
        world.fingerprint,
        "--state-dir",
        str(world.tmp / "cli-expired"),
    )
    assert proc.returncode != 0
    line = _one_error_line(proc.stderr)
    assert "expired" in line, line
    assert expired not in proc.stdout + proc.stderr  # the token itself is never echoed


def test_relay_with_a_token_key_refuses_anonymous_clients(world: World) -> None:
    with pytest.raises(AuthError) as caught:
        world.connector(None)
    message = _assert_one_line(caught.value)
    assert "requires a secret or a token" in message, message
    assert "--token" in message and "--secret" in message, message

    proc = _cli(
        "connect",
        "a=127.0.0.1:0",
        "--to",
        world.control,
        "--fingerprint",
        world.fingerprint,
        "--state-dir",
        str(world.tmp / "cli-anon"),
    )
    assert proc.returncode != 0
    assert "requires a secret or a token" in _one_error_line(proc.stderr)


def test_malformed_token_is_a_user_error_before_connecting(world: World) -> None:
    proc = _cli(
        "connect",
        "a=127.0.0.1:0",
        "--to",
        world.control,
        "--token",
        "bt1.garbage",
        "--fingerprint",
        world.fingerprint,
        "--state-dir",
        str(world.tmp / "cli-malformed"),
    )
    assert proc.returncode != 0
    assert "malformed token" in _one_error_line(proc.stderr)


# ---- expose scope ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expose", "spec", "name", "allowed"),
    [
        (["a"], "private", "c", "it may expose: a"),
        (["a", "b"], "exit", "vpc", "it may expose: a, b"),
        ([], "private", "a", "it may expose nothing"),
    ],
)
def test_agent_without_the_expose_scope_cannot_register(
    world: World, expose: list[str], spec: str, name: str, allowed: str
) -> None:
    from burrow.allowlist import AllowList

    tunnel: Any = (
        TcpTunnelSpec(local=("127.0.0.1", 9), name=name, private=True)
        if spec == "private"
        else ExitSpec(name, AllowList.parse(["127.0.0.1:9"]))
    )
    token = world.token(expose, ["a"])

    async def start() -> None:
        agent = Agent(AgentConfig(**world.client_fields(token), tunnels=[tunnel]))
        try:
            await agent.start()
        finally:
            await agent.close()

    with pytest.raises(TunnelError) as caught:
        world.loop.run(start())
    assert caught.value.code == "not_allowed"
    message = _assert_one_line(caught.value)
    assert f"this token may not expose {name!r}" in message, message
    assert allowed in message, message

    async def names() -> set[tuple[str, str]]:
        return set(world.relay.names)

    assert ("svc", name) not in world.loop.run(names()) or name == "a"


# ---- revocation and key rotation (a relay of their own) ---------------------------------------


@dataclass
class OwnRelay:
    state: Path
    relay: Relay | None = None

    @property
    def fields(self) -> dict[str, Any]:
        assert self.relay is not None and self.relay.control_address is not None
        return {
            "relay": self.relay.control_address,
            "trust": TrustPolicy(fingerprint=self.relay.fingerprint),
        }


@pytest.fixture
def own_relay(loop_thread: LoopThread, tmp_path: Path) -> Iterator[OwnRelay]:
    own = OwnRelay(state=tmp_path / "relay-state")
    TokenKey.load_or_create(own.state)
    yield own
    if own.relay is not None:
        loop_thread.run(own.relay.close())


async def _start_relay(own: OwnRelay, tmp: Path) -> None:
    if own.relay is not None:
        await own.relay.close()
    own.relay = Relay(relay_config(tmp, state_dir=own.state))
    await own.relay.start()


async def _handshake(own: OwnRelay, token: str) -> Connector:
    connector = Connector(ConnectorConfig(**own.fields, token=token))
    await connector.start()
    return connector


def test_revoked_token_fails_the_next_handshake(
    loop_thread: LoopThread, own_relay: OwnRelay, tmp_path: Path
) -> None:
    key = TokenKey.load_or_create(own_relay.state)
    token = mint(key, [], ["a"], 3600, time.time())
    token_id = parse_token(token)[0]["id"]
    loop_thread.run(_start_relay(own_relay, tmp_path))

    first = loop_thread.run(_handshake(own_relay, token))
    loop_thread.run(first.close())

    deny(own_relay.state, token_id)
    with pytest.raises(AuthError) as caught:
        loop_thread.run(_handshake(own_relay, token))
    message = _assert_one_line(caught.value)
    assert "revoked" in message and token_id in message, message

    # Other tokens from the same key are unaffected.
    other = mint(key, [], ["a"], 3600, time.time())
    loop_thread.run(loop_thread.run(_handshake(own_relay, other)).close())


def test_cli_token_revoke(loop_thread: LoopThread, own_relay: OwnRelay, tmp_path: Path) -> None:
    key = TokenKey.load_or_create(own_relay.state)
    token = mint(key, [], ["a"], 3600, time.time())
    token_id = parse_token(token)[0]["id"]
    loop_thread.run(_start_relay(own_relay, tmp_path))
    loop_thread.run(loop_thread.run(_handshake(own_relay, token)).close())

    proc = _cli("token", "revoke", token_id, "--state-dir", str(own_relay.state))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"revoked {token_id}"
    with pytest.raises(AuthError, match="revoked"):
        loop_thread.run(_handshake(own_relay, token))

    bad = _cli("token", "revoke", "not-an-id", "--state-dir", str(own_relay.state))
    assert bad.returncode != 0
    assert "not a token id" in _one_error_line(bad.stderr)


def test_revoked_token_cannot_open_new_streams_on_an_old_session(
    loop_thread: LoopThread, own_relay: OwnRelay, tmp_path: Path
) -> None:
    key = TokenKey.load_or_create(own_relay.state)
    token = mint(key, [], ["a"], 3600, time.time())
    expose = mint(key, ["a"], [], 3600, time.time())

    async def scenario() -> ChannelReset | None:
        await _start_relay(own_relay, tmp_path)
        echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        agent = Agent(
            AgentConfig(
                **own_relay.fields,
                token=expose,
                tunnels=[
                    TcpTunnelSpec(
                        local=("127.0.0.1", echo.sockets[0].getsockname()[1]),
                        name="a",
                        private=True,
                    )
                ],
            )
        )
        await agent.start()
        connector = await _handshake(own_relay, token)
        try:
            assert await _echo_once(connector, "a", b"before") == b"before"
            deny(own_relay.state, parse_token(token)[0]["id"])
            await asyncio.sleep(0.05)
            try:
                await _echo_once(connector, "a", b"after")
            except ChannelReset as exc:
                return exc
            return None
        finally:
            await connector.close()
            await agent.close()
            echo.close()

    refused = loop_thread.run(scenario())
    assert refused is not None, "a revoked token opened a new stream on its old session"
    assert refused.code == "not_allowed" and "revoked" in refused.reason, refused


def test_key_rotation_refuses_old_tokens(
    loop_thread: LoopThread, own_relay: OwnRelay, tmp_path: Path
) -> None:
    old_key = TokenKey.load_or_create(own_relay.state)
    old = mint(old_key, [], ["a"], 3600, time.time())
    loop_thread.run(_start_relay(own_relay, tmp_path))
    assert own_relay.relay is not None
    fingerprint = own_relay.relay.fingerprint
    loop_thread.run(loop_thread.run(_handshake(own_relay, old)).close())

    new_key = TokenKey.rotate(own_relay.state)
    assert new_key.kid != old_key.kid
    loop_thread.run(_start_relay(own_relay, tmp_path))  # the relay reads its key at start
    assert own_relay.relay.fingerprint == fingerprint  # same certificate, new token key

    with pytest.raises(AuthError) as caught:
        loop_thread.run(_handshake(own_relay, old))
    message = _assert_one_line(caught.value)
    assert "another relay key" in message and "rotation" in message, message

    fresh = mint(new_key, [], ["a"], 3600, time.time())
    loop_thread.run(loop_thread.run(_handshake(own_relay, fresh)).close())


# ---- burrow token issue ----------------------------------------------------------------------


def test_token_issue_prints_the_token_once_on_the_last_line(world: World) -> None:
    proc = _cli("token", "issue", "--state-dir", str(world.state), "--connect", "a", "--ttl", "1h")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    token = lines[-1].strip()
    assert token.startswith("bt1.")
    claims = parse_token(token)[0]
    assert claims["connect"] == ["a"] and claims["expose"] == []
    assert claims["exp"] - claims["iat"] == 3600
    assert (proc.stdout + proc.stderr).count(token) == 1
    assert claims["id"] in proc.stderr  # the id (for revoke) is shown; the token only once

    # The relay (started before this token existed) accepts it: same key file.
    connector = world.connector(token)
    try:
        assert world.loop.run(_echo_once(connector, "a", b"issued")) == b"issued"
        assert world.loop.run(_refusal(connector, "b")).code == "not_allowed"
    finally:
        world.close(connector)


def test_token_issue_needs_names(world: World) -> None:
    proc = _cli("token", "issue", "--state-dir", str(world.state))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "--expose and/or --connect" in _one_error_line(proc.stderr)
