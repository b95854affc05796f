"""The Lambda extension against a fake Extensions API, a real relay and a real PostgreSQL.

The fake API (``lambda_fake``) is as strict as AWS's runtimes-extensions-api docs, deadlines
included; every test ends with no violation of it. The extension runs as a subprocess
(``python -m burrow.aws.extension``), as Lambda runs it, so SIGSTOP/SIGCONT can play the
sandbox freeze between invocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from burrow.aws.serverless.emulator import Emulator, EmulatorThread
from burrow.roles.agent import Agent, TcpTunnelSpec
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, mint
from helpers import SCALE, Events, agent_config, free_port, relay_config
from lambda_fake import Extension, FakeExtensionsAPI, StallingProxy, extension

__all__ = ["Extension", "FakeExtensionsAPI", "World", "extension", "world"]

pytestmark = pytest.mark.timeout(90)

POSTGRES_PORT = 5432  # the system PostgreSQL: trust auth, user postgres, database test


def query(port: int) -> int:
    """SELECT 1 through the extension's local port, as a function handler would."""
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="test", connect_timeout=5
    ) as conn:
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        return int(row[0])


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class World:
    api: FakeExtensionsAPI
    relay: Relay
    agent: Agent
    agent_events: Events
    control: int
    connect_token: str
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        assert self.relay.fingerprint
        return {
            "AWS_LAMBDA_RUNTIME_API": self.api.address,
            "BURROW_RELAY": f"127.0.0.1:{self.control}",
            "BURROW_FINGERPRINT": self.relay.fingerprint,
            "BURROW_TOKEN": self.connect_token,
            **extra,
        }

    async def restart_relay(self) -> None:
        await self.relay.close()
        self.relay = Relay(relay_config(self.tmp, listen_port=self.control))
        await self.relay.start()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    key = TokenKey.load_or_create(tmp_path / "relay-state")  # before the relay loads it
    now = time.time()
    expose_token = mint(key, ["pg"], [], 3600, now)
    connect_token = mint(key, [], ["pg"], 3600, now)
    control = free_port()
    api = FakeExtensionsAPI()
    await api.start()
    relay = Relay(relay_config(tmp_path, listen_port=control))
    await relay.start()
    agent_events = Events()
    agent = Agent(
        agent_config(
            relay,
            ("127.0.0.1", POSTGRES_PORT),
            tunnel=TcpTunnelSpec(local=("127.0.0.1", POSTGRES_PORT), name="pg", private=True),
            token=expose_token,
        ),
        on_event=agent_events,
    )
    await agent.start()
    world = World(api, relay, agent, agent_events, control, connect_token, tmp_path)
    try:
        yield world
    finally:
        await agent.close()
        await world.relay.close()
        await api.close()
    assert not api.violations, f"the extension did what Lambda would refuse: {api.violations}"
    assert api.killed is None, f"Lambda would have killed the extension: {api.killed}"


# --- tests ---------------------------------------------------------------------------------


