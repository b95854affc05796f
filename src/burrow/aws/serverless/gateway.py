"""The HTTP handler (HTTP API, payload format 2.0): a visitor's request to the agent holding
the name, the agent's answer back, pushed, never polled.

How the answer reaches this invocation: each container holds its own WebSocket connection to
the relay's WebSocket API (made on its first request, proven with a key derived from the
stack's token key, and kept while the container lives). The request goes to the agent with
PostToConnection, naming this connection and a route MAC; the agent's messages come back
through ``$default``, which checks the MAC and posts them to this connection, where this
handler is waiting on its socket. Bodies never touch DynamoDB; the only read is the name's
connection (cached for a few seconds; a 410 drops it).

Answers: inline up to ``INLINE_LIMIT`` of Lambda response (text bodies as text, others
base64); larger ones the agent uploads to S3 with a presigned PUT this handler gave it, and
the visitor is redirected (307) to a presigned GET of it. A silent stream makes the handler
check the agent's connection (410: the relay's 502 page); the deadline gives a 504 page that
names the tunnel.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from burrow.aws.serverless import protocol
from burrow.aws.serverless.config import Config
from burrow.aws.serverless.handlers import _gone, post
from burrow.aws.serverless.response import is_text
from burrow.aws.serverless.store import Store
from burrow.aws.serverless.wsclient import WsClient, WsClosed, WsRefused
from burrow.http.relaypage import gone_message, not_found_message, offline_message, page

#: Seconds a name's connection is reused without a read. A name that moved meanwhile is
#: safe: the old connection answers 410 to the request's first message, which is then sent
#: again after a fresh read (``_NotDelivered``).
CACHE_SECONDS = 60.0
#: A gateway connection is replaced once it has sent nothing for this long (the idle limit is
#: 10 minutes) or is this old (the limit is 2 hours).
IDLE_REPLACE = 540.0
#: Request headers the gateway sets or that API Gateway's event format makes meaningless.
_DROPPED_REQUEST = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "expect",
        "te",
        "trailer",
        "proxy-connection",
    }
)
_DROPPED_RESPONSE = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "trailer", "upgrade"}
)
_S3_OVERRIDES = {
    "content-type": "ResponseContentType",
    "content-disposition": "ResponseContentDisposition",
    "content-encoding": "ResponseContentEncoding",
    "content-language": "ResponseContentLanguage",
    "cache-control": "ResponseCacheControl",
    "expires": "ResponseExpires",
}


class _NotDelivered(Exception):
    """The request's first message found the agent's connection gone (410)."""


class Failure(Exception):
    """An answer the gateway makes itself: status, title, message."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


