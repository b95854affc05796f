"""The agent's config file (``burrow up -c burrow.toml``) and the address syntax shared with flags.

Every problem surfaces as one ConfigError line that names the file and the key, because the
user's next step is always to open that file and fix that key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from burrow.addresses import DEFAULT_RELAY_PORT, parse_hostport, parse_local, parse_relays
from burrow.addresses import shown as _shown
from burrow.errors import ConfigError

__all__ = [
    "DEFAULT_RELAY_PORT",
    "MAX_CONFIG_BYTES",
    "AgentFile",
    "TunnelSpec",
    "load_agent_config",
    "parse_hostport",
    "parse_local",
]

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a few hundred bytes; anything near this is the wrong file."""
_MAX_NAME = 255

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

# --- the file ------------------------------------------------------------------------------


class TunnelSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One ``[[tunnel]]`` table. ``kind`` is ``tcp`` (a public port), ``private`` (reachable by
    connectors only), ``http`` (a public name) or ``exit`` (dials ``allow``-listed targets).
    A tcp tunnel's ``name`` is filled in as ``tcp-<local>`` when left out; an http tunnel with
    no name gets a random one from the relay."""

    local: str = ""
    kind: Literal["tcp", "private", "http", "exit", "pg"] = "tcp"
    name: str = ""
    port: Port | None = None
    proxy_protocol: Literal["v1", "v2"] | None = None
    # http
    basic_auth: list[str] = msgspec.field(default_factory=list)
    allow: list[str] = msgspec.field(default_factory=list)  # http: visitor CIDRs; exit: targets
    deny: list[str] = msgspec.field(default_factory=list)
    host_header: str = "preserve"
    request_header_add: list[str] = msgspec.field(default_factory=list)
    request_header_remove: list[str] = msgspec.field(default_factory=list)
    response_header_add: list[str] = msgspec.field(default_factory=list)
    response_header_remove: list[str] = msgspec.field(default_factory=list)
    local_https: bool = False
    local_ca: str | None = None
    local_insecure: bool = False
    # pg (local is the database's HOST:PORT)
    public: bool = False
    upstream_ca: str | None = None
    upstream_name: str | None = None
    upstream_insecure: bool = False
    direct_tls: bool = False
    allow_user: list[str] = msgspec.field(default_factory=list)
    allow_database: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here with the tunnel's path; the prefix names the key.
        if self.kind == "exit":
            if self.local:
                raise ValueError("local: an exit dials its allow-list; remove local")
            if not self.name:
                raise ValueError("name: an exit needs the name connectors use")
            if not self.allow:
                raise ValueError("allow: an exit needs CIDR[:PORTS] targets it may dial")
        elif not self.local:
            raise ValueError("local: missing; this key is required")
        elif self.kind != "http":
            try:
                parse_local(self.local)
            except ConfigError as err:
                raise ValueError(f"local: {err}") from None
        if self.kind == "private" and not self.name:
            raise ValueError("name: a private service needs the name connectors use")
        if self.kind == "pg" and not self.public and not self.name:
            raise ValueError("name: a pg service needs the name connectors use (or public)")
        if self.kind != "pg" and (
            self.public or self.upstream_ca or self.allow_user or self.allow_database
        ):
            raise ValueError("public, upstream_ca, allow_user, allow_database: only for pg")
        if self.kind in ("private", "http", "exit", "pg") and self.port is not None:
            raise ValueError(f"port: a {self.kind} tunnel has no public port; remove port")
        if not self.name:
            if self.kind == "tcp":
                self.name = f"{self.kind}-{self.local}"
        elif len(self.name) > _MAX_NAME or not self.name.isprintable() or " " in self.name:
            raise ValueError(
                f"name: {_shown(self.name)} must be 1 to {_MAX_NAME} printable characters "
                "without spaces"
            )

    @property
    def local_addr(self) -> tuple[str, int]:
        """The local service as (host, port); validated when the spec was built."""
        return parse_local(self.local)


class AgentFile(msgspec.Struct, forbid_unknown_fields=True):
    """A whole ``burrow.toml``: where the relay is, how to trust it, and the tunnels to open."""

    relay: str | None = None
    secret: str | None = None
    fingerprint: str | None = None
    ca: str | None = None  # load_agent_config resolves it against the file's directory
    insecure: bool = False
    token: str | None = None
    tunnels: list[TunnelSpec] = msgspec.field(default_factory=list, name="tunnel")

    def __post_init__(self) -> None:
        if self.relay is not None:
            try:
                parse_relays(self.relay)
            except ConfigError as err:
                raise ValueError(f"relay: {err}") from None
        if self.secret == "":
            raise ValueError("secret: is empty; remove the key to connect without a secret")
        if self.fingerprint is not None and (
            not self.fingerprint or any(c.isspace() for c in self.fingerprint)
        ):
            raise ValueError("fingerprint: expected 'sha256:' followed by the relay's digest")
        if self.ca == "":
            raise ValueError("ca: is empty; give the path of a PEM file or remove the key")

    @property
    def relay_addr(self) -> tuple[str, int] | None:
        """The (first) relay as (host, port), or None for an embedded relay on loopback."""
        return None if self.relay is None else parse_relays(self.relay)[0]


# Friendlier wording for msgspec's type errors, by the key they are about.
_EXPECTED = {
    "relay": 'expected a string such as "relay.example.com:7835"',
    "secret": "expected a string",
    "fingerprint": 'expected a string such as "sha256:..."',
    "ca": "expected the path of a PEM file as a string",
    "insecure": "expected true or false",
    "tunnel": "expected [[tunnel]] tables (write [[tunnel]], not [tunnel])",
    "name": "expected a string",
    "kind": 'expected "tcp", "private", "http", "exit" or "pg"',
    "token": "expected a string (from `burrow token issue`)",
    "local": 'expected a string such as "5432" or "db.internal:5432" (quote it)',
    "port": "expected an integer from 1 to 65535",
    "proxy_protocol": 'expected "v1" or "v2"',
}
_AT = re.compile(r"^(.*) - at `\$(.*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")
_MISSING = re.compile(r"^Object missing required field `(.*)`$")


def _describe(err: msgspec.ValidationError) -> str:
    """Turn msgspec's "Expected `int` >= 1 - at `$.tunnel[0].port`" into
    "tunnel[0].port: expected an integer from 1 to 65535"."""
    text = str(err)
    m = _AT.match(text)
    message, path = (m.group(1), m.group(2).lstrip(".")) if m else (text, "")
    where = f"{path}." if path else ""
    if u := _UNKNOWN.match(message):
        return f"{where}{u.group(1)}: unknown key; check its spelling"
    if u := _MISSING.match(message):
        return f"{where}{u.group(1)}: missing; this key is required"
    if message.startswith(("Expected", "Invalid enum value")):
        key = re.sub(r"\[\d+\]$", "", path).rpartition(".")[2]
        expected = _EXPECTED.get(key, message[0].lower() + message[1:])
        return f"{path}: {expected}" if path else expected
    # A ValueError from __post_init__ already starts with the key it is about.
    return f"{where}{message}" if path else message


def _toml_error(err: tomllib.TOMLDecodeError) -> str:
    text = str(err)
    m = re.search(r" \(at line (\d+), column (\d+)\)$", text)
    if m:
        return f"line {m.group(1)}: invalid TOML: {text[: m.start()]} (column {m.group(2)})"
    return f"invalid TOML: {text}"


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass the config path with -c") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than 1 MiB; is this the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def load_agent_config(path: Path) -> AgentFile:
    """Read and validate ``burrow.toml``; raises ConfigError naming the file and the bad key."""
    text = _read(path)
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {_toml_error(err)}") from None
    try:
        conf = msgspec.convert(doc, AgentFile)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{path}: {_describe(err)}") from None
    if not conf.tunnels:
        raise ConfigError(f"{path}: no [[tunnel]] entries; add one")
    if conf.ca is not None:
        # Relative to the config file, so the file works whatever directory burrow runs from.
        ca = path.parent / Path(conf.ca).expanduser()
        if not ca.is_file():
            raise ConfigError(f"{path}: ca: no such file {_shown(str(ca))}")
        conf.ca = str(ca)
    names: dict[str, int] = {}
    ports: dict[int, int] = {}
    for i, tunnel in enumerate(conf.tunnels):
        if (first := names.setdefault(tunnel.name, i)) != i:
            raise ConfigError(
                f"{path}: tunnel[{i}].name: {_shown(tunnel.name)} is already used by "
                f"tunnel[{first}]; give each tunnel its own name"
            )
        if tunnel.port is not None and (first := ports.setdefault(tunnel.port, i)) != i:
            raise ConfigError(
                f"{path}: tunnel[{i}].port: {tunnel.port} is already requested by "
                f"tunnel[{first}]; give each tunnel its own port"
            )
    return conf