async def test_lifecycle_freeze_and_shutdown(world: World) -> None:
    api = world.api
    pg_port = free_port()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}")
    async with extension(env, world.api) as ext:
        # Registration comes first, named as the layer's file, for INVOKE and SHUTDOWN.
        first_next = await api.wait_call("next", timeout=15)
        register = api.calls[0]
        assert register.kind == "register"
        assert register.headers["lambda-extension-name"] == "burrow"
        assert sorted(json.loads(register.body)["events"]) == ["INVOKE", "SHUTDOWN"]
        assert first_next.headers["lambda-extension-identifier"] == api.identifier
        assert [c.kind for c in api.calls] == ["register", "next"]

        # It asked for the first event only once pg answered: the first query just works.
        ready = await ext.wait_line(
            r"ready in (\d+) ms \((.*?)(?:, (\d+) ms since process start)?\)"
        )
        assert f"pg on 127.0.0.1:{pg_port}" in ready.string
        external_ms = (first_next.at - ext.started) * 1000
        register_ms = (register.at - ext.started) * 1000
        print(
            f"\ncold start: {ready.group(1)} ms from import to ready ({ready.group(2)}), "
            f"{ready.group(3) or '?'} ms from process start (kernel), {external_ms:.0f} ms from "
            f"spawn to the first event/next; registered {register_ms:.0f} ms after spawn"
        )
        assert await asyncio.to_thread(query, pg_port) == 1

        # INVOKE: it checks the session and asks for the next event again.
        api.push("INVOKE")
        await api.wait_call("next", 2)
        assert await asyncio.to_thread(query, pg_port) == 1

        # A freeze with nothing else changed: the session is simply still there.
        ext.signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)
        ext.signal(signal.SIGCONT)
        api.push("INVOKE")
        assert await asyncio.to_thread(query, pg_port) == 1  # races the INVOKE check
        await api.wait_call("next", 3)

        # A freeze across a relay restart: the session died while nothing could notice.
        lost_before = len(world.agent_events.named("session_lost"))
        ext.signal(signal.SIGSTOP)
        await world.restart_relay()
        await world.agent_events.wait_for("session_lost", lost_before + 1)
        await asyncio.sleep(1.5)  # a freeze longer than the pause detector's threshold
        ext.signal(signal.SIGCONT)
        api.push("INVOKE")
        # The function's first query runs while the extension handles the INVOKE (Lambda
        # sends both at once): the extension holds it until the session is back.
        assert await asyncio.to_thread(query, pg_port) == 1
        await api.wait_call("next", 4, timeout=15)
        assert await asyncio.to_thread(query, pg_port) == 1
        assert not [line for line in ext.lines if "invoke" in line and "not ready" in line]

        # SHUTDOWN: a clean exit, well within Lambda's 2 s.
        api.push("SHUTDOWN", shutdownReason="spindown")
        assert await ext.exited(3) == 0
        await ext.wait_line(r"shutdown \(spindown\)")
        assert not api.named("init_error") and not api.named("exit_error")
        assert not any("Traceback" in line for line in ext.lines), ext.lines