class Gateway:
    """The HTTP route, for one container."""

    def __init__(self, config: Config, clock: Any = time.time) -> None:
        self.config = config
        self.clock = clock
        self.route_key = protocol.derive(config.key, "route")
        self.gateway_key = protocol.derive(config.key, "gateway")
        self.ws: WsClient | None = None
        self.conn = ""
        self._store: Store | None = None
        self._cache: dict[str, tuple[float, bool, str | None]] = {}
        self._prefix = ""

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.client("dynamodb"), self.config.table)
        return self._store

    # --- the entry point ------------------------------------------------------------------------

    def handle(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self._budget(context)
        name = ""
        try:
            name, target = self._route(event)
            return self._relay(event, name, target, deadline, context)
        except Failure as failure:
            return _page_response(failure.status, failure.title, failure.message)

    def _budget(self, context: Any) -> float:
        budget = self.config.deadline
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is not None:
            budget = min(budget, remaining() / 1000.0 - 0.5)
        return max(0.5, budget)

    def _route(self, event: dict[str, Any]) -> tuple[str, str]:
        """The tunnel's name, and the target to ask the agent for (a path prefix stripped
        is remembered for ``X-Forwarded-Prefix``)."""
        self._prefix = ""
        headers = event.get("headers") or {}
        host = str(headers.get("host", "")).lower().split(":")[0]
        path = event.get("rawPath") or "/"
        query = event.get("rawQueryString") or ""
        domain = self.config.domain
        if domain and host.endswith("." + domain):
            name = host[: -len(domain) - 1]
            target = path
        elif path.startswith("/t/"):
            name, _, rest = path[3:].partition("/")
            target = "/" + rest
            self._prefix = f"/t/{name}"
        else:
            where = f"NAME.{domain} or " if domain else ""
            raise Failure(404, "Not found", f"Nothing here: ask for {where}/t/NAME/.")
        if not name or "." in name or len(name) > protocol.MAX_NAME:
            raise Failure(404, "Tunnel not found", not_found_message(name))
        return name, target + ("?" + query if query else "")

    # --- one exchange ---------------------------------------------------------------------------

    def _relay(
        self, event: dict[str, Any], name: str, target: str, deadline: float, context: Any
    ) -> dict[str, Any]:
        try:
            return self._exchange(event, name, target, deadline, self._agent_for(name))
        except _NotDelivered:
            # The name moved (its agent replaced its connection) after we cached it: the
            # request never left, so ask the table and try once more.
            self._cache.pop(name, None)
            try:
                return self._exchange(event, name, target, deadline, self._agent_for(name))
            except _NotDelivered:
                raise Failure(502, "Tunnel offline", offline_message(name)) from None

    def _exchange(
        self, event: dict[str, Any], name: str, target: str, deadline: float, agent: str
    ) -> dict[str, Any]:
        self._ensure_ws(deadline)
        assert self.ws is not None
        stream = secrets.token_hex(8)
        request = _raw_request(event, target, self._prefix)
        method = event.get("requestContext", {}).get("http", {}).get("method", "GET")
        source = event.get("requestContext", {}).get("http", {}).get("sourceIp", "")
        headers = event.get("headers") or {}
        scheme = str(headers.get("x-forwarded-proto", "https")).split(",")[0].strip() or "https"
        mac = protocol.route_mac(self.route_key, self.conn, stream, agent)
        opening: dict[str, Any] = {
            "t": "open",
            "s": stream,
            "k": "http",
            "n": name,
            "w": self.config.inline_limit + protocol.CHUNK,
            "src": [source, 0],
            "sch": scheme[:16],
            "m": method[:32],
            "q": 0,
            "from": self.conn,
            "mac": mac,
        }
        key = ""
        if self.config.bucket:
            key = f"r/{stream}"
            opening["put"] = self.config.client("s3").generate_presigned_url(
                "put_object",
                Params={"Bucket": self.config.bucket, "Key": key},
                ExpiresIn=int(self.config.deadline) + 60,
            )
        exchange = _Exchange(self, name, agent, stream, request)
        exchange.send_first(opening)
        answer = exchange.wait(deadline)
        if answer.big:
            return self._redirect(answer, key)
        return answer.response(self.config.inline_limit)

    def _agent_for(self, name: str) -> str:
        now = self.clock()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > time.monotonic():
            held, conn = cached[1], cached[2]
        else:
            held, conn = self.store.lookup(f"http#{name}", now)
            if held and conn:
                self._cache[name] = (time.monotonic() + CACHE_SECONDS, held, conn)
        if not held:
            raise Failure(404, "Tunnel not found", not_found_message(name))
        if not conn:
            raise Failure(502, "Tunnel offline", offline_message(name))
        return conn

    def forget(self, name: str, agent: str) -> None:
        """``agent``'s connection is gone (410): drop it from the cache and from the name, so
        the next visitor gets the offline page at once; the name waits for its agent."""
        self._cache.pop(name, None)
        self.store.release(f"http#{name}", agent, self.clock())

    def _ensure_ws(self, deadline: float) -> None:
        ws = self.ws
        now = time.monotonic()
        if (
            ws is not None
            and ws.alive()
            and now - ws.last_sent < IDLE_REPLACE
            and now - ws.opened_at < protocol.MAX_AGE
        ):
            return
        if ws is not None:
            ws.close()
            self.ws = None
        host = urlsplit(self.config.ws_url).netloc
        timestamp = int(time.time())
        proof = protocol.gateway_proof(self.gateway_key, host, timestamp, secrets.token_hex(16))
        # As long as the visitor may wait (a burst of cold containers connects at once).
        budget = max(1.0, min(10.0, deadline - time.monotonic()))
        try:
            ws = WsClient(self.config.ws_url, {"Authorization": proof}, timeout=budget)
            ws.send_text(protocol.encode({"t": "hello", "v": protocol.VERSION, "role": "gateway"}))
            end = time.monotonic() + budget
            while True:
                text = ws.recv(end - time.monotonic())
                if text is None:
                    raise WsClosed(1006, "no welcome from the relay")
                message = protocol.decode(text)
                if message["t"] == "welcome":
                    break
        except (OSError, WsClosed, WsRefused, protocol.ProtocolError) as exc:
            raise Failure(
                502, "Relay unavailable", f"The relay's WebSocket API is not answering: {exc}"
            ) from None
        self.ws = ws
        self.conn = str(message["conn"])

    def _redirect(self, answer: _Answer, key: str) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": self.config.bucket, "Key": key}
        headers: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in answer.headers:
            lower = name.lower()
            if lower in _S3_OVERRIDES:
                params[_S3_OVERRIDES[lower]] = value
            elif lower == "set-cookie":
                cookies.append(value)
            elif lower not in _DROPPED_RESPONSE and lower != "location":
                headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
        url = self.config.client("s3").generate_presigned_url(
            "get_object", Params=params, ExpiresIn=300
        )
        headers["location"] = url
        headers["cache-control"] = "no-store"
        response: dict[str, Any] = {"statusCode": 307, "headers": headers, "body": ""}
        if cookies:
            response["cookies"] = cookies
        return response


class _Answer:
    """The agent's answer as it arrives."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[list[str]] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.big = False
        self.done = False

    def response(self, limit: int) -> dict[str, Any]:
        body = b"".join(self.parts)
        headers: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in self.headers:
            lower = name.lower()
            if lower == "set-cookie":
                cookies.append(value)
            elif lower not in _DROPPED_RESPONSE:
                headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
        response: dict[str, Any] = {"statusCode": self.status, "headers": headers}
        text = None
        if is_text(self.headers):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        if text is not None:
            response["body"] = text
            response["isBase64Encoded"] = False
        else:
            response["body"] = base64.b64encode(body).decode("ascii")
            response["isBase64Encoded"] = True
        if cookies:
            response["cookies"] = cookies
        if len(json.dumps(response)) > limit:
            raise Failure(
                502,
                "Response too large",
                f"The answer is {len(body)} bytes, more than the serverless relay returns "
                "inline, and the agent did not upload it.",
            )
        return response


class _Exchange:
    """One request on its stream: the request out (as the agent's credit allows), the answer
    in (reassembled in order), the agent watched while it is silent."""

    def __init__(
        self, gateway: Gateway, name: str, agent: str, stream: str, request: bytes
    ) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.name = name
        self.agent = agent
        self.stream = stream
        self.request = request
        self.sent = 0
        self.seq = 0
        self.credit = protocol.INITIAL_WINDOW
        self.order = protocol.Reorder()
        self.answer = _Answer()
        self.mac = protocol.route_mac(gateway.route_key, gateway.conn, stream, agent)

    def _post(self, message: dict[str, Any]) -> None:
        message.setdefault("from", self.gateway.conn)
        message.setdefault("mac", self.mac)
        try:
            ok = post(self.config, self.agent, protocol.encode(message))
        except Exception as exc:
            raise Failure(502, "Relay error", f"Cannot reach the tunnel's agent: {exc}") from None
        if not ok:
            self.gateway.forget(self.name, self.agent)
            if message["t"] == "open":
                raise _NotDelivered
            raise Failure(502, "Tunnel offline", gone_message(self.name))

    def send_first(self, opening: dict[str, Any]) -> None:
        room = min(protocol.data_room(opening), self.credit)
        first = self.request[:room]
        opening["d"] = protocol.b64(first)
        self.sent = len(first)
        self.credit -= len(first)
        opening["fin"] = self.sent >= len(self.request)
        self._post(opening)
        self.seq = 1
        self._send_more()

    def _send_more(self) -> None:
        while self.sent < len(self.request) and self.credit > 0:
            piece = self.request[self.sent : self.sent + min(protocol.CHUNK, self.credit)]
            self.sent += len(piece)
            self.credit -= len(piece)
            self._post(
                {
                    "t": "data",
                    "s": self.stream,
                    "q": self.seq,
                    "d": protocol.b64(piece),
                    "fin": self.sent >= len(self.request),
                }
            )
            self.seq += 1

    def wait(self, deadline: float) -> _Answer:
        ws = self.gateway.ws
        assert ws is not None
        quiet_since = time.monotonic()
        probe_after = self.config.probe_after
        while not self.answer.done:
            now = time.monotonic()
            if now >= deadline:
                self._reset("timeout", "the visitor's deadline passed")
                raise Failure(
                    504,
                    "Gateway Timeout",
                    f"The tunnel {self.name!r} did not answer within {self.config.deadline:g} s.",
                )
            wait = min(deadline - now, quiet_since + probe_after - now, 1.0)
            try:
                text = ws.recv(max(0.0, wait))
            except WsClosed as exc:
                self.gateway.ws = None
                raise Failure(
                    502, "Relay connection lost", f"The relay's connection ended: {exc}"
                ) from None
            if text is None:
                if time.monotonic() - quiet_since >= probe_after:
                    self._probe()
                    quiet_since = time.monotonic()
                    probe_after = min(probe_after * 2, 8.0)
                continue
            try:
                message = protocol.decode(text)
            except protocol.ProtocolError:
                continue
            if message.get("s") != self.stream:
                self._stray(message)
                continue
            quiet_since = time.monotonic()
            self._on(message)
        return self.answer

    def _on(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if message.get("from") != self.agent:
            return
        if kind == "credit":
            self.credit += message["n"]
            self._send_more()
            return
        if kind == "reset":
            why = message.get("why") or message["code"]
            if message["code"] == "too_large":
                raise Failure(502, "Response too large", why)
            raise Failure(
                502,
                "Tunnel offline" if message["code"] == "gone" else "Bad Gateway",
                f"The tunnel {self.name!r} could not answer: {why}",
            )
        if kind not in protocol.SEQUENCED:
            return
        try:
            ready = self.order.push(message)
        except protocol.ProtocolError as exc:
            raise Failure(502, "Bad Gateway", f"The tunnel's answer broke: {exc}") from None
        answer = self.answer
        for item in ready:
            if item["t"] == "head":
                answer.status = item["st"]
                answer.headers = item["h"]
                answer.big = bool(item.get("big"))
            elif item["t"] == "stored":
                answer.size = item["size"]
            data = protocol.payload(item)
            if data:
                answer.parts.append(data)
                answer.size += len(data)
                if answer.size > self.config.inline_limit:
                    self._reset("too_large", "over the inline limit")
                    raise Failure(502, "Response too large", "The answer is too large.")
            if item.get("fin"):
                if not answer.status:
                    raise Failure(502, "Bad Gateway", "The tunnel ended without an answer.")
                answer.done = True

    def _stray(self, message: dict[str, Any]) -> None:
        """A message for an earlier stream (its visitor gave up): tell its sender to stop."""
        sender, mac = message.get("from"), message.get("mac")
        if message["t"] in ("reset", "credit", "pong", "welcome", "error") or not (
            isinstance(sender, str) and isinstance(mac, str)
        ):
            return
        text = protocol.encode(
            {
                "t": "reset",
                "s": message["s"],
                "code": "cancelled",
                "why": "no one waits for it",
                "from": self.gateway.conn,
                "mac": mac,
            }
        )
        try:
            post(self.config, sender, text)
        except Exception:
            pass

    def _reset(self, code: str, why: str) -> None:
        try:
            post(
                self.config,
                self.agent,
                protocol.encode(
                    {
                        "t": "reset",
                        "s": self.stream,
                        "code": code,
                        "why": why,
                        "from": self.gateway.conn,
                        "mac": self.mac,
                    }
                ),
            )
        except Exception:
            pass

    def _probe(self) -> None:
        """Is the agent still connected? (GET @connections: a 410 ends the wait with 502.)"""
        try:
            self.config.client("apigatewaymanagementapi").get_connection(ConnectionId=self.agent)
        except Exception as exc:
            if _gone(exc):
                self.gateway.forget(self.name, self.agent)
                raise Failure(502, "Tunnel offline", gone_message(self.name)) from None


def _raw_request(event: dict[str, Any], target: str, prefix: str = "") -> bytes:
    """The visitor's request as HTTP/1.1 bytes, as the agent's proxy reads them."""
    http = event.get("requestContext", {}).get("http", {})
    method = str(http.get("method", "GET")).upper()
    body_text = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(body_text, validate=True)
        except (binascii.Error, ValueError):
            raise Failure(400, "Bad Request", "The request body is not base64.") from None
    else:
        body = body_text.encode("utf-8")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in (event.get("headers") or {}).items():
        lower = str(name).lower()
        if lower in _DROPPED_REQUEST or lower in ("cookie", "x-forwarded-prefix"):
            continue
        lines.append(f"{lower}: {value}")
    cookies = event.get("cookies") or []
    if cookies:
        lines.append("cookie: " + "; ".join(cookies))
    if prefix:
        lines.append(f"x-forwarded-prefix: {prefix}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head + body


def _page_response(status: int, title: str, message: str) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {
            "content-type": "text/html; charset=utf-8",
            "cache-control": "no-store",
            "server": "burrow",
        },
        "body": page(title, message).decode(),
        "isBase64Encoded": False,
    }
