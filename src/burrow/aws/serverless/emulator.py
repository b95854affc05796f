"""A local serverless relay: the real handlers behind an in-process fake of API Gateway (a
WebSocket API and an HTTP API), Lambda's containers, and moto (DynamoDB, S3) in a thread.

Built to AWS's documented behaviour, since nothing else offline has it (moto's
``post_to_connection`` accepts anything; LocalStack's WebSocket APIs need a paid plan and
Docker):

* WebSocket: ``$connect`` (a non-2xx answer refuses the upgrade with that status),
  ``$disconnect``, ``$default`` events shaped like AWS's; text frames only (a binary frame
  closes with 1003), frames over 32 KB or messages over 128 KB close with 1009; the 10-minute
  idle limit (on what the client sends) and the 2-hour limit close with 1001; ``$default``
  runs one Lambda per message, concurrently, so messages can arrive out of order
  (``reorder`` adds random delays to make it likely).
* ``@connections`` (POST, GET, DELETE): 410 GoneException for ids unknown, closed or not yet
  connected (during ``$connect``); 413 over 128 KB.
* HTTP API, payload format 2.0: lowercase headers, duplicates comma-joined, ``cookies``,
  base64 bodies (for non-text types), a 10 MB request limit (413), Lambda's 6 MB invoke limit
  each way (413 for the request; 500 for a response), the 30 s integration timeout (503).
* Lambda: a pool of containers per function (a cold start makes a new handler object), a
  ``context`` whose remaining time follows the emulator's clock.

The clock (``Clock``) runs at ``speed`` times real time and can jump (``advance``), so the
tests reach the 2-hour limit in a second. It serves ``/_emulator/stats`` and
``/_emulator/advance?seconds=N`` on the management port for tools and tests.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import random
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from burrow.aws.serverless import wsframes
from burrow.aws.serverless.config import Config
from burrow.aws.serverless.gateway import Gateway
from burrow.aws.serverless.handlers import Relay
from burrow.aws.serverless.protocol import AWS_MAX_FRAME, AWS_MAX_MESSAGE
from burrow.aws.serverless.response import is_text
from burrow.errors import BurrowError, ConfigError

log = logging.getLogger("burrow.emulator")

IDLE_LIMIT = 600.0
AGE_LIMIT = 7200.0
WS_TIMEOUT = 29.0  # WebSocket integration timeout
HTTP_TIMEOUT = 30.0  # HTTP API integration timeout
HTTP_MAX_BODY = 10 * 1024 * 1024
LAMBDA_MAX_PAYLOAD = 6 * 1024 * 1024
MAX_HEAD = 16 * 1024
STAGE = "local"
REGION = "us-east-1"
BILLING_UNIT = 32 * 1024


class EmulatorError(BurrowError):
    """The emulator could not start (moto missing, a port in use, ...)."""


class Clock:
    """Emulated time: ``speed`` times real time, plus whatever ``advance`` added."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._start_real = time.monotonic()
        self._start = time.time()
        self._offset = 0.0

    def now(self) -> float:
        return self._start + (time.monotonic() - self._start_real) * self.speed + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def real(self, seconds: float) -> float:
        """Real seconds for ``seconds`` of emulated time."""
        return seconds / self.speed


class _Context:
    """Lambda's context object, on the emulator's clock."""

    def __init__(self, function: str, timeout: float, clock: Clock) -> None:
        self.function_name = function
        self.aws_request_id = str(uuid.uuid4())
        self.memory_limit_in_mb = 256
        self._clock = clock
        self._deadline = clock.now() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - self._clock.now()) * 1000))


