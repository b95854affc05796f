"""Where a function's environment points at the developer's machine, and how to rewrite it.

A deployed function configured for local development names its resources in many spellings:
URLs (``postgres://app:pw@localhost:5432/app``, ``http://127.0.0.1:8000``), JDBC and Go DSNs
(``jdbc:postgresql://localhost/app``, ``app:pw@tcp(localhost:3306)/app``), keyword DSNs
(``host=localhost port=5432 dbname=app``, ``Server=localhost,1433;Database=app``), and host and
port split over two variables (``DB_HOST=localhost`` with ``DB_PORT=5432``). ``scan`` finds each
reference with the exact place of its host and port in the values, so that ``rewrite`` changes
those characters and nothing else: a connection string keeps its password, options and quoting.

Sans-I/O: strings in, references and strings out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "LOCAL_HOSTS",
    "MAX_VALUE",
    "Note",
    "Reference",
    "Scan",
    "rewrite",
    "scan",
]

#: Host spellings that mean "this machine" to a developer's configuration.
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]", "::1", "host.docker.internal"})
#: Longer values are not scanned (Lambda allows 4 KB for all variables together).
MAX_VALUE: Final = 16 * 1024
#: Most variables scanned in one environment.
MAX_VARIABLES: Final = 1000

#: The port a URL means when it names none, by scheme (the last part of ``jdbc:postgresql``,
#: the first of ``postgresql+psycopg``).
SCHEME_PORTS: Final[Mapping[str, int]] = {
    "postgres": 5432,
    "postgresql": 5432,
    "pgsql": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "redis": 6379,
    "rediss": 6379,
    "valkey": 6379,
    "mongodb": 27017,
    "amqp": 5672,
    "amqps": 5671,
    "nats": 4222,
    "memcached": 11211,
    "http": 80,
    "https": 443,
    "ws": 80,
    "wss": 443,
}

#: A host variable without a port variable: the port its prefix implies (PGHOST, REDIS_HOST).
PREFIX_PORTS: Final = (
    (re.compile(r"^(PG|POSTGRES)", re.I), 5432),
    (re.compile(r"^(MYSQL|MARIADB)", re.I), 3306),
    (re.compile(r"^(REDIS|VALKEY)", re.I), 6379),
    (re.compile(r"^MONGO", re.I), 27017),
)

_HOST_ALTERNATIVES = r"localhost|127\.0\.0\.1|\[::1\]|host\.docker\.internal"
#: A local host inside a value, with its port if one follows; not part of a longer name
#: (``mylocalhost``, ``127.0.0.10``, ``localhost.example``).
_INLINE: Final = re.compile(
    rf"(?<![A-Za-z0-9._\-\]])(?P<host>{_HOST_ALTERNATIVES})"
    r"(?::(?P<port>[0-9]{1,5}))?(?![A-Za-z0-9_\-]|\.[A-Za-z0-9])"
)
_SCHEME: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://[^\s\"'<>]*$")
#: ``key=value`` with whitespace between pairs (libpq) and optional single quotes.
_LIBPQ_PAIR: Final = re.compile(r"\s*(?P<key>[A-Za-z_]+)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|\S+)")
_HOST_KEYS_LIBPQ: Final = frozenset({"host", "hostaddr"})
_HOST_KEYS_ADO: Final = frozenset(
    {"host", "server", "data source", "address", "addr", "network address", "hostname"}
)
_PAIR_HOST_KEY: Final = re.compile(r"^(?P<prefix>.*?)(?P<word>HOSTNAME|HOST|SERVER|ADDR|ADDRESS)$")
_ADO_HOST_VALUE: Final = re.compile(
    rf"^(?P<lead>\s*(?:tcp:)?)(?P<host>{_HOST_ALTERNATIVES}|::1)"
    r"(?:(?P<sep>[:,])(?P<port>[0-9]{1,5}))?\s*$",
    re.I,
)

Form = Literal["url", "dsn", "pair"]


@dataclass(frozen=True)
class Reference:
    """One place where a value names a local host and port.

    ``host_span`` and ``port_span`` are character ranges in ``env[key]`` and
    ``env[port_key or key]``; ``port_span`` is None when the port is implied (a URL's scheme,
    libpq's default, a prefix like PGHOST), and then ``port_key`` says where a port would go
    for a pair (a variable to add).
    """

    key: str
    host: str
    port: int
    form: Form
    host_span: tuple[int, int]
    port_key: str | None = None
    port_span: tuple[int, int] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,) if self.port_key in (None, self.key) else (self.key, str(self.port_key))

    @property
    def is_ipv6(self) -> bool:
        return self.host in ("[::1]", "::1")

    def describe(self) -> str:
        where = self.key if self.port_key in (None, self.key) else f"{self.key}+{self.port_key}"
        return f"{where}: {self.host}:{self.port}"


@dataclass(frozen=True)
class Note:
    """A local host the scan saw but cannot turn into a reference (no port), and why."""

    key: str
    message: str


@dataclass
class Scan:
    references: list[Reference] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def ports(self) -> set[int]:
        return {ref.port for ref in self.references}


def _valid_port(text: str) -> int | None:
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _is_local(text: str) -> bool:
    return text.lower() in LOCAL_HOSTS


def scan(env: Mapping[str, str]) -> Scan:
    """Every reference to a local host:port in ``env``, each variable scanned once, in order."""
    result = Scan()
    claimed: dict[str, list[tuple[int, int]]] = {}
    items = sorted(env.items())[:MAX_VARIABLES]
    for key, value in items:
        if not isinstance(value, str) or len(value) > MAX_VALUE:
            if isinstance(value, str) and _INLINE.search(value[:MAX_VALUE]):
                result.notes.append(Note(key, f"longer than {MAX_VALUE} bytes; not scanned"))
            continue
        spans = claimed.setdefault(key, [])
        for ref in _scan_dsn(key, value):
            result.references.append(ref)
            spans.append(ref.host_span)
        _scan_inline(key, value, spans, result)
    _scan_pairs(env, items, claimed, result)
    return result


def _inside(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(start <= span[0] and span[1] <= end for start, end in spans)


def _scan_inline(key: str, value: str, claimed: list[tuple[int, int]], result: Scan) -> None:
    for match in _INLINE.finditer(value):
        span = match.span("host")
        if _inside(span, claimed):
            continue
        host = match["host"]
        if match["port"] is not None:
            port = _valid_port(match["port"])
            if port is None:
                result.notes.append(Note(key, f"{host}:{match['port']} is not a valid port"))
                continue
            result.references.append(
                Reference(key, host, port, "url", span, port_span=match.span("port"))
            )
            claimed.append(span)
            continue
        scheme = _SCHEME.search(value, 0, span[0])
        if scheme is None:
            continue  # a bare host (NO_PROXY=localhost, ALLOWED_HOSTS): pairs handle DB_HOST
        name = scheme["scheme"].lower().split(":")[-1].split("+")[0]
        default = SCHEME_PORTS.get(name)
        if default is None:
            result.notes.append(Note(key, f"{host} without a port in a {name}:// URL"))
            continue
        result.references.append(Reference(key, host, default, "url", span))
        claimed.append(span)


def _scan_dsn(key: str, value: str) -> list[Reference]:
    """Keyword DSNs: libpq's ``host=... port=...`` or ADO.NET's ``Server=...;Port=...``."""
    if "=" not in value or "://" in value:
        return []
    if ";" in value:
        return _scan_ado(key, value)
    return _scan_libpq(key, value)


def _scan_libpq(key: str, value: str) -> list[Reference]:
    pairs: list[tuple[str, str, tuple[int, int]]] = []
    position = 0
    while position < len(value):  # bounded: each match consumes at least one character
        match = _LIBPQ_PAIR.match(value, position)
        if match is None:
            if value[position:].strip():
                return []  # not a keyword DSN
            break
        text = match["value"]
        start, end = match.span("value")
        if text.startswith("'"):
            start, end, text = start + 1, end - 1, text[1:-1]
        pairs.append((match["key"].lower(), text, (start, end)))
        position = match.end()
    if len(pairs) < 2:
        return []
    host = next(((t, s) for k, t, s in pairs if k in _HOST_KEYS_LIBPQ and _is_local(t)), None)
    if host is None:
        return []
    port_entry = next(((t, s) for k, t, s in pairs if k == "port"), None)
    if port_entry is None:
        return [Reference(key, host[0], 5432, "dsn", host[1])]  # libpq's default
    port = _valid_port(port_entry[0])
    if port is None:
        return []
    return [Reference(key, host[0], port, "dsn", host[1], key, port_entry[1])]


def _scan_ado(key: str, value: str) -> list[Reference]:
    fields: list[tuple[str, str, int]] = []
    offset = 0
    for part in value.split(";"):
        name, sep, text = part.partition("=")
        if sep:
            fields.append((name.strip().lower(), text, offset + len(name) + 1))
        offset += len(part) + 1
    if len(fields) < 2:
        return []
    port_field = next(((t, o) for k, t, o in fields if k == "port"), None)
    for name, text, at in fields:
        if name not in _HOST_KEYS_ADO:
            continue
        match = _ADO_HOST_VALUE.match(text)
        if match is None:
            continue
        host_span = (at + match.start("host"), at + match.end("host"))
        if match["port"] is not None:
            port = _valid_port(match["port"])
            if port is None:
                return []
            port_span = (at + match.start("port"), at + match.end("port"))
            return [Reference(key, match["host"], port, "dsn", host_span, key, port_span)]
        if port_field is not None:
            stripped = port_field[0].strip()
            port = _valid_port(stripped)
            if port is None:
                return []
            begin = port_field[1] + port_field[0].index(stripped)
            port_span = (begin, begin + len(stripped))
            return [Reference(key, match["host"], port, "dsn", host_span, key, port_span)]
        return []
    return []


def _scan_pairs(
    env: Mapping[str, str],
    items: list[tuple[str, str]],
    claimed: dict[str, list[tuple[int, int]]],
    result: Scan,
) -> None:
    for key, value in items:
        if not isinstance(value, str) or len(value) > 300:
            continue
        match = _PAIR_HOST_KEY.match(key.upper())
        stripped = value.strip()
        if match is None or not _is_local(stripped) or claimed.get(key):
            continue
        begin = value.index(stripped)
        host_span = (begin, begin + len(stripped))
        prefix = key[: len(match["prefix"])]
        port_key = _port_key(env, prefix)
        if port_key is not None:
            port_text = env[port_key]
            port = _valid_port(port_text.strip())
            if port is None:
                result.notes.append(Note(port_key, f"{port_text!r} is not a port"))
                continue
            pbegin = port_text.index(port_text.strip())
            result.references.append(
                Reference(
                    key,
                    stripped,
                    port,
                    "pair",
                    host_span,
                    port_key,
                    (pbegin, pbegin + len(port_text.strip())),
                )
            )
            continue
        default = next((p for pattern, p in PREFIX_PORTS if pattern.match(prefix)), None)
        if default is None:
            result.notes.append(
                Note(key, f"{stripped} with no port variable ({prefix}PORT): cannot tell which")
            )
            continue
        result.references.append(
            Reference(key, stripped, default, "pair", host_span, f"{prefix}PORT", None)
        )


def _port_key(env: Mapping[str, str], prefix: str) -> str | None:
    """The variable that holds the port for host variable PREFIX{HOST,...}: PREFIX+PORT in
    the case the environment uses."""
    for candidate in (prefix + "PORT", prefix + "port", prefix + "Port"):
        if candidate in env:
            return candidate
    return None


# --- rewriting -----------------------------------------------------------------------------

#: What a reference becomes: its new host text and port, or None to leave it alone.
Mapper = Callable[[Reference], tuple[str, int] | None]


def rewrite(env: Mapping[str, str], references: list[Reference], mapper: Mapper) -> dict[str, str]:
    """``env`` with each reference's host and port replaced as ``mapper`` says; every other
    character of every value kept. A pair whose port was implied gets its port variable."""
    edits: dict[str, list[tuple[int, int, str]]] = {}
    added: dict[str, str] = {}
    for ref in references:
        target = mapper(ref)
        if target is None:
            continue
        host, port = target
        if host != ref.host:
            edits.setdefault(ref.key, []).append((*ref.host_span, host))
        if port == ref.port:
            continue
        if ref.port_span is not None:
            edits.setdefault(ref.port_key or ref.key, []).append((*ref.port_span, str(port)))
        elif ref.form == "url":
            end = ref.host_span[1]
            edits.setdefault(ref.key, []).append((end, end, f":{port}"))
        elif ref.form == "dsn":
            end = len(env[ref.key])
            edits.setdefault(ref.key, []).append((end, end, f" port={port}"))
        elif ref.port_key is not None:
            added[ref.port_key] = str(port)
    result = dict(env)
    for key, changes in edits.items():
        value = env[key]
        # Right to left, so earlier offsets stay valid; a span edited twice keeps the first.
        last = len(value) + 1
        for start, end, text in sorted(changes, key=lambda c: (c[0], c[1]), reverse=True):
            if end > last:
                continue
            value = value[:start] + text + value[end:]
            last = start
        result[key] = value
    for key, text in added.items():
        result.setdefault(key, text)
    return result
