"""burrow as an AWS Lambda external extension: private services as local ports for the function.

Lambda runs every executable in ``/opt/extensions`` as a process beside the runtime. This one
registers first (Runtime init starts once every extension registered, so it runs in parallel
with ours), starts a connector, waits until each service really answers, and only then asks
for the first event (Init ends when every extension asked). The sandbox is frozen between
invocations and no timer runs while frozen, so the session may be dead on thaw: each INVOKE,
and each connection accepted after a pause, first proves the session alive (reconnecting if
needed) and holds new connections until it is, instead of racing a dead session.

Environment (the function's configuration; Lambda passes it to extensions too):

- ``BURROW_RELAY`` HOST[:PORT] (port 7835); ``BURROW_TOKEN`` or ``BURROW_SECRET``;
  ``BURROW_FINGERPRINT`` (pin), ``BURROW_CA`` (PEM file) or ``BURROW_INSECURE=1`` (plaintext);
  none of them: the system CAs (a relay with a publicly issued certificate). Or the serverless
  relay, ``wss://API.execute-api.REGION.amazonaws.com/STAGE`` with ``BURROW_TOKEN`` (and
  ``BURROW_CA`` at most): its client is imported only then.
- ``BURROW_CONNECT`` ``pg=127.0.0.1:5432,cache=127.0.0.1:6379``: a local listener per service.
- ``BURROW_SOCKS`` HOST:PORT (port 1055): a SOCKS5 proxy; ``BURROW_EXIT`` names the exit for
  HOST:PORT targets; ``BURROW_SOCKS_AUTH`` USER:PASS.
- ``BURROW_READY_TIMEOUT`` (8 s: Init is capped at 10 s) and ``BURROW_CHECK_TIMEOUT`` (5 s,
  the check on each INVOKE) bound the waits.
"""

from __future__ import annotations

import time

#: Taken before the other imports: importing is most of an extension's cold start.
STARTED = time.monotonic()

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TYPE_CHECKING, Any, Protocol, cast  # noqa: E402

from burrow.errors import BurrowError, ConfigError, ConnectError  # noqa: E402

if TYPE_CHECKING:
    from burrow.events import EventSink
    from burrow.net.bridge import StreamBridge
    from burrow.net.proxy_server import ProxyServer
    from burrow.roles.connector import Connector, ConnectorConfig, ListenSpec
    from burrow.roles.settings import ClientSettings

EXTENSION_NAME = "burrow"  # must be the launcher's file name in /opt/extensions
API_VERSION = "2020-01-01"
API_TIMEOUT = 10.0  # register and error reports; never event/next, which blocks by design
MAX_BODY = 1024 * 1024
DEFAULT_SOCKS_PORT = 1055
DEFAULT_READY_TIMEOUT = 8.0
DEFAULT_CHECK_TIMEOUT = 5.0
SHUTDOWN_BUDGET = 1.5  # Lambda gives extensions about 2 s after SHUTDOWN, then SIGKILL
SHUTDOWN_MARGIN = 0.1  # left between closing and SHUTDOWN's deadline, for the exit itself
TICK = 0.25  # how often the pause detector runs
PAUSE_GAP = 1.0  # a tick this late means the sandbox was frozen (or the loop stalled)


class ExtensionAPIError(BurrowError):
    """The Lambda Extensions API could not be reached or answered something unexpected."""


def say(message: str) -> None:
    """One line to the function's log (CloudWatch collects an extension's stderr)."""
    sys.stderr.write(f"burrow extension: {message}\n")
    sys.stderr.flush()


# --- the Extensions API --------------------------------------------------------------------


@dataclass
class ApiResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            raise ExtensionAPIError("the Extensions API sent a body that is not JSON") from None
        if not isinstance(value, dict):
            raise ExtensionAPIError("the Extensions API sent JSON that is not an object")
        return value