class LambdaFunction:
    """One function: containers (handler objects) made on demand and reused when idle."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], Callable[[dict[str, Any], Any], Any]],
        *,
        timeout: float,
        clock: Clock,
        executor: concurrent.futures.ThreadPoolExecutor,
        concurrency: int = 1000,
    ) -> None:
        self.name = name
        self.factory = factory
        self.timeout = timeout
        self.clock = clock
        self.executor = executor
        self.idle: list[Callable[[dict[str, Any], Any], Any]] = []
        self.slots = asyncio.Semaphore(concurrency)
        self.invocations = 0
        self.cold_starts = 0
        self._lock = threading.Lock()

    def _run(self, event: dict[str, Any], context: _Context) -> Any:
        with self._lock:
            handler = self.idle.pop() if self.idle else None
            if handler is None:
                self.cold_starts += 1
        if handler is None:
            handler = self.factory()
        try:
            return handler(event, context)
        finally:
            with self._lock:
                self.idle.append(handler)

    async def invoke(self, event: dict[str, Any]) -> Any:
        """The handler's result; TimeoutError past the function's timeout (emulated time)."""
        self.invocations += 1
        async with self.slots:
            context = _Context(self.name, self.timeout, self.clock)
            future = asyncio.get_running_loop().run_in_executor(
                self.executor, self._run, event, context
            )
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.05)
                if done:
                    return future.result()
                if context.get_remaining_time_in_millis() <= 0:
                    raise TimeoutError(f"{self.name} timed out")


@dataclass
class Stats:
    """What the emulated AWS bills or would: messages (in 32 KB units), calls, operations."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class _WsConnection:
    """One client of the emulated WebSocket API."""

    def __init__(
        self, emulator: Emulator, writer: asyncio.StreamWriter, conn_id: str, source: str
    ) -> None:
        self.emulator = emulator
        self.writer = writer
        self.id = conn_id
        self.source = source
        self.connected = False  # $connect approved and the upgrade answered
        self.closed = False
        self.connected_at = emulator.clock.now()
        self.last_active = self.connected_at
        self.user_agent = ""
        self.close_code: int | None = None
        self._write_lock = asyncio.Lock()

    async def send_message(self, data: bytes) -> None:
        """A message from @connections: split into frames of at most 32 KB, as AWS does."""
        parts = [data[i : i + AWS_MAX_FRAME] for i in range(0, len(data), AWS_MAX_FRAME)] or [b""]
        out = bytearray()
        for i, part in enumerate(parts):
            opcode = wsframes.TEXT if i == 0 else wsframes.CONT
            out += wsframes.encode_frame(opcode, part, fin=i == len(parts) - 1, masked=False)
        async with self._write_lock:
            if self.closed:
                raise ConnectionError("closed")
            self.writer.write(bytes(out))
            await self.writer.drain()

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        with contextlib.suppress(Exception):
            self.writer.write(
                wsframes.encode_frame(
                    wsframes.CLOSE, wsframes.close_payload(code, reason), masked=False
                )
            )
            await self.writer.drain()
        self.writer.close()