async def socks_to_postgres(port: int) -> bytes:
    """SOCKS5 CONNECT to the service "pg", then PostgreSQL's SSLRequest: its one-byte answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x03\x02pg" + POSTGRES_PORT.to_bytes(2, "big"))
        reply = await reader.readexactly(10)
        assert reply[:2] == b"\x05\x00", reply
        writer.write(bytes.fromhex("0000000804d2162f"))
        return await reader.readexactly(1)
    finally:
        writer.close()


async def test_socks_only(world: World) -> None:
    socks_port = free_port()
    async with extension(world.env(BURROW_SOCKS=f"127.0.0.1:{socks_port}"), world.api) as ext:
        await world.api.wait_call("next", timeout=15)
        await ext.wait_line(rf"ready in \d+ ms .*: socks on 127.0.0.1:{socks_port}$")
        async with asyncio.timeout(10 * SCALE):
            assert await socks_to_postgres(socks_port) in (b"N", b"S")
        world.api.push("SHUTDOWN", shutdownReason="timeout")
        assert await ext.exited(3) == 0


async def test_socks_holds_through_a_freeze(world: World) -> None:
    """The SOCKS proxy's first connection after a freeze across a relay restart waits for the
    session to come back, as the connect listeners do, instead of failing at once."""
    socks_port = free_port()
    async with extension(world.env(BURROW_SOCKS=f"127.0.0.1:{socks_port}"), world.api) as ext:
        await world.api.wait_call("next", timeout=15)
        await ext.wait_line(rf"ready in \d+ ms .*: socks on 127.0.0.1:{socks_port}$")
        lost_before = len(world.agent_events.named("session_lost"))
        ext.signal(signal.SIGSTOP)
        await world.restart_relay()
        await world.agent_events.wait_for("session_lost", lost_before + 1)
        await asyncio.sleep(1.5)  # longer than the pause detector's threshold
        ext.signal(signal.SIGCONT)
        world.api.push("INVOKE")
        async with asyncio.timeout(15 * SCALE):
            assert await socks_to_postgres(socks_port) in (b"N", b"S")
        await world.api.wait_call("next", 2, timeout=15)
        world.api.push("SHUTDOWN", shutdownReason="spindown")
        assert await ext.exited(3) == 0


@pytest.mark.parametrize(
    ("overrides", "kind", "message"),
    [
        ({"BURROW_CONNECT": "pg"}, "ConfigError", "needs a local address"),
        ({"BURROW_CONNECT": "bad name!=5433"}, "ConfigError", "invalid service"),
        ({"BURROW_CONNECT": "pg=127.0.0.1:99999"}, "ConfigError", "port must be"),
        ({"BURROW_RELAY": ""}, "ConfigError", "BURROW_RELAY is not set"),
        ({"BURROW_FINGERPRINT": "sha256:nope"}, "ConfigError", "fingerprint"),
        ({"BURROW_INSECURE": "1"}, "ConfigError", "BURROW_INSECURE turns TLS off"),
        ({"BURROW_CONNECT": "", "BURROW_SOCKS": ""}, "ConfigError", "nothing to do"),
    ],
)
async def test_bad_configuration_reports_init_error(
    world: World, overrides: dict[str, str], kind: str, message: str
) -> None:
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
    env.update(overrides)
    async with extension(env, world.api) as ext:
        report = await world.api.wait_call("init_error")
        code = await ext.exited()
    assert code != 0
    assert report.headers["lambda-extension-identifier"] == world.api.identifier
    assert report.headers["lambda-extension-function-error-type"] == f"Extension.{kind}"
    body = json.loads(report.body)
    assert body["errorType"] == f"Extension.{kind}" and body["stackTrace"] == []
    assert message in body["errorMessage"]
    assert [line for line in ext.lines if line] == [
        f"burrow extension: error: {body['errorMessage']}"
    ]
    assert not world.api.named("next")


async def test_unreachable_relay_reports_init_error_within_budget(world: World) -> None:
    env = world.env(
        BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}",
        BURROW_RELAY=f"127.0.0.1:{free_port()}",
        BURROW_READY_TIMEOUT="1",
    )
    async with extension(env, world.api) as ext:
        report = await world.api.wait_call("init_error", timeout=10)
        code = await ext.exited()
    assert code == 1
    assert report.headers["lambda-extension-function-error-type"] == "Extension.ConnectError"
    assert report.at - ext.started < 5 * SCALE
    assert not world.api.named("next")


async def test_service_without_agent_is_not_ready(world: World) -> None:
    await world.agent.close()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}", BURROW_READY_TIMEOUT="1")
    async with extension(env, world.api) as ext:
        report = await world.api.wait_call("init_error", timeout=10)
        assert await ext.exited() == 1
    assert "service 'pg' not ready" in json.loads(report.body)["errorMessage"]


async def test_not_in_lambda_is_one_line() -> None:
    async with extension({"BURROW_RELAY": "127.0.0.1:1"}) as ext:
        code = await ext.exited(10)
    assert code == 2
    assert len(ext.lines) == 1 and "AWS_LAMBDA_RUNTIME_API is not set" in ext.lines[0]


# --- Lambda's rules, strictly --------------------------------------------------------------


@contextlib.asynccontextmanager
async def stalling_path(world: World) -> AsyncIterator[StallingProxy]:
    """The extension's way to the relay through a path that can die silently."""
    proxy = StallingProxy(("127.0.0.1", world.control))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_freeze_while_the_session_dies_silently(world: World) -> None:
    """The relay's side of the session vanishes while the sandbox is frozen, and nothing tells
    the extension: no FIN, no RST, its socket stays open and swallows what it sends. The freeze
    is too short for the pause detector, so the first query after the thaw works only because
    the extension proves the session alive (and replaces it) when the INVOKE arrives; without
    that check it is bridged onto the dead session and times out."""
    pg_port = free_port()
    async with stalling_path(world) as path:
        env = world.env(
            BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}", BURROW_RELAY=f"127.0.0.1:{path.port}"
        )
        async with extension(env, world.api) as ext:
            await world.api.wait_call("next", timeout=15)
            assert await asyncio.to_thread(query, pg_port) == 1
            assert path.accepted == 1

            ext.signal(signal.SIGSTOP)
            path.stall()
            await asyncio.sleep(0.2)  # shorter than the pause detector's threshold
            ext.signal(signal.SIGCONT)
            world.api.push("INVOKE")
            # The extension asks for the next event once its INVOKE check is done: the
            # function's query comes after it, as on a warm sandbox.
            await world.api.wait_call("next", 2, timeout=15)
            assert await asyncio.to_thread(query, pg_port) == 1
            assert path.accepted == 2  # a new session, through the path that works again
            assert path.swallowed > 0  # the check's ping went into the dead session

            world.api.push("SHUTDOWN", shutdownReason="spindown")
            assert await ext.exited(3) == 0
    assert not [line for line in ext.lines if "not ready" in line]