class ExtensionsAPI:
    """A minimal HTTP/1.1 client for ``http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension``.

    One connection per call (the API is local, so this costs well under a millisecond) keeps
    the client simple, and asyncio keeps the blocking ``event/next`` cancellable.
    """

    def __init__(self, address: str) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"AWS_LAMBDA_RUNTIME_API {address!r} is not HOST:PORT")
        self.host = host.strip("[]")
        self.port = int(port)
        self.address = address
        self.identifier: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExtensionsAPI:
        address = env.get("AWS_LAMBDA_RUNTIME_API", "")
        if not address:
            raise ConfigError(
                "AWS_LAMBDA_RUNTIME_API is not set: this runs as a Lambda extension "
                "(use `burrow connect` elsewhere)"
            )
        return cls(address)

    async def register(self, events: tuple[str, ...] = ("INVOKE", "SHUTDOWN")) -> str:
        response = await self._call(
            "POST",
            "register",
            {"Lambda-Extension-Name": EXTENSION_NAME},
            {"events": list(events)},
        )
        identifier = response.headers.get("lambda-extension-identifier")
        if response.status != 200 or not identifier:
            raise ExtensionAPIError(
                f"registering with the Extensions API failed: HTTP {response.status} "
                f"{response.body[:200].decode(errors='replace')}"
            )
        self.identifier = identifier
        return identifier

    async def next_event(self) -> dict[str, Any]:
        """Block until the next INVOKE or SHUTDOWN (AWS: no client timeout on this call)."""
        response = await self._call("GET", "event/next", self._id_header(), timeout=None)
        if response.status != 200:
            raise ExtensionAPIError(f"event/next failed: HTTP {response.status}")
        return response.json()

    async def report_error(self, phase: str, exc: BaseException) -> None:
        """POST ``init/error`` or ``exit/error``; a failure to report is logged, not raised."""
        kind = type(exc).__name__
        headers = {**self._id_header(), "Lambda-Extension-Function-Error-Type": f"Extension.{kind}"}
        body = {"errorMessage": str(exc), "errorType": f"Extension.{kind}", "stackTrace": []}
        try:
            response = await self._call("POST", f"{phase}/error", headers, body)
        except ExtensionAPIError as report_exc:
            say(f"could not report the error to Lambda: {report_exc}")
            return
        if response.status >= 300:
            say(f"reporting {phase}/error: HTTP {response.status}")

    def _id_header(self) -> dict[str, str]:
        return {"Lambda-Extension-Identifier": self.identifier or ""}

    async def _call(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = API_TIMEOUT,
    ) -> ApiResponse:
        body = b"" if payload is None else json.dumps(payload).encode()
        target = f"/{API_VERSION}/extension/{path}"
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(method, target, headers, body)
        except TimeoutError:
            raise ExtensionAPIError(
                f"the Extensions API at {self.address} did not answer {path} within {timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise ExtensionAPIError(
                f"cannot reach the Extensions API at {self.address}: {exc.strerror or exc}"
            ) from None

    async def _exchange(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> ApiResponse:
        import h11

        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            conn = h11.Connection(h11.CLIENT)
            fields = [("Host", self.address), ("Connection", "close"), *headers.items()]
            if method != "GET":
                fields += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            out = conn.send(h11.Request(method=method, target=target, headers=fields)) or b""
            if body:
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            writer.write(out)
            await writer.drain()
            status, size = 0, 0
            got: dict[str, str] = {}
            chunks: list[bytes] = []
            while True:  # bounded: MAX_BODY and the peer closing end it
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise ExtensionAPIError(f"bad HTTP from the Extensions API: {exc}") from None
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_BODY:
                        raise ExtensionAPIError("the Extensions API sent an oversized body")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            return ApiResponse(status, got, b"".join(chunks))
        finally:
            writer.close()


# --- settings ------------------------------------------------------------------------------


@dataclass
class Settings:
    client: ClientSettings  # relay, credentials, trust: built as the CLI builds them
    services: list[ListenSpec]
    socks: tuple[str, int] | None = None
    exit_name: str | None = None
    socks_auth: tuple[str, str] | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    serverless: bool = False  # BURROW_RELAY is a wss:// (or ws://) URL


def load_settings(env: Mapping[str, str]) -> Settings:
    """Settings from the environment; ConfigError (one line) for anything a user got wrong."""
    from pathlib import Path

    from burrow.addresses import is_websocket_url, parse_hostport
    from burrow.roles.settings import ClientSettings

    relay_text = env.get("BURROW_RELAY", "").strip()
    if not relay_text:
        raise ConfigError("BURROW_RELAY is not set: give the relay's address HOST[:PORT]")
    services = parse_services(env.get("BURROW_CONNECT", ""))
    socks_text = env.get("BURROW_SOCKS", "").strip()
    socks = parse_hostport(socks_text, DEFAULT_SOCKS_PORT, listen=True) if socks_text else None
    if not services and socks is None:
        raise ConfigError(
            "nothing to do: set BURROW_CONNECT (e.g. pg=127.0.0.1:5432) or BURROW_SOCKS"
        )
    socks_auth = None
    auth_text = env.get("BURROW_SOCKS_AUTH", "")
    if auth_text:
        user, sep, password = auth_text.partition(":")
        if not sep or not user:
            raise ConfigError("BURROW_SOCKS_AUTH expects USER:PASS")
        socks_auth = (user, password)
    ca = env.get("BURROW_CA", "").strip() or None
    client = ClientSettings(
        relay=relay_text,
        secret=env.get("BURROW_SECRET") or None,
        token=env.get("BURROW_TOKEN") or None,
        fingerprint=env.get("BURROW_FINGERPRINT", "").strip() or None,
        ca=Path(ca) if ca else None,
        insecure=_flag(env, "BURROW_INSECURE"),
        trust_default="system",  # trust on first use means nothing in a sandbox that starts afresh
        keep_identity=False,
    )
    if client.insecure and (client.fingerprint or client.ca):
        raise ConfigError("BURROW_INSECURE turns TLS off; unset BURROW_FINGERPRINT/BURROW_CA")
    serverless = is_websocket_url(relay_text)
    if serverless:
        _check_serverless(client, socks)
    client.check()
    return Settings(
        client=client,
        services=services,
        socks=socks,
        exit_name=env.get("BURROW_EXIT") or None,
        socks_auth=socks_auth,
        ready_timeout=_seconds(env, "BURROW_READY_TIMEOUT", DEFAULT_READY_TIMEOUT),
        check_timeout=_seconds(env, "BURROW_CHECK_TIMEOUT", DEFAULT_CHECK_TIMEOUT),
        serverless=serverless,
    )


def _check_serverless(client: ClientSettings, socks: tuple[str, int] | None) -> None:
    """What a serverless relay (``BURROW_RELAY=wss://...``) cannot use, said before dialling."""
    from burrow.aws.serverless.agent import check_url

    check_url(client.relay or "", "BURROW_RELAY")
    if socks is not None:
        raise ConfigError(
            "BURROW_SOCKS needs a burrow relay (HOST:PORT); the serverless relay carries "
            "BURROW_CONNECT's services only"
        )
    if client.secret or not client.token:
        raise ConfigError(
            "a serverless relay takes BURROW_TOKEN (minted with the stack's token key), "
            "not BURROW_SECRET"
        )
    if client.fingerprint or client.insecure:
        name = "BURROW_FINGERPRINT" if client.fingerprint else "BURROW_INSECURE"
        raise ConfigError(
            f"{name} is for a burrow relay (HOST:PORT); a wss:// relay's certificate is "
            "checked against the system's CAs (or BURROW_CA)"
        )


def parse_services(text: str) -> list[ListenSpec]:
    """``NAME=LISTEN,...``; each needs a fixed local address, since the function must know it."""
    from burrow.addresses import parse_hostport
    from burrow.roles.connector import ListenSpec

    specs: list[ListenSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        spec = ListenSpec.parse(item)
        listen = spec.listen
        example = f"{spec.service}=127.0.0.1:5432"
        if not listen:
            raise ConfigError(f"BURROW_CONNECT item {item!r} needs a local address, e.g. {example}")
        if listen.startswith("unix:"):
            if len(listen) == 5:
                raise ConfigError(f"BURROW_CONNECT item {item!r}: unix: needs a path")
        elif listen.isdigit():
            if not 1 <= int(listen) <= 65535:
                raise ConfigError(f"BURROW_CONNECT item {item!r}: port must be 1 to 65535")
        elif parse_hostport(listen, 0, listen=True)[1] == 0:
            raise ConfigError(f"BURROW_CONNECT item {item!r} needs a port, e.g. {example}")
        if any(s.service == spec.service for s in specs):
            raise ConfigError(f"BURROW_CONNECT names {spec.service!r} twice")
        specs.append(spec)
    return specs


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {text!r}") from None
    if not 0 < value <= 900:
        raise ConfigError(f"{name} must be between 0 and 900 seconds")
    return value


# --- the connector -------------------------------------------------------------------------


class FreezeAwareConnector(Protocol):
    """What the lifecycle uses of the connector classes that ``_connector_class`` defines."""

    listeners: dict[str, str]

    @property
    def relay_label(self) -> str: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def wait_failed(self) -> BurrowError: ...
    def check(self, timeout: float | None = None) -> asyncio.Task[BurrowError | None]: ...
    async def wait_services(self, deadline: float) -> BurrowError | None: ...


class _Link(Protocol):
    @property
    def is_open(self) -> bool: ...


class _Checked(Protocol):
    """What ``FreezeGuard`` needs of a connector (both kinds have it)."""

    _closing: bool

    @property
    def conn(self) -> _Link | None: ...
    async def ensure_session(self, timeout: float) -> object: ...
    async def wait_ready(self, service: str, timeout: float) -> None: ...


class FreezeGuard:
    """A connector's defence against freezes, for either kind of relay: after a pause, or
    while the session is down, new connections wait (at most ``check_timeout``) for a check
    of the session and services instead of being refused or bridged onto a dead session.

    A pause is noticed by a tick that comes much too late (no timer runs while the sandbox
    is frozen); each INVOKE starts a check too (``serve``), since the tick may come after the
    function's first connection."""

    def __init__(self, client: _Checked, services: list[str], check_timeout: float) -> None:
        self.client = client
        self.services = services
        self.check_timeout = check_timeout
        self._check_task: asyncio.Task[BurrowError | None] | None = None
        self._last_tick: float | None = None
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_tick = loop.time()
        self._ticker = loop.create_task(self._watch_pauses())

    def stop(self) -> None:
        for task in (self._ticker, self._check_task):
            if task is not None:
                task.cancel()

    def check(self, timeout: float | None = None) -> asyncio.Task[BurrowError | None]:
        """The running check of session and services, or a new one; its result is the error
        that remains when the time is up, or None."""
        if self._check_task is None or self._check_task.done():
            self._check_task = asyncio.get_running_loop().create_task(
                self._check(self.check_timeout if timeout is None else timeout)
            )
        return self._check_task

    async def _check(self, timeout: float) -> BurrowError | None:
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await self.client.ensure_session(timeout)
        except ConnectError as exc:
            return exc
        return await self.wait_services(deadline)

    async def wait_services(self, deadline: float) -> BurrowError | None:
        """Wait until every service answers a probe (retrying: its agent may be reconnecting
        too), until ``deadline`` (loop time)."""
        results = await asyncio.gather(*(self._wait_one(n, deadline) for n in self.services))
        errors = [r for r in results if r is not None]
        if not errors:
            return None
        return ConnectError("; ".join(str(e) for e in errors))

    async def _wait_one(self, name: str, deadline: float) -> BurrowError | None:
        loop = asyncio.get_running_loop()
        delay = 0.02
        last = "no answer"
        while (remaining := deadline - loop.time()) > 0:  # bounded by the deadline
            try:
                await self.client.wait_ready(name, remaining)
                return None
            except ConnectError as exc:
                last = str(exc)
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.5)
        return ConnectError(f"service {name!r} not ready: {last}")

    async def _watch_pauses(self) -> None:
        """Notice a freeze: a tick that comes much too late starts a check at once."""
        loop = asyncio.get_running_loop()
        while not self.client._closing:  # ends with the connector (cancelled by stop)
            before = loop.time()
            await asyncio.sleep(TICK)
            now = loop.time()
            if now - before - TICK > PAUSE_GAP:
                self.check()
            self._last_tick = now

    def should_hold(self) -> bool:
        if self.client._closing:
            return False
        conn = self.client.conn
        if conn is None or not conn.is_open:
            return True
        if self._check_task is not None and not self._check_task.done():
            return True
        last = self._last_tick
        return last is not None and asyncio.get_running_loop().time() - last > PAUSE_GAP + TICK

    async def ready(self) -> None:
        """Return once new streams may be opened: at once, or after a check."""
        if self.should_hold():
            await asyncio.shield(self.check())


def _connector_class(relay: str) -> Callable[..., FreezeAwareConnector]:
    """Defined on demand so that importing this module (and registering) stays cheap; the
    serverless relay's client is imported only for a ``wss://`` relay."""
    from burrow.addresses import is_websocket_url

    if is_websocket_url(relay):
        return _serverless_connector_class()
    return _relay_connector_class()


def _relay_connector_class() -> Callable[..., FreezeAwareConnector]:
    from burrow.roles.connector import Connector

    class LambdaConnector(Connector):
        """A burrow relay's connector that survives freezes (``FreezeGuard``); a connection
        accepted while it checks is paused, and bridged once the check is done."""

        def __init__(
            self,
            config: ConnectorConfig,
            *,
            check_timeout: float,
            on_event: EventSink | None = None,
        ) -> None:
            super().__init__(config, on_event=on_event)
            names = [spec.service for spec in config.services]
            self.guard = FreezeGuard(self, names, check_timeout)

        async def start(self) -> None:
            await super().start()
            self.guard.start()

        async def on_close(self) -> None:
            self.guard.stop()
            await super().on_close()

        def check(self, timeout: float | None = None) -> asyncio.Task[BurrowError | None]:
            return self.guard.check(timeout)

        async def wait_services(self, deadline: float) -> BurrowError | None:
            return await self.guard.wait_services(deadline)

        async def ready_for_streams(self) -> None:
            await self.guard.ready()

        def bridge_transport(
            self,
            transport: asyncio.BaseTransport,
            service: str,
            target: str | None = None,
            *,
            buffered: bytes = b"",
        ) -> StreamBridge | None:
            if not self.guard.should_hold():
                return super().bridge_transport(transport, service, target, buffered=buffered)
            held = cast(asyncio.Transport, transport)
            held.pause_reading()  # nothing is read (or lost) until it has a bridge
            self.check().add_done_callback(
                lambda _task: self._release(held, service, target, buffered)
            )
            return None

        def _release(
            self, transport: asyncio.Transport, service: str, target: str | None, buffered: bytes
        ) -> None:
            if transport.is_closing():
                return
            try:
                transport.resume_reading()  # before the bridge exists: it may pause again
            except RuntimeError:
                pass
            super().bridge_transport(transport, service, target, buffered=buffered)

    return LambdaConnector


def _serverless_connector_class() -> Callable[..., FreezeAwareConnector]:
    from burrow.aws.serverless.agent import ServerlessConfig, ServerlessConnector

    class ServerlessLambdaConnector(ServerlessConnector):
        """The serverless relay's connector that survives freezes (``FreezeGuard``): a
        connection accepted while it checks waits (its bytes in its reader) for the check."""

        def __init__(
            self,
            config: ServerlessConfig,
            *,
            check_timeout: float,
            on_event: EventSink | None = None,
        ) -> None:
            super().__init__(config, on_event=on_event)
            names = [spec.service for spec in config.listen]
            self.guard = FreezeGuard(self, names, check_timeout)

        async def start(self) -> None:
            await super().start()
            self.guard.start()

        async def close(self) -> None:
            self.guard.stop()
            await super().close()

        def check(self, timeout: float | None = None) -> asyncio.Task[BurrowError | None]:
            return self.guard.check(timeout)

        async def wait_services(self, deadline: float) -> BurrowError | None:
            return await self.guard.wait_services(deadline)

        async def ready_for_streams(self) -> None:
            await self.guard.ready()

    return ServerlessLambdaConnector


@dataclass
class Running:
    connector: FreezeAwareConnector
    proxy: ProxyServer | None
    ready_ms: float
    where: list[str]
    phases: str  # where the cold start went, for the ready line
    close_budget: float = SHUTDOWN_BUDGET  # SHUTDOWN's deadline may shorten it

    async def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        await self.connector.close()


async def start(settings: Settings, on_event: EventSink | None = None) -> Running:
    """Connect, listen and wait for every service, within ``ready_timeout``."""
    loop = asyncio.get_running_loop()
    budget = settings.ready_timeout
    deadline = loop.time() + budget
    client = settings.client
    client.connect_timeout = budget
    assert client.relay is not None
    config: Any
    if settings.serverless:
        from burrow.aws.serverless.agent import ServerlessConfig

        config = ServerlessConfig.from_settings(client, [], listen=settings.services)
    else:
        from burrow.roles.connector import ConnectorConfig

        config = client.build(ConnectorConfig, services=settings.services)
    connector = _connector_class(client.relay)(
        config, check_timeout=settings.check_timeout, on_event=on_event
    )
    proxy: ProxyServer | None = None
    marks = [time.monotonic()]
    try:
        try:
            async with asyncio.timeout(budget):
                await connector.start()
        except TimeoutError:
            raise ConnectError(
                f"relay {connector.relay_label} not reached within {budget:.0f} s"
            ) from None
        marks.append(time.monotonic())
        where = [f"{name} on {address}" for name, address in connector.listeners.items()]
        if settings.socks is not None:
            from burrow.net.proxy_server import ProxyServer

            proxy = ProxyServer(
                cast("Connector", connector),
                exit_name=settings.exit_name,
                credentials=settings.socks_auth,
            )
            host, port = settings.socks
            try:
                bound = await proxy.listen("socks", host, port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{port} (BURROW_SOCKS): {exc.strerror or exc}"
                ) from None
            where.append(f"socks on {bound[0]}:{bound[1]}")
        error = await connector.wait_services(deadline)
        if error is not None:
            raise error
    except BaseException:
        if proxy is not None:
            proxy.close()
        await connector.close()
        raise
    marks.append(time.monotonic())
    start_ms, relay_ms, services_ms = (
        (b - a) * 1000 for a, b in zip([STARTED, *marks], marks, strict=False)
    )
    phases = f"start-up {start_ms:.0f}, relay {relay_ms:.0f}, services {services_ms:.0f} ms"
    return Running(connector, proxy, (marks[-1] - STARTED) * 1000, where, phases)


def process_age() -> float | None:
    """Seconds since the kernel started this process (10 ms resolution); None off Linux."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return age if 0 <= age < 3600 else None


_LOGGED_EVENTS = frozenset({"session_lost", "reconnecting", "connected", "warning", "error"})


def log_event(record: dict[str, Any]) -> None:
    """Connector events worth a log line: the ones that explain a failed query."""
    name = record.get("event")
    if name in _LOGGED_EVENTS:
        details = " ".join(f"{k}={v}" for k, v in record.items() if k != "event")
        say(f"{name} {details}")


# --- the lifecycle -------------------------------------------------------------------------


async def run(env: Mapping[str, str]) -> int:
    """Register, start, then serve events until SHUTDOWN; the process's exit code."""
    try:
        api = ExtensionsAPI.from_env(env)
        await api.register()
    except BurrowError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        settings = load_settings(env)
        running = await start(settings, on_event=log_event)
    except BurrowError as exc:
        await api.report_error("init", exc)
        say(f"error: {exc}")
        return exc.exit_code
    except Exception as exc:  # a bug: tell Lambda at once rather than let Init time out
        await api.report_error("init", exc)
        raise
    age = process_age()
    since_process = f", {age * 1000:.0f} ms since process start" if age is not None else ""
    say(
        f"ready in {running.ready_ms:.0f} ms ({running.phases}{since_process}): "
        + ", ".join(running.where)
    )
    try:
        return await serve(api, settings, running, stop)
    finally:
        try:
            async with asyncio.timeout(running.close_budget):
                await running.close()
        except TimeoutError:
            say("closing took too long; exiting anyway")


async def serve(
    api: ExtensionsAPI, settings: Settings, running: Running, stop: asyncio.Event
) -> int:
    """The event loop: each INVOKE re-checks session and services; SHUTDOWN ends it."""
    connector = running.connector
    failed = asyncio.ensure_future(connector.wait_failed())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:  # one iteration per Lambda event; SHUTDOWN, a signal or a failure ends it
            next_event = asyncio.ensure_future(api.next_event())
            done, _ = await asyncio.wait(
                {next_event, failed, stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            if next_event not in done:
                next_event.cancel()
                if failed in done:
                    exc = failed.result()
                    await api.report_error("exit", exc)
                    say(f"error: {exc}")
                    return exc.exit_code
                say("stopped by a signal")
                return 0
            try:
                event = next_event.result()
            except ExtensionAPIError as exc:
                say(f"error: {exc}")
                return exc.exit_code
            kind = event.get("eventType")
            if kind == "SHUTDOWN":
                running.close_budget = _shutdown_budget(event)
                say(f"shutdown ({event.get('shutdownReason', 'no reason given')})")
                return 0
            if kind == "INVOKE":
                error = await connector.check(_invoke_budget(settings, event))
                if error is not None:
                    say(f"invoke {event.get('requestId', '?')}: {error}")
    finally:
        failed.cancel()
        stopped.cancel()


def _shutdown_budget(event: Mapping[str, Any]) -> float:
    """How long closing may take: SHUTDOWN_BUDGET, but done (with a margin for the exit)
    before the event's deadline, after which Lambda sends SIGKILL."""
    deadline_ms = event.get("deadlineMs")
    if not isinstance(deadline_ms, int | float) or isinstance(deadline_ms, bool):
        return SHUTDOWN_BUDGET
    # Lambda sends epoch milliseconds; its documentation's example reads as milliseconds
    # left, so a value too small to be a date is taken that way.
    remaining = deadline_ms / 1000 - (time.time() if deadline_ms > 1e11 else 0.0)
    return max(0.05, min(SHUTDOWN_BUDGET, remaining * 0.75 - SHUTDOWN_MARGIN))


def _invoke_budget(settings: Settings, event: Mapping[str, Any]) -> float:
    """The check's time: BURROW_CHECK_TIMEOUT, but never past the invocation's deadline."""
    budget = settings.check_timeout
    deadline_ms = event.get("deadlineMs")
    if isinstance(deadline_ms, int | float):
        budget = min(budget, deadline_ms / 1000 - time.time() - 0.1)
    return max(0.1, budget)


def main() -> None:
    """``python -m burrow.aws.extension`` (the layer's ``extensions/burrow`` runs this)."""
    sys.exit(asyncio.run(run(os.environ)))


if __name__ == "__main__":
    main()