class Emulator:
    """See the module docstring. ``start()`` binds and returns; ``close()`` ends all."""

    def __init__(
        self,
        *,
        state_dir: Path,
        ws_listen: tuple[str, int] = ("127.0.0.1", 0),
        http_listen: tuple[str, int] = ("127.0.0.1", 0),
        manage_listen: tuple[str, int] = ("127.0.0.1", 0),
        domain: str = "",
        speed: float = 1.0,
        reorder: bool = False,
        bucket: bool = True,
        deadline: float | None = None,
        concurrency: int = 1000,
        probe_after: float = 2.0,
    ) -> None:
        self.state_dir = state_dir
        self.ws_listen = ws_listen
        self.http_listen = http_listen
        self.manage_listen = manage_listen
        self.domain = domain.lower().strip(".")
        self.clock = Clock(speed)
        self.reorder = reorder
        self.use_bucket = bucket
        self.deadline = deadline
        self.concurrency = concurrency
        self.probe_after = probe_after
        self.stats = Stats()
        self.connections: dict[str, _WsConnection] = {}
        self.ws_url = self.http_url = self.management_url = ""
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ws_tasks: set[asyncio.Task[Any]] = set()
        self._moto: Any = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency + 64)
        self.config: Config | None = None
        self.functions: dict[str, LambdaFunction] = {}

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        from burrow.tokens import TokenKey

        key = TokenKey.load_or_create(self.state_dir)
        await asyncio.get_running_loop().run_in_executor(None, self._start_moto)
        self._servers.append(await self._listen(self._on_ws, self.ws_listen))
        self._servers.append(await self._listen(self._on_http, self.http_listen))
        self._servers.append(await self._listen(self._on_manage, self.manage_listen))
        ws, http, manage = (s.sockets[0].getsockname()[:2] for s in self._servers)
        self.ws_url = f"ws://{_hostport(ws)}/{STAGE}"
        self.http_url = f"http://{_hostport(http)}"
        self.management_url = f"http://{_hostport(manage)}/{STAGE}"
        self.config = self._config(key.secret)
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch())

        def relay_factory() -> Callable[[dict[str, Any], Any], Any]:
            assert self.config is not None
            relay = Relay(self.config, clock=self.clock.now)
            routes = {
                "$connect": relay.connect,
                "$disconnect": relay.disconnect,
                "$default": relay.default,
            }
            config = self.config

            def handle(event: dict[str, Any], context: Any) -> Any:
                route = event["requestContext"]["routeKey"]
                if route == "$connect":
                    from burrow.tokens import load_deny

                    config.deny = load_deny(self.state_dir)
                return routes[route](event, context)

            return handle

        def gateway_factory() -> Callable[[dict[str, Any], Any], Any]:
            assert self.config is not None
            return Gateway(self.config, clock=self.clock.now).handle

        for name, factory, timeout in (
            ("connect", relay_factory, 10.0),
            ("disconnect", relay_factory, 10.0),
            ("default", relay_factory, 10.0),
            ("http", gateway_factory, HTTP_TIMEOUT),
        ):
            self.functions[name] = LambdaFunction(
                name,
                factory,
                timeout=timeout,
                clock=self.clock,
                executor=self._executor,
                concurrency=self.concurrency,
            )

    def _start_moto(self) -> None:
        try:
            import boto3
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise EmulatorError(
                "the emulator needs boto3 and moto: pip install 'burrow[emulator]'"
            ) from None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._moto.start()
        self.moto_url = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(
            aws_access_key_id="emulator", aws_secret_access_key="emulator", region_name=REGION
        )
        self.session = session
        # moto keeps its state per process: names of their own let emulators share it.
        suffix = secrets.token_hex(4)
        self.table = f"burrow-relay-{suffix}"
        self.bucket = f"burrow-answers-{suffix}" if self.use_bucket else ""
        db = session.client("dynamodb", endpoint_url=self.moto_url)
        db.create_table(
            TableName=self.table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        db.update_time_to_live(
            TableName=self.table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
        )
        if self.bucket:
            session.client("s3", endpoint_url=self.moto_url).create_bucket(Bucket=self.bucket)
        # Count what the handlers ask of DynamoDB (each operation is billed).
        session.events.register("before-call.dynamodb", self._count_dynamodb)

    def _count_dynamodb(self, model: Any = None, **_: Any) -> None:
        self.stats.add(f"dynamodb.{model.name if model is not None else '?'}")

    def _config(self, secret: bytes) -> Config:
        from burrow.tokens import load_deny

        config = Config(
            table=self.table,
            key=secret,
            ws_url=self.ws_url,
            management_url=self.management_url,
            domain=self.domain,
            http_url=self.http_url,
            bucket=self.bucket,
            region=REGION,
            session=_EndpointSession(self.session, self.moto_url, self.management_url),
            shared_clients=True,
            probe_after=self.probe_after,
            # The stack's RevokedTokens parameter, played by the state directory's token.deny
            # (``burrow token revoke --state-dir``), read again at each $connect.
            deny=load_deny(self.state_dir),
        )
        if self.deadline is not None:
            config.deadline = self.deadline
        return config

    async def close(self) -> None:
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self.connections.values()):
            await conn.close(wsframes.GOING_AWAY, "emulator stopping")
        if self._ws_tasks:  # let each connection's $disconnect run while moto is up
            await asyncio.wait(list(self._ws_tasks), timeout=5)
        for task in [*self._tasks, *self._ws_tasks]:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._moto is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._moto.stop)

    async def _listen(self, handler: Any, where: tuple[str, int]) -> asyncio.Server:
        try:
            return await asyncio.start_server(handler, where[0], where[1], limit=1 << 20)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {_hostport(where)}: {exc.strerror}") from None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        """The idle and duration limits, on the emulator's clock."""
        while True:
            await asyncio.sleep(0.05)
            now = self.clock.now()
            for conn in list(self.connections.values()):
                if not conn.connected or conn.closed:
                    continue
                if now - conn.connected_at >= AGE_LIMIT:
                    await conn.close(wsframes.GOING_AWAY, "connection duration limit")
                elif now - conn.last_active >= IDLE_LIMIT:
                    await conn.close(wsframes.GOING_AWAY, "idle timeout")

    # --- the WebSocket API ----------------------------------------------------------------------

    async def _on_ws(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._ws_tasks.add(task)
        try:
            await self._ws_session(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._ws_tasks.discard(task)

    async def _ws_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        if len(head) > MAX_HEAD:
            writer.close()
            return
        request_line, headers = _parse_head(head)
        lower = {k.lower(): v for k, v in headers}
        key = lower.get("sec-websocket-key", "")
        if lower.get("upgrade", "").lower() != "websocket" or not key:
            writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        conn_id = base64.b64encode(secrets.token_bytes(12)).decode().replace("/", "_")
        conn = _WsConnection(self, writer, conn_id, str(peer[0]))
        conn.user_agent = lower.get("user-agent", "")
        self.connections[conn_id] = conn
        target = request_line.split(" ")[1] if " " in request_line else "/"
        event = self._ws_event(conn, "$connect", "CONNECT", lower.get("host", ""))
        event["headers"] = {k: v for k, v in headers}
        event["multiValueHeaders"] = {k: [v] for k, v in headers}
        query = dict(parse_qsl(urlsplit(target).query))
        event["queryStringParameters"] = query or None
        try:
            result = await self.functions["connect"].invoke(event)
            status = int((result or {}).get("statusCode", 200))
            body = str((result or {}).get("body") or "")
        except Exception as exc:
            log.warning("$connect failed: %s", exc)
            status, body = 500, json.dumps({"message": "Internal server error"})
        if not 200 <= status < 300:
            self.connections.pop(conn_id, None)
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        writer.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {wsframes.accept_key(key)}\r\n\r\n".encode()
        )
        conn.connected = True
        conn.last_active = self.clock.now()
        self.stats.add("ws.connections")
        try:
            await self._ws_loop(conn, reader, lower.get("host", ""))
        finally:
            conn.closed = True
            self.connections.pop(conn_id, None)
            event = self._ws_event(conn, "$disconnect", "DISCONNECT", lower.get("host", ""))
            event["disconnectStatusCode"] = conn.close_code or 1006
            with contextlib.suppress(Exception):
                await self.functions["disconnect"].invoke(event)
            writer.close()

    async def _ws_loop(self, conn: _WsConnection, reader: asyncio.StreamReader, host: str) -> None:
        parser = wsframes.FrameParser(masked=True, max_frame=AWS_MAX_FRAME)
        assembler = wsframes.Assembler(AWS_MAX_MESSAGE)
        while not conn.closed:
            try:
                data = await reader.read(1 << 16)
            except ConnectionError:
                return
            if not data:
                return
            try:
                for frame in parser.feed(data):
                    if frame.opcode == wsframes.BINARY:
                        raise wsframes.WsError(wsframes.UNSUPPORTED, "binary frames not supported")
                    message = assembler.push(frame)
                    if message is None:
                        continue
                    if message.opcode == wsframes.PING:
                        async with conn._write_lock:
                            conn.writer.write(
                                wsframes.encode_frame(wsframes.PONG, message.data, masked=False)
                            )
                    elif message.opcode == wsframes.CLOSE:
                        await conn.close(wsframes.NORMAL)
                        return
                    elif message.opcode == wsframes.TEXT:
                        conn.last_active = self.clock.now()
                        self.stats.add("ws.in", -(-len(message.data) // BILLING_UNIT) or 1)
                        self.stats.add("ws.in_messages")
                        event = self._ws_event(conn, "$default", "MESSAGE", host)
                        event["body"] = message.data.decode("utf-8", "replace")
                        event["isBase64Encoded"] = False
                        self._spawn(self._default(event))
            except wsframes.WsError as exc:
                self.stats.add(f"ws.closed_{exc.code}")
                await conn.close(exc.code, exc.reason)
                return

    async def _default(self, event: dict[str, Any]) -> None:
        if self.reorder:
            await asyncio.sleep(random.uniform(0, 0.01))
        try:
            await self.functions["default"].invoke(event)
        except Exception as exc:
            log.warning("$default failed: %s", exc)

    def _ws_event(self, conn: _WsConnection, route: str, kind: str, host: str) -> dict[str, Any]:
        now = self.clock.now()
        return {
            "requestContext": {
                "routeKey": route,
                "eventType": kind,
                "messageDirection": "IN",
                "connectionId": conn.id,
                "connectedAt": int(conn.connected_at * 1000),
                "requestTimeEpoch": int(now * 1000),
                "requestId": secrets.token_hex(8),
                "messageId": secrets.token_hex(8) if kind == "MESSAGE" else None,
                "domainName": host,
                "stage": STAGE,
                "apiId": "emulator",
                "identity": {"sourceIp": conn.source, "userAgent": conn.user_agent},
            },
            "isBase64Encoded": False,
        }

    # --- @connections ---------------------------------------------------------------------------

    async def _on_manage(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_h11(reader, writer, self._manage, max_body=AWS_MAX_MESSAGE * 2)

    async def _manage(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, peer: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        path = urlsplit(target).path
        if path.startswith("/_emulator/"):
            return self._control(method, target)
        prefix = f"/{STAGE}/@connections/"
        if not path.startswith(prefix):
            return _json(404, {"message": "Not Found"})
        conn_id = unquote(path[len(prefix) :])
        conn = self.connections.get(conn_id)
        self.stats.add(f"manage.{method}")
        if conn is None or not conn.connected or conn.closed:
            return _json(410, {"message": None}, error="GoneException")
        if method == "POST":
            if len(body) > AWS_MAX_MESSAGE:
                return _json(413, {"message": "Message too long"}, error="PayloadTooLargeException")
            try:
                await conn.send_message(body)
            except (ConnectionError, OSError):
                return _json(410, {"message": None}, error="GoneException")
            self.stats.add("ws.out", -(-len(body) // BILLING_UNIT) or 1)
            self.stats.add("ws.out_messages")
            return 200, [], b""
        if method == "GET":
            return _json(
                200,
                {
                    "connectedAt": _iso(conn.connected_at),
                    "lastActiveAt": _iso(conn.last_active),
                    "identity": {"sourceIp": conn.source, "userAgent": conn.user_agent},
                },
            )
        if method == "DELETE":
            await conn.close(wsframes.NORMAL, "deleted")
            return 204, [], b""
        return _json(405, {"message": "Method Not Allowed"})

    def _control(self, method: str, target: str) -> tuple[int, list[tuple[str, str]], bytes]:
        parts = urlsplit(target)
        if parts.path == "/_emulator/stats":
            snapshot: dict[str, Any] = self.stats.snapshot()
            for name, function in self.functions.items():
                snapshot[f"lambda.{name}"] = function.invocations
                snapshot[f"lambda.{name}.cold"] = function.cold_starts
            return _json(200, snapshot)
        if parts.path == "/_emulator/advance" and method == "POST":
            seconds = float(dict(parse_qsl(parts.query)).get("seconds", "0"))
            self.clock.advance(seconds)
            return _json(200, {"now": self.clock.now()})
        return _json(404, {"message": "Not Found"})

    # --- the HTTP API ---------------------------------------------------------------------------

    async def _on_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await _serve_h11(reader, writer, self._http, max_body=HTTP_MAX_BODY)

    async def _http(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, peer: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        self.stats.add("http.requests")
        event = self.http_event(method, target, headers, body, peer)
        if len(json.dumps(event)) > LAMBDA_MAX_PAYLOAD:
            return _json(413, {"message": "Request Entity Too Large"})
        try:
            result = await self.functions["http"].invoke(event)
        except TimeoutError:
            return _json(503, {"message": "Service Unavailable"})
        except Exception as exc:
            log.warning("the HTTP handler failed: %s", exc)
            return _json(500, {"message": "Internal Server Error"})
        if len(json.dumps(result)) > LAMBDA_MAX_PAYLOAD:
            return _json(500, {"message": "Internal Server Error"})
        return self.http_answer(result)

    def http_event(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, peer: str
    ) -> dict[str, Any]:
        """A payload format 2.0 event, as the HTTP API builds it."""
        parts = urlsplit(target)
        merged: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in headers:
            lower = name.lower()
            if lower == "cookie":
                cookies.extend(c.strip() for c in value.split(";") if c.strip())
                continue
            merged[lower] = f"{merged[lower]},{value}" if lower in merged else value
        merged["x-forwarded-for"] = (
            f"{merged['x-forwarded-for']}, {peer}" if "x-forwarded-for" in merged else peer
        )
        merged["x-forwarded-proto"] = "http"
        merged["x-forwarded-port"] = str(self.http_listen[1])
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query[key] = f"{query[key]},{value}" if key in query else value
        text = is_text(
            [
                ("content-type", merged.get("content-type", "")),
                ("content-encoding", merged.get("content-encoding", "")),
            ]
        )
        encoded = bool(body) and not text
        if not encoded:
            try:
                body_text = body.decode("utf-8")
            except UnicodeDecodeError:
                encoded = True
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": parts.path,
            "rawQueryString": parts.query,
            "headers": merged,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "emulator",
                "domainName": merged.get("host", "").split(":")[0],
                "domainPrefix": merged.get("host", "").split(".")[0],
                "http": {
                    "method": method,
                    "path": parts.path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": peer,
                    "userAgent": merged.get("user-agent", ""),
                },
                "requestId": secrets.token_hex(8),
                "routeKey": "$default",
                "stage": "$default",
                "timeEpoch": int(self.clock.now() * 1000),
            },
            "isBase64Encoded": encoded,
        }
        if cookies:
            event["cookies"] = cookies
        if query:
            event["queryStringParameters"] = query
        if body:
            event["body"] = base64.b64encode(body).decode() if encoded else body_text
        return event

    @staticmethod
    def http_answer(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        """A payload format 2.0 response as the HTTP API turns it into HTTP."""
        if not isinstance(result, dict) or "statusCode" not in result:
            data = json.dumps(result).encode()
            return 200, [("content-type", "application/json")], data
        headers = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
        headers += [("set-cookie", str(c)) for c in result.get("cookies") or []]
        body = result.get("body") or ""
        data = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
        return int(result["statusCode"]), headers, data


class _EndpointSession:
    """A boto3 session whose clients reach moto, except the @connections API (the
    emulator's own); clients are shared by every container (they are thread-safe)."""

    def __init__(self, session: Any, moto_url: str, management_url: str) -> None:
        self.session = session
        self.moto_url = moto_url
        self.management_url = management_url
        self.events = session.events

    def client(self, service: str, **options: Any) -> Any:
        if service != "apigatewaymanagementapi":
            options["endpoint_url"] = self.moto_url
        return self.session.client(service, **options)


# --- a small HTTP/1.1 server -------------------------------------------------------------------

Handler = Callable[
    [str, str, list[tuple[str, str]], bytes, str],
    Any,
]


async def _serve_h11(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler, *, max_body: int
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    peer = str((writer.get_extra_info("peername") or ("127.0.0.1", 0))[0])
    try:
        while True:
            event = await _next(conn, reader)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            too_big = False
            if conn.they_are_waiting_for_100_continue:  # curl's Expect: 100-continue
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            while True:
                part = await _next(conn, reader)
                if isinstance(part, h11.Data):
                    if len(body) + len(part.data) > max_body:
                        too_big = True
                    else:
                        body += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return
            headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()
            ]
            if too_big:
                status, out_headers, data = _json(413, {"message": "Request Entity Too Large"})
            else:
                status, out_headers, data = await handle(
                    event.method.decode(),
                    event.target.decode("latin-1"),
                    headers,
                    bytes(body),
                    peer,
                )
            response_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
            response_headers.append(("content-length", str(len(data))))
            writer.write(conn.send(h11.Response(status_code=status, headers=response_headers)))
            if data and event.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=data)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE or too_big:
                return
            conn.start_next_cycle()
    except (
        h11.ProtocolError,
        ConnectionError,
        asyncio.IncompleteReadError,
        asyncio.CancelledError,
    ):
        return
    finally:
        writer.close()


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(1 << 16)
            conn.receive_data(data)
            continue
        return event


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _json(status: int, body: Any, error: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [("content-type", "application/json")]
    if error:
        headers.append(("x-amzn-ErrorType", error))
    return status, headers, json.dumps(body).encode()


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _hostport(address: tuple[Any, ...]) -> str:
    host = str(address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


# --- running it in a thread (tests, the bench) -------------------------------------------------


class EmulatorThread:
    """An emulator on its own event loop in a thread, so the agents under test (and their
    CPU) stay apart from it; ``with EmulatorThread(...) as emulator:``."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="emulator")

    def __enter__(self) -> Emulator:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        assert self.emulator is not None
        return self.emulator

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.emulator = Emulator(**self.options)
            try:
                await self.emulator.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.emulator.close()

        asyncio.run(run())
