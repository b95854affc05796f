"""What the Lambda handlers need to know, from their environment (the template sets it) or
given directly (the emulator): the table, the token key, the APIs' URLs, the bucket.

boto3 is imported only when a client is first needed, so importing the handlers stays fast;
the clients are made once per container (or shared by the emulator's containers, since
boto3 clients are thread-safe and making a session per container would cost more than the
rest of a request).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from burrow.errors import ConfigError

DEADLINE = 29.0
"""Seconds the HTTP handler waits for an answer before its 504 (HTTP API allows 30)."""
INLINE_LIMIT = 6 * 1024 * 1024 - 16 * 1024
"""Largest Lambda response (its JSON) burrow returns: 6 MB, less room for the runtime."""
LEASE = 900
"""Seconds a name stays held after the last heartbeat renewed it."""
GRACE = 120
"""Seconds a name waits for its agent to reconnect after the connection ended."""


@dataclass
class Config:
    table: str
    key: bytes = field(repr=False)  # the 32-byte token key
    ws_url: str  # wss://API.execute-api.REGION.amazonaws.com/STAGE: the gateway connects here
    management_url: str  # https://API.execute-api.REGION.amazonaws.com/STAGE (@connections)
    domain: str = ""  # tunnels as NAME.DOMAIN (a wildcard custom domain), else /t/NAME/
    http_url: str = ""  # the HTTP API's URL, for /t/NAME/ addresses
    bucket: str = ""  # large responses; empty: none
    deny: frozenset[str] = frozenset()  # revoked token ids
    deadline: float = DEADLINE
    inline_limit: int = INLINE_LIMIT
    probe_after: float = 2.0  # silence on a stream before checking its agent is still there
    region: str = "us-east-1"
    session: Any = None  # a boto3 Session (the emulator's); None: the default one
    shared_clients: bool = False
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        missing = [
            name
            for name in ("BURROW_TABLE", "BURROW_WS_URL", "BURROW_MANAGEMENT_URL")
            if not env.get(name)
        ]
        if missing:
            raise ConfigError(f"the handler's environment lacks {', '.join(missing)}")
        config = cls(
            table=env["BURROW_TABLE"],
            key=b"",
            ws_url=env["BURROW_WS_URL"],
            management_url=env["BURROW_MANAGEMENT_URL"],
            domain=env.get("BURROW_DOMAIN", "").lower().strip("."),
            http_url=env.get("BURROW_HTTP_URL", "").rstrip("/"),
            bucket=env.get("BURROW_BUCKET", ""),
            deny=frozenset(t for t in env.get("BURROW_TOKEN_DENY", "").replace(",", " ").split()),
            deadline=float(env.get("BURROW_DEADLINE", DEADLINE)),
            region=env.get("AWS_REGION", "us-east-1"),
        )
        config.key = config._load_key(env)
        return config

    def _load_key(self, env: dict[str, str]) -> bytes:
        text = env.get("BURROW_TOKEN_KEY", "")
        if not text and env.get("BURROW_TOKEN_KEY_FILE"):
            with open(env["BURROW_TOKEN_KEY_FILE"], encoding="ascii") as handle:
                text = handle.read(256)
        if not text and env.get("BURROW_TOKEN_KEY_SECRET"):
            reply = self.client("secretsmanager").get_secret_value(
                SecretId=env["BURROW_TOKEN_KEY_SECRET"]
            )
            text = reply["SecretString"]
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("the token key must be 64 hex digits (32 bytes)")
        return key

    def client(self, service: str) -> Any:
        """A boto3 client, made once (``apigatewaymanagementapi`` points at this stage)."""
        found = self._clients.get(service)
        if found is not None:
            return found
        with self._lock:
            found = self._clients.get(service)
            if found is None:
                found = self._make(service)
                self._clients[service] = found
        return found

    def _make(self, service: str) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        session = self.session or boto3.session.Session()
        options: dict[str, Any] = {"region_name": self.region}
        retries = {"max_attempts": 2, "mode": "standard"}
        if service == "apigatewaymanagementapi":
            options["endpoint_url"] = self.management_url
        options["config"] = BotoConfig(
            retries=retries,
            connect_timeout=5,
            read_timeout=10,
            max_pool_connections=64,
            signature_version="s3v4" if service == "s3" else None,
        )
        return session.client(service, **options)
