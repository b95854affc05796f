"""The Lambda extension against a fake Extensions API, a real relay and a real PostgreSQL.

The fake API follows AWS's runtimes-extensions-api docs: register (name header in, identifier
out), event/next that blocks until the test pushes an event, init/error and exit/error. The
extension runs as a subprocess (``python -m burrow.aws.extension``), as Lambda runs it, so
SIGSTOP/SIGCONT can play the sandbox freeze between invocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import psycopg
import pytest

from burrow.roles.agent import Agent, TcpTunnelSpec
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey, mint
from helpers import SCALE, Events, agent_config, free_port, relay_config

pytestmark = pytest.mark.timeout(90)

POSTGRES_PORT = 5432  # the system PostgreSQL: trust auth, user postgres, database test
PREFIX = "/2020-01-01/extension/"


# --- the fake Extensions API ---------------------------------------------------------------


@dataclass
class Call:
    kind: str  # register, next, init_error, exit_error, unknown
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


@dataclass
class FakeExtensionsAPI:
    """What Lambda's side of the Extensions API does, for one extension."""

    identifier: str = field(default_factory=lambda: str(uuid.uuid4()))
    calls: list[Call] = field(default_factory=list)
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    address: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def named(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    async def wait_call(self, kind: str, count: int = 1, timeout: float = 10.0) -> Call:
        async with asyncio.timeout(timeout * SCALE):
            while len(self.named(kind)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.named(kind)[count - 1]

    def push(self, event_type: str, **fields: Any) -> None:
        deadline = int((time.time() + 30) * 1000)
        event = {"eventType": event_type, "deadlineMs": deadline, **fields}
        if event_type == "INVOKE":
            event.setdefault("requestId", str(uuid.uuid4()))
            event.setdefault("invokedFunctionArn", "arn:aws:lambda:eu-west-1:1:function:test")
            event.setdefault("tracing", {"type": "X-Amzn-Trace-Id", "value": "Root=1-0-0"})
        self.events.put_nowait(event)

    def _record(self, kind: str, headers: dict[str, str], body: bytes) -> None:
        self.calls.append(Call(kind, headers, body, time.monotonic()))
        self._changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one_request(reader, writer)
        except (ConnectionError, h11.RemoteProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        assert request is not None
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        method, target = request.method.decode(), request.target.decode()
        path = target[len(PREFIX) :] if target.startswith(PREFIX) else None
        status, reply, extra = 404, {"errorMessage": "not found"}, {}
        if method == "POST" and path == "register":
            self._record("register", headers, body)
            if headers.get("lambda-extension-name"):
                status, reply = 200, {"functionName": "test", "functionVersion": "$LATEST"}
                extra = {"Lambda-Extension-Identifier": self.identifier}
            else:
                status, reply = 400, {"errorMessage": "missing Lambda-Extension-Name"}
        elif headers.get("lambda-extension-identifier") != self.identifier and path is not None:
            self._record("unknown", headers, body)
            status, reply = 403, {"errorMessage": "unknown extension identifier"}
        elif method == "GET" and path == "event/next":
            self._record("next", headers, body)
            reply = await self.events.get()
            status = 200
            extra = {"Lambda-Extension-Event-Identifier": str(uuid.uuid4())}
        elif method == "POST" and path in ("init/error", "exit/error"):
            self._record(path.replace("/", "_"), headers, body)
            status, reply = 202, {"status": "OK"}
        else:
            self._record("unknown", headers, body)
        payload = json.dumps(reply).encode()
        response_headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            *extra.items(),
        ]
        writer.write(conn.send(h11.Response(status_code=status, headers=response_headers)) or b"")
        writer.write(conn.send(h11.Data(data=payload)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


# --- the extension process -----------------------------------------------------------------


@dataclass
class Extension:
    proc: asyncio.subprocess.Process
    started: float  # time.monotonic() just before the process was created
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None

    async def pump(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()

    async def wait_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        async with asyncio.timeout(timeout * SCALE):
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                self._changed.clear()
                await self._changed.wait()

    async def exited(self, timeout: float = 5.0) -> int:
        """The exit code, once every line of stderr is in ``lines``."""
        async with asyncio.timeout(timeout * SCALE):
            code = await self.proc.wait()
            if self._pump is not None:
                await self._pump
        return code

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


@contextlib.asynccontextmanager
async def extension(env: dict[str, str]) -> AsyncIterator[Extension]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BURROW_", "AWS_"))}
    clean["BURROW_HOME"] = os.environ.get("BURROW_HOME", "")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "burrow.aws.extension",
        env={**clean, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    ext = Extension(proc, started)
    ext._pump = pump = asyncio.ensure_future(ext.pump())
    try:
        yield ext
    except BaseException:
        print("extension stderr:", *ext.lines, sep="\n  ")  # shown with the failure
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await pump
        if not pump.done():
            pump.cancel()


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


# --- tests ---------------------------------------------------------------------------------


async def test_lifecycle_freeze_and_shutdown(world: World) -> None:
    api = world.api
    pg_port = free_port()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}")
    async with extension(env) as ext:
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
    async with extension(world.env(BURROW_SOCKS=f"127.0.0.1:{socks_port}")) as ext:
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
    async with extension(world.env(BURROW_SOCKS=f"127.0.0.1:{socks_port}")) as ext:
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
    async with extension(env) as ext:
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
    async with extension(env) as ext:
        report = await world.api.wait_call("init_error", timeout=10)
        code = await ext.exited()
    assert code == 1
    assert report.headers["lambda-extension-function-error-type"] == "Extension.ConnectError"
    assert report.at - ext.started < 5 * SCALE
    assert not world.api.named("next")


async def test_service_without_agent_is_not_ready(world: World) -> None:
    await world.agent.close()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{free_port()}", BURROW_READY_TIMEOUT="1")
    async with extension(env) as ext:
        report = await world.api.wait_call("init_error", timeout=10)
        assert await ext.exited() == 1
    assert "service 'pg' not ready" in json.loads(report.body)["errorMessage"]


async def test_not_in_lambda_is_one_line() -> None:
    async with extension({"BURROW_RELAY": "127.0.0.1:1"}) as ext:
        code = await ext.exited(10)
    assert code == 2
    assert len(ext.lines) == 1 and "AWS_LAMBDA_RUNTIME_API is not set" in ext.lines[0]
