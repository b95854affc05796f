"""The Lambda entry points of the serverless relay.

* ``connect`` (WebSocket ``$connect``): checks the connect proof in ``Authorization``: an
  agent's scoped token (``burrow.tokens``: the same tokens a burrow relay takes, proven with a
  MAC over a fresh transcript, never sent) or the HTTP handler's gateway proof; records the
  connection and its scope. A refusal is a 401/403, so API Gateway refuses the upgrade.
* ``disconnect`` (``$disconnect``): forgets the connection; its names wait ``GRACE`` seconds
  for the agent to come back.
* ``default`` (``$default``): every message a client sends: ``hello`` (an agent claims its
  names, a gateway learns its connection id), ``ping`` (heartbeat, renews names), and stream
  messages for a peer, forwarded after their route MAC checks (no database read).
* ``http`` (the HTTP API, payload format 2.0): ``burrow.aws.serverless.gateway``.

Each function keeps its state (clients, the gateway's WebSocket) in one object per container,
made on first use; the emulator makes one per emulated container.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from burrow.aws.serverless import protocol
from burrow.aws.serverless.config import GRACE, Config
from burrow.aws.serverless.store import Store

if TYPE_CHECKING:
    from burrow.aws.serverless.gateway import Gateway

log = logging.getLogger("burrow.serverless")

OK = {"statusCode": 200}


def _gone(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(code == "GoneException" or status == 410)


class Relay:
    """The WebSocket routes, for one container."""

    def __init__(self, config: Config, clock: Any = time.time) -> None:
        self.config = config
        self.clock = clock
        self.route_key = protocol.derive(config.key, "route")
        self.gateway_key = protocol.derive(config.key, "gateway")
        self._store: Store | None = None
        self._verifier: Any = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.client("dynamodb"), self.config.table)
        return self._store

    def post(self, conn: str, message: dict[str, Any]) -> bool:
        """Send ``message`` to connection ``conn``; False if it is gone (410)."""
        return post(self.config, conn, protocol.encode(message))

    # --- $connect -------------------------------------------------------------------------------

    def connect(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        context_ = event.get("requestContext", {})
        conn = context_.get("connectionId", "")
        host = context_.get("domainName", "")
        headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
        now = self.clock()
        try:
            proof = protocol.parse_proof(headers.get("authorization", ""))
        except protocol.ProtocolError as exc:
            return _refuse(401, f"{exc}: pass --token")
        # The proof is on the client's wall clock; ``self.clock`` is the leases' (the
        # emulator's may run fast), so freshness is judged against this machine's time.
        if abs(proof.timestamp - time.time()) > protocol.PROOF_WINDOW:
            return _refuse(401, "the connect proof is stale: is this machine's clock right?")
        scope: dict[str, Any] = {}
        if proof.role == "gateway":
            if not protocol.check_gateway_proof(self.gateway_key, proof, host):
                return _refuse(403, "the gateway proof does not verify")
        else:
            from burrow.tokens import TokenError, TokenKey, TokenVerifier

            if self._verifier is None:
                self._verifier = TokenVerifier(TokenKey.from_secret(self.config.key))
            self._verifier.deny = self.config.deny
            try:
                granted = self._verifier.verify(
                    proof.claims,
                    proof.mac,
                    protocol.transcript("agent", host, proof.timestamp, proof.nonce),
                    time.time(),
                )
            except TokenError as exc:
                return _refuse(403, str(exc))
            scope = {
                "expose": granted.expose,
                "connect": granted.connect,
                "tid": granted.token_id,
                "sub": granted.subject,
            }
        if not self.store.use_nonce(proof.nonce, now):
            return _refuse(403, "this connect proof was already used")
        self.store.put_connection(conn, proof.role, scope, now)
        return OK

    # --- $disconnect ----------------------------------------------------------------------------

    def disconnect(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        conn = event.get("requestContext", {}).get("connectionId", "")
        item = self.store.delete_connection(conn)
        for key in (item or {}).get("names", []):
            self.store.release(key, conn, self.clock(), GRACE)
        return OK

    # --- $default -------------------------------------------------------------------------------

    def default(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        sender = event.get("requestContext", {}).get("connectionId", "")
        body = event.get("body") or ""
        try:
            message = protocol.decode(body)
        except protocol.ProtocolError as exc:
            self.post(sender, {"t": "error", "code": "bad_message", "msg": str(exc)[:200]})
            return OK
        kind = message["t"]
        if kind == "hello":
            self._hello(sender, message)
        elif kind == "ping":
            now = self.clock()
            for key in message.get("names", [])[: protocol.MAX_TUNNELS]:
                if isinstance(key, str) and len(key) <= 80:
                    self.store.renew(key, sender, now)
            self.post(sender, {"t": "pong", "n": message["n"]})
        elif kind == "open" and "to" not in message:
            self._open_by_name(sender, message)
        elif kind in protocol.STREAM_TYPES:
            self._forward(sender, message)
        return OK

    def _open_by_name(self, sender: str, message: dict[str, Any]) -> None:
        """A connector opens a stream to a private service by name: its token must allow the
        name; the stream goes to the agent holding it (issue 12's TCP streams)."""
        from fnmatch import fnmatchcase

        stream, name = message["s"], message["n"]
        item = self.store.get_connection(sender)
        allowed = item is not None and any(fnmatchcase(name, p) for p in item.get("connect", []))
        if not allowed:
            self.post(
                sender,
                {
                    "t": "reset",
                    "s": stream,
                    "code": "not_allowed",
                    "why": f"this token may not connect to {name!r}",
                },
            )
            return
        held, agent = self.store.lookup(f"svc#{name}", self.clock())
        if not agent:
            why = "its agent is not connected" if held else "no such service"
            self.post(
                sender,
                {"t": "reset", "s": stream, "code": "no_such_tunnel", "why": f"{name!r}: {why}"},
            )
            return
        message["from"] = sender
        message["mac"] = protocol.route_mac(self.route_key, sender, stream, agent)
        if not self.post(agent, message):
            self.post(
                sender,
                {
                    "t": "reset",
                    "s": stream,
                    "code": "unreachable",
                    "why": f"{name!r}: its agent is gone",
                },
            )

    def _hello(self, sender: str, message: dict[str, Any]) -> None:
        if message["role"] == "gateway":
            self.post(sender, {"t": "welcome", "conn": sender})
            return
        item = self.store.get_connection(sender)
        if item is None or item.get("role") != "agent":  # connected with a token
            self.post(sender, _error("not_allowed", "this connection did not connect as one"))
            return
        if message["role"] == "connector":
            self.post(
                sender,
                {"t": "welcome", "conn": sender, "hb": protocol.HEARTBEAT, "age": protocol.MAX_AGE},
            )
            return
        lease = message.get("lease")
        if not isinstance(lease, str):
            self.post(sender, _error("bad_message", "hello: an agent gives its lease"))
            return
        import hashlib
        from fnmatch import fnmatchcase

        owner = hashlib.sha256(lease.encode()).hexdigest()
        now = self.clock()
        held: list[dict[str, Any]] = []
        keys: list[str] = []
        for tunnel in message.get("tunnels", []):
            kind = tunnel["k"]
            asked = tunnel.get("n")
            if asked is not None and not _valid_name(asked):
                self.post(sender, _error("bad_name", f"{asked!r} is not a DNS label"))
                return
            candidates = [asked] if asked else [_random_name() for _ in range(5)]
            namespace = "http" if kind == "http" else "svc"
            allowed = [
                n for n in candidates if any(fnmatchcase(n, p) for p in item.get("expose", []))
            ]
            if not allowed:
                patterns = ", ".join(item.get("expose", [])) or "nothing"
                what = repr(asked) if asked else "a random name (give --name)"
                self.post(
                    sender,
                    _error("not_allowed", f"this token may not expose {what} (it may: {patterns})"),
                )
                return
            name = next(
                (n for n in allowed if self.store.claim(f"{namespace}#{n}", sender, owner, now)),
                None,
            )
            if name is None:
                self.post(
                    sender,
                    _error("name_taken", f"the name {asked!r} is held by another agent"),
                )
                return
            keys.append(f"{namespace}#{name}")
            held.append({"k": kind, "n": name, "url": self.url_for(name, kind)})
        self.store.set_names(sender, keys)
        self.post(
            sender,
            {
                "t": "welcome",
                "conn": sender,
                "tunnels": held,
                "names": keys,
                "hb": protocol.HEARTBEAT,
                "age": protocol.MAX_AGE,
                "inline": self.config.inline_limit,
            },
        )

    def url_for(self, name: str, kind: str) -> str:
        if kind != "http":
            return name
        if self.config.domain:
            # The HTTP API's scheme and port (the emulator's is http on a port of its own).
            from urllib.parse import urlsplit

            parts = urlsplit(self.config.http_url or "https://x")
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{name}.{self.config.domain}{port}"
        return f"{self.config.http_url}/t/{name}/"

    def _forward(self, sender: str, message: dict[str, Any]) -> None:
        stream = message["s"]
        try:
            to = protocol.check_route(self.route_key, message, sender)
        except protocol.ProtocolError as exc:
            if message["t"] != "reset":
                self.post(
                    sender, {"t": "reset", "s": stream, "code": "not_allowed", "why": str(exc)}
                )
            return
        message.pop("to", None)
        message["from"] = sender
        message["mac"] = protocol.route_mac(self.route_key, sender, stream, to)
        if not self.post(to, message) and message["t"] != "reset":
            # The peer is gone (a gateway whose visitor gave up): stop the sender.
            self.post(
                sender,
                {
                    "t": "reset",
                    "s": stream,
                    "code": "gone",
                    "why": "the other side is gone",
                    "from": to,
                    "mac": protocol.route_mac(self.route_key, to, stream, sender),
                },
            )


def post(config: Config, conn: str, text: str) -> bool:
    """PostToConnection; False on 410 Gone (not connected yet, or no more)."""
    try:
        config.client("apigatewaymanagementapi").post_to_connection(
            ConnectionId=conn, Data=text.encode("ascii")
        )
    except Exception as exc:
        if _gone(exc):
            return False
        raise
    return True


def _refuse(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "body": json.dumps({"message": message})}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"t": "error", "code": code, "msg": message[: protocol.MAX_TEXT]}


def _valid_name(name: str) -> bool:
    from burrow.roles.names import NAME_PATTERN

    return bool(NAME_PATTERN.fullmatch(name))


def _random_name() -> str:
    from burrow.roles.names import readable_name

    return readable_name()


# --- the entry points Lambda calls -------------------------------------------------------------

_relay: Relay | None = None
_gateway: Gateway | None = None


def _the_relay() -> Relay:
    global _relay
    if _relay is None:
        _relay = Relay(Config.from_env())
    return _relay


def connect(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _the_relay().connect(event, context)


def disconnect(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _the_relay().disconnect(event, context)


def default(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _the_relay().default(event, context)


def http(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _gateway
    if _gateway is None:
        from burrow.aws.serverless.gateway import Gateway

        _gateway = Gateway(Config.from_env())
    return _gateway.handle(event, context)