async def test_shutdown_deadline_is_honoured(world: World) -> None:
    """SHUTDOWN's deadlineMs bounds the clean-up: with the relay unreachable closing would
    wait for its answer, and Lambda SIGKILLs an extension still running at the deadline."""
    pg_port = free_port()
    async with stalling_path(world) as path:
        env = world.env(
            BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}", BURROW_RELAY=f"127.0.0.1:{path.port}"
        )
        async with extension(env, world.api) as ext:
            await world.api.wait_call("next", timeout=15)
            path.stall()  # closing the session now waits for a relay that never answers
            world.api.push("SHUTDOWN", deadline_ms=int(1000 * SCALE), shutdownReason="timeout")
            code = await ext.exited(5)
    assert world.api.killed is None, ext.lines
    assert code == 0
    assert any("closing took too long" in line for line in ext.lines), ext.lines


async def test_register_refused_ends_the_extension_at_once(world: World) -> None:
    world.api.fail("register", 500)
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
    async with extension(env, world.api) as ext:
        code = await ext.exited(5)
    assert code == 1
    assert len(ext.lines) == 1, ext.lines
    assert "registering with the Extensions API failed: HTTP 500" in ext.lines[0]
    assert [c.kind for c in world.api.calls] == ["register"]


async def test_event_next_error_ends_the_extension_at_once(world: World) -> None:
    """A 500 from event/next is "non-recoverable: exit promptly": no retry, one line."""
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
    async with extension(env, world.api) as ext:
        await world.api.wait_call("next", timeout=15)
        world.api.fail("next", 500)
        world.api.push("INVOKE")
        code = await ext.exited(10)
    assert code == 1
    assert [c.status for c in world.api.named("next")] == [200, 500]
    assert any("event/next failed: HTTP 500" in line for line in ext.lines), ext.lines
    assert not any("Traceback" in line for line in ext.lines), ext.lines


async def test_a_second_register_is_refused(world: World) -> None:
    """Lambda registers each extension once: a second process registering under the same
    name gets 403 and ends with one line, and the first one keeps serving."""
    pg_port = free_port()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}")
    async with extension(env, world.api) as first:
        await world.api.wait_call("next", timeout=15)
        second_env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
        async with extension(second_env) as second:
            assert await second.exited(10) == 1
        assert [c.status for c in world.api.named("register")] == [200, 403]
        assert "HTTP 403" in second.lines[-1], second.lines
        assert await asyncio.to_thread(query, pg_port) == 1
        world.api.push("SHUTDOWN", shutdownReason="spindown")
        assert await first.exited(3) == 0
    assert world.api.violations == ["a second register"]
    world.api.violations.clear()


