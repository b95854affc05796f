"""Lambda's side of an extension's life, for tests: a fake Extensions API as strict as AWS's
documentation (runtimes-extensions-api), and the extension as a subprocess, as Lambda runs it.

What the fake enforces, as Lambda does:

- register: the ``Lambda-Extension-Name`` header (the file name), a JSON body whose ``events``
  are INVOKE/SHUTDOWN only; a second register refused (403); none after Init's deadline.
- event/next, init/error, exit/error: the identifier register gave, or 403; after an error
  report "no further API calls succeed" (403); error reports need
  ``Lambda-Extension-Function-Error-Type`` and a JSON body (400 otherwise); init/error only
  during Init.
- Init's deadline (10 s by default): an extension that neither asked for the first event nor
  reported init/error by then is killed, as Lambda resets the sandbox.
- SHUTDOWN carries ``deadlineMs`` (2 s by default, Lambda's limit with external extensions);
  a process still running at that deadline is SIGKILLed, and ``killed`` says so.
- Any status can be injected for the next call of a kind (``fail``), to test how the
  extension takes register or event/next errors (500: "exit promptly").

Anything the extension does that AWS would refuse is recorded in ``violations``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from helpers import SCALE

PREFIX = "/2020-01-01/extension/"
INIT_DEADLINE = 10.0  # Lambda's Init phase limit
SHUTDOWN_MS = 2000  # Lambda's Shutdown phase limit with external extensions
MAX_REQUEST = 1024 * 1024

Reply = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers


@dataclass
class Call:
    kind: str  # register, next, init_error, exit_error, unknown
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    status: int = 0


@dataclass
class FakeExtensionsAPI:
    """What Lambda's side of the Extensions API does, for one extension."""

    identifier: str = field(default_factory=lambda: str(uuid.uuid4()))
    calls: list[Call] = field(default_factory=list)
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    address: str = ""
    name: str = "burrow"  # the extension's file name in /opt/extensions
    init_deadline: float = INIT_DEADLINE
    violations: list[str] = field(default_factory=list)
    killed: str | None = None  # why the fake killed the extension, as Lambda would
    kill: Callable[[], None] | None = None  # set by the harness: SIGKILL the extension
    registered: bool = False
    init_done: bool = False
    finished: str | None = None  # init_error / exit_error once reported
    failures: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind: (status, count)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _timers: list[asyncio.TimerHandle] = field(default_factory=list)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def fail(self, kind: str, status: int, count: int = 1) -> None:
        """Answer the next ``count`` calls of ``kind`` with ``status``."""
        self.failures[kind] = (status, count)

    def spawned(self) -> None:
        """The extension process started: Init's clock runs."""
        self._after(self.init_deadline * SCALE, self._init_expired)

    def named(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    async def wait_call(self, kind: str, count: int = 1, timeout: float = 10.0) -> Call:
        async with asyncio.timeout(timeout * SCALE):
            while len(self.named(kind)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.named(kind)[count - 1]

    def push(self, event_type: str, *, deadline_ms: int | None = None, **fields: Any) -> None:
        """Queue an event. ``deadline_ms``: from now (INVOKE 30 s, SHUTDOWN 2 s by default)."""
        if deadline_ms is None:
            deadline_ms = SHUTDOWN_MS if event_type == "SHUTDOWN" else 30_000
        event = {"eventType": event_type, "deadlineMs": int(time.time() * 1000) + deadline_ms}
        event.update(fields)
        if event_type == "INVOKE":
            event.setdefault("requestId", str(uuid.uuid4()))
            event.setdefault("invokedFunctionArn", "arn:aws:lambda:eu-west-1:1:function:test")
            event.setdefault("tracing", {"type": "X-Amzn-Trace-Id", "value": "Root=1-0-0"})
        self.events.put_nowait(event)

    # --- enforcement -----------------------------------------------------------------------

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, action))

    def _violate(self, message: str) -> None:
        self.violations.append(message)

    def _kill(self, why: str) -> None:
        if self.kill is not None and self.killed is None:
            self.killed = why
            self.kill()

    def _init_expired(self) -> None:
        if not self.init_done and self.finished is None:
            self._violate(f"Init not done within {self.init_deadline:.0f} s")
            self._kill("init deadline")

    def _record(self, kind: str, headers: dict[str, str], body: bytes) -> Call:
        call = Call(kind, headers, body, time.monotonic())
        self.calls.append(call)
        self._changed.set()
        return call

    def _injected(self, kind: str) -> int | None:
        status, count = self.failures.get(kind, (0, 0))
        if count <= 0:
            return None
        self.failures[kind] = (status, count - 1)
        return status

    # --- HTTP ------------------------------------------------------------------------------

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
                if len(body) > MAX_REQUEST:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        assert request is not None
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        method, target = request.method.decode(), request.target.decode()
        path = target[len(PREFIX) :] if target.startswith(PREFIX) else None
        status, reply, extra = await self._handle(method, path, headers, body)
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

    async def _handle(
        self, method: str, path: str | None, headers: dict[str, str], body: bytes
    ) -> Reply:
        def error(status: int, kind: str, message: str) -> Reply:
            call.status = status
            return status, {"errorMessage": message, "errorType": kind}, {}

        kind = {
            ("POST", "register"): "register",
            ("GET", "event/next"): "next",
            ("POST", "init/error"): "init_error",
            ("POST", "exit/error"): "exit_error",
        }.get((method, path or ""), "unknown")
        call = self._record(kind, headers, body)
        if kind == "unknown":
            self._violate(f"unknown call {method} {path}")
            return error(404, "InvalidRequest", "not found")
        injected = self._injected(kind)
        if injected is not None:
            return error(injected, "Fatal.Injected", f"injected {injected}")
        if kind == "register":
            return self._register(headers, body, error)
        if headers.get("lambda-extension-identifier") != self.identifier:
            self._violate(f"{kind} without the identifier register gave")
            return error(403, "Extension.Forbidden", "unknown extension identifier")
        if self.finished is not None:
            self._violate(f"{kind} after {self.finished}")
            return error(403, "Extension.Forbidden", f"the extension reported {self.finished}")
        if kind == "next":
            if not self.init_done:
                self.init_done = True
            event = await self.events.get()
            if event["eventType"] == "SHUTDOWN":
                deadline = event["deadlineMs"] / 1000 - time.time()
                self._after(max(0.0, deadline), lambda: self._kill("shutdown deadline"))
            call.status = 200
            return 200, event, {"Lambda-Extension-Event-Identifier": str(uuid.uuid4())}
        if not headers.get("lambda-extension-function-error-type"):
            self._violate(f"{kind} without Lambda-Extension-Function-Error-Type")
            return error(400, "InvalidRequest", "missing Lambda-Extension-Function-Error-Type")
        try:
            report = json.loads(body or b"null")
        except ValueError:
            report = None
        if not isinstance(report, dict):
            self._violate(f"{kind} without a JSON ErrorRequest")
            return error(400, "InvalidRequest", "the body must be an ErrorRequest object")
        if kind == "init_error" and self.init_done:
            self._violate("init/error after Init")
            return error(403, "Extension.Forbidden", "Init is over: report exit/error")
        self.finished = kind
        call.status = 202
        return 202, {"status": "OK"}, {}

    def _register(self, headers: dict[str, str], body: bytes, error: Callable[..., Reply]) -> Reply:
        if self.registered:
            self._violate("a second register")
            return error(403, "Extension.AlreadyRegistered", "this extension is already registered")
        name = headers.get("lambda-extension-name")
        if name != self.name:
            self._violate(f"register as {name!r}, not the file name {self.name!r}")
            return error(400, "InvalidRequest", "Lambda-Extension-Name must be the file name")
        try:
            events = json.loads(body or b"{}").get("events", [])
        except (ValueError, AttributeError):
            events = None
        if not isinstance(events, list) or not set(events) <= {"INVOKE", "SHUTDOWN"}:
            self._violate(f"register for events {events!r}")
            return error(400, "InvalidRequest", "events must be INVOKE and/or SHUTDOWN")
        if "SHUTDOWN" not in events:
            self._violate("an external extension registered without SHUTDOWN")
        self.registered = True
        self.calls[-1].status = 200
        reply = {"functionName": "test", "functionVersion": "$LATEST", "handler": "index.handler"}
        return 200, reply, {"Lambda-Extension-Identifier": self.identifier}


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
async def extension(
    env: dict[str, str], api: FakeExtensionsAPI | None = None
) -> AsyncIterator[Extension]:
    """``python -m burrow.aws.extension`` with ``env`` (and nothing of the test's BURROW_* or
    AWS_*); with ``api``, Lambda's deadlines are enforced on it."""
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
    if api is not None:
        api.kill = lambda: proc.kill() if proc.returncode is None else None
        api.spawned()
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