async def test_init_finishes_within_lambda_deadline(world: World) -> None:
    """An extension whose relay never answers reports init/error before Init's deadline
    (here a short one, with a ready timeout to match) instead of being killed by Lambda."""
    world.api.init_deadline = 3.0
    env = world.env(
        BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}",
        BURROW_RELAY=f"127.0.0.1:{free_port()}",
        BURROW_READY_TIMEOUT="1.5",
    )
    async with extension(env, world.api) as ext:
        await world.api.wait_call("init_error", timeout=10)
        assert await ext.exited() == 1
    assert world.api.killed is None


async def test_a_revoked_token_is_reported_as_exit_error(world: World) -> None:
    """A failure the extension cannot recover from after Init (here its token revoked, seen
    at the reconnect after a relay restart) goes to Lambda as exit/error, then it exits."""
    from burrow.tokens import deny, parse_token

    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
    async with extension(env, world.api) as ext:
        await world.api.wait_call("next", timeout=15)
        deny(world.tmp / "relay-state", parse_token(world.connect_token)[0]["id"])
        await world.restart_relay()
        report = await world.api.wait_call("exit_error", timeout=20)
        assert await ext.exited() == 1
    assert report.status == 202
    assert report.headers["lambda-extension-function-error-type"] == "Extension.AuthError"
    body = json.loads(report.body)
    assert body["errorType"] == "Extension.AuthError" and "revoked" in body["errorMessage"]
    assert not world.api.named("init_error")


# --- the serverless relay (BURROW_RELAY=wss://...) ------------------------------------------


@dataclass
class ServerlessWorld:
    api: FakeExtensionsAPI
    ws_url: str
    ws_port: int
    connect_token: str
    agent_events: Events


@pytest.fixture(scope="module")
def serverless_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with EmulatorThread(state_dir=tmp_path_factory.mktemp("serverless")) as emulator:
        yield emulator


@pytest.fixture
async def serverless_world(serverless_emulator: Emulator) -> AsyncIterator[ServerlessWorld]:
    """The emulator's relay, an agent offering the local PostgreSQL as the private service
    ``pg``, and a token that may connect to it."""
    from burrow.aws.serverless.agent import ServerlessAgent, ServerlessConfig
    from burrow.kinds import tcp_service

    key = TokenKey.load(serverless_emulator.state_dir)
    agent_state = serverless_emulator.state_dir / "agent"
    agent_state.mkdir(exist_ok=True)
    now = time.time()
    events = Events()
    agent = ServerlessAgent(
        ServerlessConfig(
            url=serverless_emulator.ws_url,
            token=mint(key, ["pg"], [], 3600, now),
            services=[tcp_service(str(POSTGRES_PORT), name="pg", private=True)],
            state_dir=agent_state,  # its lease: the same holder of "pg" in every test
        ),
        on_event=events,
    )
    await agent.start()
    api = FakeExtensionsAPI()
    await api.start()
    port = int(serverless_emulator.ws_url.rsplit(":", 1)[1].split("/", 1)[0])
    try:
        yield ServerlessWorld(
            api, serverless_emulator.ws_url, port, mint(key, [], ["pg"], 3600, now), events
        )
    finally:
        await agent.close()
        await api.close()
    assert not api.violations, f"the extension did what Lambda would refuse: {api.violations}"
    assert api.killed is None, f"Lambda would have killed the extension: {api.killed}"