# --- a network path that can die silently --------------------------------------------------


@dataclass
class StallingProxy:
    """A TCP forwarder between the extension and the relay that can make the connections it
    carries die without a FIN or a RST: ``stall()`` cuts them off from the relay (which sees
    them close) while the extension's side stays open, swallowing what it sends and answering
    nothing, as a NAT that dropped its state or a relay host that vanished would. Connections
    made after ``stall()`` are forwarded normally (the relay, restarted, is reachable again)."""

    upstream: tuple[str, int]
    port: int = 0
    accepted: int = 0
    swallowed: int = 0  # bytes the extension sent into stalled connections
    _server: asyncio.Server | None = None
    _live: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = field(
        default_factory=list
    )
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for down, up, _ in self._live:
            down.transport.abort()
            up.transport.abort()

    def stall(self) -> None:
        for _down, up, stalled in self._live:
            stalled[0] = True
            up.transport.abort()  # the relay's side is gone; the extension is not told

    async def wait_accepted(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout * SCALE):
            while self.accepted < count:
                self._changed.clear()
                await self._changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._changed.set()
        stalled = [False]
        self._live.append((writer, up_writer, stalled))
        for source, sink, downstream in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.ensure_future(self._pipe(source, sink, stalled, downstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        stalled: list[bool],
        to_extension: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if stalled[0]:
                    if not to_extension:
                        self.swallowed += len(data)
                    continue  # dropped on the floor
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        if not stalled[0]:
            sink.transport.abort()