async def test_serverless_relay_survives_a_freeze_while_its_link_dies_silently(
    serverless_world: ServerlessWorld,
) -> None:
    """BURROW_RELAY=ws://... (the serverless relay's emulator): the extension's listener
    reaches PostgreSQL through the relay; then its WebSocket dies without FIN or RST while the
    sandbox is frozen, too briefly for the pause detector, and the first query after the thaw
    works only because the INVOKE's check proves the link dead and replaces it (without it the
    connection goes onto the dead link, waits for an accept that never comes, and is
    refused)."""
    world = serverless_world
    api = world.api
    pg_port = free_port()
    path = StallingProxy(("127.0.0.1", world.ws_port))
    await path.start()
    try:
        env = {
            "AWS_LAMBDA_RUNTIME_API": api.address,
            "BURROW_RELAY": world.ws_url.replace(str(world.ws_port), str(path.port)),
            "BURROW_TOKEN": world.connect_token,
            "BURROW_CONNECT": f"pg=127.0.0.1:{pg_port}",
        }
        async with extension(env, api) as ext:
            await api.wait_call("next", timeout=20)
            assert [c.kind for c in api.calls] == ["register", "next"]
            ready = await ext.wait_line(r"ready in (\d+) ms \((.*?)\)")
            assert f"pg on 127.0.0.1:{pg_port}" in ready.string
            print(f"\nserverless relay: {ready.string}")
            assert await asyncio.to_thread(query, pg_port) == 1
            assert path.accepted == 1

            api.push("INVOKE")
            await api.wait_call("next", 2, timeout=15)
            assert await asyncio.to_thread(query, pg_port) == 1

            ext.signal(signal.SIGSTOP)
            path.stall()
            await asyncio.sleep(0.2)  # shorter than the pause detector's threshold
            ext.signal(signal.SIGCONT)
            api.push("INVOKE")
            await api.wait_call("next", 3, timeout=15)
            assert await asyncio.to_thread(query, pg_port) == 1
            assert path.accepted == 2  # a new connection, through the path that works again
            assert path.swallowed > 0  # the check's ping went into the dead one

            api.push("SHUTDOWN", shutdownReason="spindown")
            assert await ext.exited(3) == 0
            await ext.wait_line(r"shutdown \(spindown\)")
    finally:
        await path.close()
    assert not api.named("init_error") and not api.named("exit_error")
    assert not [line for line in ext.lines if "not ready" in line or "Traceback" in line]


async def test_serverless_relay_holds_connections_through_a_freeze(
    serverless_world: ServerlessWorld,
) -> None:
    """A freeze longer than the pause detector's threshold, the link cut silently meanwhile:
    the function's query, sent together with the INVOKE, is held until the link is back."""
    world = serverless_world
    api = world.api
    pg_port = free_port()
    path = StallingProxy(("127.0.0.1", world.ws_port))
    await path.start()
    try:
        env = {
            "AWS_LAMBDA_RUNTIME_API": api.address,
            "BURROW_RELAY": world.ws_url.replace(str(world.ws_port), str(path.port)),
            "BURROW_TOKEN": world.connect_token,
            "BURROW_CONNECT": f"pg=127.0.0.1:{pg_port}",
        }
        async with extension(env, api) as ext:
            await api.wait_call("next", timeout=20)
            ext.signal(signal.SIGSTOP)
            path.stall()
            await asyncio.sleep(1.5)  # longer than the pause detector's threshold
            ext.signal(signal.SIGCONT)
            api.push("INVOKE")
            assert await asyncio.to_thread(query, pg_port) == 1  # races the INVOKE check
            await api.wait_call("next", 2, timeout=15)
            assert path.accepted == 2
            api.push("SHUTDOWN", shutdownReason="spindown")
            assert await ext.exited(3) == 0
    finally:
        await path.close()


async def test_serverless_relay_unknown_service_is_not_ready(
    serverless_world: ServerlessWorld,
) -> None:
    """A service the token may not reach: Init fails within the budget, with the relay's
    reason, reported to Lambda as init/error."""
    env = {
        "AWS_LAMBDA_RUNTIME_API": serverless_world.api.address,
        "BURROW_RELAY": serverless_world.ws_url,
        "BURROW_TOKEN": serverless_world.connect_token,
        "BURROW_CONNECT": f"cache=127.0.0.1:{free_port()}",
        "BURROW_READY_TIMEOUT": "2",
    }
    async with extension(env, serverless_world.api) as ext:
        report = await serverless_world.api.wait_call("init_error", timeout=15)
        assert await ext.exited() == 1
    message = json.loads(report.body)["errorMessage"]
    assert "service 'cache' not ready" in message and "may not connect to 'cache'" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"BURROW_RELAY": "ws://10.1.2.3/local"}, "BURROW_RELAY 'ws://10.1.2.3/local' is plain"),
        (
            {"BURROW_RELAY": "wss://x.example/relay", "BURROW_SOCKS": "127.0.0.1:1055"},
            "BURROW_SOCKS needs a burrow relay",
        ),
        ({"BURROW_RELAY": "wss://x.example/relay"}, "BURROW_FINGERPRINT is for a burrow relay"),
        (
            {"BURROW_RELAY": "wss://x.example/relay", "BURROW_FINGERPRINT": "", "BURROW_TOKEN": ""},
            "a serverless relay takes BURROW_TOKEN",
        ),
    ],
)
async def test_serverless_relay_bad_configuration_reports_init_error(
    world: World, overrides: dict[str, str], message: str
) -> None:
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}")
    env.update(overrides)
    async with extension(env, world.api) as ext:
        report = await world.api.wait_call("init_error")
        assert await ext.exited() == 2
    body = json.loads(report.body)
    assert body["errorType"] == "Extension.ConfigError" and message in body["errorMessage"]
    assert ext.lines == [f"burrow extension: error: {body['errorMessage']}"]


def test_importing_the_extension_stays_cheap() -> None:
    """Registering comes first and importing is most of a cold start: the serverless relay's
    client (and websockets) are imported only for a wss:// relay."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from burrow.aws import extension\n"
        "assert not [m for m in sys.modules if m.startswith(('burrow.roles', 'burrow.net'))]\n"
        "extension.load_settings({'BURROW_RELAY': 'relay.example:7835', 'BURROW_TOKEN': "
        f"{mint(TokenKey.from_secret(bytes(32)), [], ['pg'], 60, time.time())!r}, "
        "'BURROW_CONNECT': 'pg=127.0.0.1:5432'})\n"
        "extension._connector_class('relay.example:7835')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('websockets', "
        "'burrow.aws.serverless'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_serverless_connector_checks_its_link_and_services(
    serverless_world: ServerlessWorld,
) -> None:
    """In process, what the extension's checks use: a live link is kept (a ping answered), a
    silently dead one is replaced; a probe stream tells a reachable service from one the
    token may not reach."""
    from burrow.aws.serverless.agent import ServerlessConfig, ServerlessConnector
    from burrow.errors import ConnectError
    from burrow.roles.connector import ListenSpec

    world = serverless_world
    path = StallingProxy(("127.0.0.1", world.ws_port))
    await path.start()
    events = Events()
    connector = ServerlessConnector(
        ServerlessConfig(
            url=world.ws_url.replace(str(world.ws_port), str(path.port)),
            token=world.connect_token,
            services=[],
            listen=[ListenSpec("pg")],
        ),
        on_event=events,
    )
    await connector.start()
    try:
        link = connector.link
        assert link is not None
        assert await connector.ensure_session(5 * SCALE) is link
        await connector.wait_ready("pg", 5 * SCALE)
        with pytest.raises(ConnectError, match="may not connect to 'cache'"):
            await connector.wait_ready("cache", 5 * SCALE)

        path.stall()  # the link is dead and nothing says so
        assert link.is_open
        fresh = await connector.ensure_session(10 * SCALE)
        assert fresh is not link and fresh.is_open and not link.is_open
        assert path.accepted == 2 and path.swallowed > 0
        await connector.wait_ready("pg", 5 * SCALE)
        assert events.named("session_lost")
    finally:
        await connector.close()
        await path.close()
