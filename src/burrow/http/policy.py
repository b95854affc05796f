"""What an HTTP tunnel allows and how it rewrites heads, as pure functions over (method, target,
headers, peer): no streams, no clock, no sockets.

The agent's proxy (``burrow.http.proxy``) calls these per request; a serverless relay that sees
one API Gateway event at a time can call the very same functions, so a policy behaves alike on
both paths. Headers are ``(name, value)`` pairs of bytes (str is accepted on input and encoded
as latin-1, the HTTP/1.1 wire charset); names keep their case and are compared case-blind.

Body framing is not rewritten here: a request whose Content-Length and Transfer-Encoding could be
read two ways (both present, lengths that differ, a last coding other than chunked) is refused
with 400 and its connection closed before it reaches these functions
(``burrow.http.framing.request_framing``), and a response carrying both loses its Content-Length
(``framing.without_length``). One connection serves one host: ``same_host`` tells whether a
later request on it may go on (else 421). Headers that claim to name the client (X-Forwarded-*,
Forwarded, X-Real-IP and its cousins) are the visitor's to invent, so they are dropped and
X-Forwarded-For and X-Real-IP set from the TCP peer, unless ``trust_forwarded`` says a proxy of
the user's own sits in front.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from burrow.errors import ConfigError

Header = tuple[bytes, bytes]
HeaderInput = Iterable[tuple[bytes | str, bytes | str]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest Authorization header we decode; real Basic credentials are far shorter.
MAX_AUTHORIZATION = 4096
#: Longest value accepted in a header rule, so a typo cannot inflate every request.
MAX_RULE_VALUE = 8192
#: Most rules of one kind (CIDRs, credentials, header rules): checks stay cheap per request.
MAX_RULES = 1000

#: Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the next hop's.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
#: Headers that say who the client was; dropped from visitors unless they are trusted. Besides
#: the standard ones, those that CDNs and load balancers set and applications read as the
#: client's address (nginx's real_ip, Akamai, Cloudflare, Fastly, GCP).
CLIENT_ADDRESS = frozenset(
    {
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
    }
)
FORWARDING = (
    frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})
    | CLIENT_ADDRESS
)
#: Forwarding headers passed on as they are when the visitor is a trusted proxy (the others are
#: merged into the ones burrow writes).
_KEPT_WHEN_TRUSTED = FORWARDING - {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
}
#: Never dropped because a peer listed them in Connection (that trick strips framing or Host).
_UNLISTABLE = frozenset({b"host", b"content-length", b"transfer-encoding"})
#: Headers a rule may not add or remove: burrow or h11 owns them.
_RESERVED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"upgrade",
        b"te",
        b"trailer",
    }
)
#: Names that may be hop-by-hop before looking at Connection or the proxy- prefix.
_MAYBE_HOP = HOP_BY_HOP | {b"proxy"}
_NO_TOKENS: frozenset[bytes] = frozenset()
#: Request headers the rewrite may drop or replace.
_REQUEST_TOUCHED = HOP_BY_HOP | FORWARDING | {b"host", b"authorization"}
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_HOST = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:\[\]%-]+$")


@dataclass
class HttpOptions:
    """One HTTP tunnel's settings: where the local service is and what the public side may do.

    Constructing it validates every field (``ConfigError`` with a one-line message naming the
    flag), so a bad flag is reported before the tunnel opens, not on the first request."""

    local: tuple[str, int]
    local_https: bool = False
    local_ca: Path | None = None
    local_insecure: bool = False
    host_header: str = "preserve"  # "preserve" | "rewrite" (to local host:port) | a literal
    basic_auth: list[str] = field(default_factory=list)  # "user:pass" each
    allow: list[str] = field(default_factory=list)  # CIDRs; non-empty means default deny
    deny: list[str] = field(default_factory=list)  # CIDRs; wins over allow
    request_header_add: list[str] = field(default_factory=list)  # "Name: value"
    request_header_remove: list[str] = field(default_factory=list)  # "Name"
    response_header_add: list[str] = field(default_factory=list)
    response_header_remove: list[str] = field(default_factory=list)
    trust_forwarded: bool = False  # keep the visitor's X-Forwarded-* (behind a trusted proxy)
    name: str = ""  # the tunnel's name, recorded on each exchange
    public_url: str = ""  # e.g. "https://demo.example.net", for X-Forwarded-Host fallbacks
    connect_timeout: float = 10.0  # dialling the local service, then 504
    response_timeout: float = 60.0  # local service's response head after the request, then 504

    @classmethod
    def for_local(cls, local: str, *, local_https: bool = False, **options: Any) -> HttpOptions:
        """Options for a local service written as ``PORT``, ``HOST:PORT`` or an http(s) URL
        (the CLI, the config file and the Python API all build them here). Sequences become
        lists and ``None`` means the default."""
        address, https = parse_local(local)
        given: dict[str, Any] = {
            key: list(value) if isinstance(value, list | tuple) else value
            for key, value in options.items()
            if value is not None
        }
        return cls(local=address, local_https=local_https or https, **given)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad value; call again after changing fields."""
        host, port = self.local
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"local address {host!r}:{port!r}: expected HOST and PORT 1-65535")
        if self.local_insecure and self.local_ca is not None:
            raise ConfigError("--local-ca and --local-insecure exclude each other: pick one")
        if (self.local_ca is not None or self.local_insecure) and not self.local_https:
            raise ConfigError("--local-ca/--local-insecure apply only to an https:// local service")
        if self.host_header not in ("preserve", "rewrite") and not _HOST.match(self.host_header):
            raise ConfigError(
                f"--host-header {self.host_header!r}: expected preserve, rewrite or a host name"
            )
        for flag, values in (
            ("--basic-auth", self.basic_auth),
            ("--allow", self.allow),
            ("--deny", self.deny),
            ("--request-header-add", self.request_header_add),
            ("--request-header-remove", self.request_header_remove),
            ("--response-header-add", self.response_header_add),
            ("--response-header-remove", self.response_header_remove),
        ):
            if len(values) > MAX_RULES:
                raise ConfigError(f"{flag}: at most {MAX_RULES} values")
        for credential in self.basic_auth:
            user, sep, password = credential.partition(":")
            if not sep or not user or not password or _BAD_VALUE.search(credential.encode()):
                raise ConfigError(f"--basic-auth {credential!r}: expected USER:PASS")
        for flag, cidrs in (("--allow", self.allow), ("--deny", self.deny)):
            for cidr in cidrs:
                if _parse_network(cidr) is None:
                    raise ConfigError(f"{flag} {cidr!r}: not a CIDR (e.g. 10.0.0.0/8, ::1/128)")
        for flag, rules in (
            ("--request-header-add", self.request_header_add),
            ("--response-header-add", self.response_header_add),
        ):
            for rule in rules:
                _parse_header_rule(flag, rule)
        for flag, names in (
            ("--request-header-remove", self.request_header_remove),
            ("--response-header-remove", self.response_header_remove),
        ):
            for name in names:
                _check_rule_name(flag, name, name)
        if self.public_url:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"--public-url {self.public_url!r}: expected http(s)://HOST")
        for flag, seconds in (
            ("connect timeout", self.connect_timeout),
            ("response timeout", self.response_timeout),
        ):
            if not seconds > 0:
                raise ConfigError(f"{flag} {seconds!r}: expected a positive number of seconds")

    @property
    def local_address(self) -> str:
        """The local service as "host:port", for messages and Host rewriting."""
        return _hostport(*self.local)


def parse_local(text: str) -> tuple[tuple[str, int], bool]:
    """``"3000"``, ``"host:3000"`` or ``"http(s)://host[:port]"`` -> ((host, port), https).

    The forms ngrok accepts for its upstream, so ``burrow http https://localhost:8443`` works."""
    raw = text.strip()
    https = False
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"local service {text!r}: expected PORT, HOST:PORT or http(s)://HOST")
        https = parts.scheme == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError:
            raise ConfigError(f"local service {text!r}: bad port") from None
        return (parts.hostname, port), https
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "localhost", raw
    host = host.strip("[]") or "localhost"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"local service {text!r}: expected PORT, HOST:PORT or http(s)://HOST")
    return (host, int(port_text)), https


# --- access ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denial:
    """A response that ends a request before it reaches the local service."""

    status: int
    reason: str
    headers: list[Header]
    body: bytes


def check_access(options: HttpOptions, peer_ip: str, headers: HeaderInput) -> Denial | None:
    """IP rules on the TCP peer (never a header: anyone can write X-Forwarded-For), then Basic
    auth; ``None`` means go ahead. Deny wins over allow; a non-empty allow list denies the rest."""
    if options.allow or options.deny:
        address = _parse_ip(peer_ip)
        denied = (
            address is None
            or _in_any(address, tuple(options.deny))
            or (bool(options.allow) and not _in_any(address, tuple(options.allow)))
        )
        if denied:
            shown = str(address) if address is not None else (peer_ip or "unknown")
            status, page_headers, body = error_page(
                403, "Forbidden", f"burrow: your address {shown} may not use this tunnel"
            )
            return Denial(status, "Forbidden", page_headers, body)
    if options.basic_auth and not _basic_auth_ok(options.basic_auth, _pairs(headers)):
        status, page_headers, body = error_page(
            401, "Unauthorized", "burrow: this tunnel needs a user name and password"
        )
        page_headers.append((b"WWW-Authenticate", b'Basic realm="burrow", charset="UTF-8"'))
        return Denial(status, "Unauthorized", page_headers, body)
    return None


def _basic_auth_ok(credentials: Sequence[str], headers: list[Header]) -> bool:
    """Compare digests with ``hmac.compare_digest`` against every pair, without stopping early,
    so timing reveals neither which pair nor how much of it matched."""
    value = next((v for n, v in headers if n.lower() == b"authorization"), None)
    if value is None or len(value) > MAX_AUTHORIZATION:
        return False
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_digest = hashlib.sha256(given).digest()
    ok = False
    for credential in credentials:
        expected = hashlib.sha256(credential.encode("utf-8")).digest()
        ok |= hmac.compare_digest(given_digest, expected)
    return ok


def _parse_ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener reports IPv4 visitors this way
    return address


def _parse_network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


@lru_cache(maxsize=256)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(net for net in map(_parse_network, cidrs) if net is not None)


def _in_any(address: IPAddress, cidrs: tuple[str, ...]) -> bool:
    return any(address.version == net.version and address in net for net in _networks(cidrs))


# --- header rewriting ------------------------------------------------------------------------


def rewrite_request_headers(
    options: HttpOptions,
    headers: HeaderInput,
    *,
    peer_ip: str,
    scheme: str,
    public_host: str,
) -> list[Header]:
    """The head the local service sees: hop-by-hop headers dropped (an Upgrade handshake keeps
    ``Upgrade`` and ``Connection: upgrade``), X-Forwarded-* and X-Real-IP set from the TCP peer
    (the visitor's own client-address headers dropped), Host set by ``host_header``, then the
    remove and add rules. Content-Length and Transfer-Encoding pass through: the caller refused
    a request with both (``framing.request_framing``) before calling this, and h11 owns the
    framing of the rest. With Basic auth on, the visitor's Authorization header (the tunnel's
    password) is not passed on."""
    pairs = _pairs(headers)
    # One pass for what the rewrite depends on: Host, Upgrade and the Connection tokens.
    host: bytes | None = None
    has_upgrade = False
    connection: list[bytes] = []
    for name, value in pairs:
        low = name.lower()
        if low == b"host":
            if host is None:
                host = value
        elif low == b"upgrade":
            has_upgrade = True
        elif low == b"connection":
            connection.append(value)
    tokens = _tokens(connection)
    upgrade = has_upgrade and b"upgrade" in tokens
    dropped = tokens - _UNLISTABLE
    original_host = host if host is not None else public_host.encode("latin-1")
    trusted = options.trust_forwarded
    prior: dict[bytes, list[bytes]] = {}  # forwarding headers the visitor sent, by name
    out: list[Header] = []
    for name, value in pairs:
        low = name.lower()
        if low not in _REQUEST_TOUCHED and low not in dropped and not low.startswith(b"proxy"):
            out.append((name, value))  # the common case: passed on as it is
            continue
        if low in FORWARDING:
            if trusted:
                prior.setdefault(low, []).append(value)
                if low in _KEPT_WHEN_TRUSTED:
                    out.append((name, value))
            continue
        if low == b"host" or (low == b"authorization" and options.basic_auth):
            continue
        if _hop_by_hop(low, dropped) and not (upgrade and low == b"upgrade"):
            continue
        out.append((name, value))
    if upgrade:
        out.append((b"Connection", b"upgrade"))

    if options.host_header == "preserve":
        new_host = original_host or options.local_address.encode()
    elif options.host_header == "rewrite":
        new_host = options.local_address.encode()
    else:
        new_host = options.host_header.encode("latin-1")
    out.insert(0, (b"Host", new_host))

    client = _display_ip(peer_ip).encode("latin-1")
    chain = b", ".join(prior.get(b"x-forwarded-for", ()))
    out.append((b"X-Forwarded-For", chain + b", " + client if chain else client))
    proto = prior.get(b"x-forwarded-proto")
    out.append((b"X-Forwarded-Proto", proto[0] if proto else scheme.encode("latin-1")))
    forwarded_host = prior.get(b"x-forwarded-host")
    if forwarded_host or original_host:
        out.append((b"X-Forwarded-Host", (forwarded_host or [original_host])[0]))
    real_ip = prior.get(b"x-real-ip")
    out.append((b"X-Real-IP", real_ip[0] if real_ip else client))

    return _apply_rules(out, options.request_header_remove, options.request_header_add)


def rewrite_response_headers(
    options: HttpOptions, headers: HeaderInput, *, upgrade: bool = False
) -> list[Header]:
    """The head the visitor sees: hop-by-hop headers dropped (a 101 keeps ``Upgrade`` and
    ``Connection: upgrade``; pass ``upgrade=True`` for it), then the remove and add rules."""
    pairs = _pairs(headers)
    lows = [name.lower() for name, _ in pairs]  # once per header, for both passes
    dropped = (
        _tokens([pair[1] for pair, low in zip(pairs, lows, strict=True) if low == b"connection"])
        - _UNLISTABLE
    )
    out = [
        pair
        for pair, low in zip(pairs, lows, strict=True)
        if (low not in _MAYBE_HOP and low not in dropped and not low.startswith(b"proxy-"))
        or (upgrade and low == b"upgrade")
    ]
    if upgrade:
        out.append((b"Connection", b"upgrade"))
    return _apply_rules(out, options.response_header_remove, options.response_header_add)


def same_host(first: bytes, host: bytes) -> bool:
    """Whether a later request's Host names the host a connection's first request named: the
    host part compared case-blind, without port or trailing dot, as the relay routes by it.
    A connection whose Host changes gets 421, so a proxy that pools connections in front of
    the relay can never carry one tenant's requests to another."""
    return first == host or _host_part(first) == _host_part(host)


def _host_part(value: bytes) -> bytes:
    host = value.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal: any port follows the bracket
        return host[: host.find(b"]") + 1] or host
    return host.rsplit(b":", 1)[0].rstrip(b".")


def is_upgrade(headers: HeaderInput) -> bool:
    """An HTTP/1.1 protocol switch (WebSocket): an Upgrade header named in Connection."""
    pairs = _pairs(headers)
    has_upgrade = any(n.lower() == b"upgrade" for n, _ in pairs)
    return has_upgrade and b"upgrade" in _connection_tokens(pairs)


def _hop_by_hop(low: bytes, listed: frozenset[bytes]) -> bool:
    return low in HOP_BY_HOP or low == b"proxy" or low.startswith(b"proxy-") or low in listed


def _connection_tokens(pairs: list[Header]) -> frozenset[bytes]:
    return _tokens([value for name, value in pairs if name.lower() == b"connection"])


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    if not values:
        return _NO_TOKENS
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def _apply_rules(headers: list[Header], remove: list[str], add: list[str]) -> list[Header]:
    """Remove first, then add: ``--remove X --add 'X: 1'`` replaces X."""
    if not remove and not add:
        return headers
    if remove:
        gone = {name.strip().lower().encode("latin-1") for name in remove}
        headers = [(n, v) for n, v in headers if n.lower() not in gone]
    headers.extend(_parse_header_rule("header rule", rule) for rule in add)
    return headers


def _parse_header_rule(flag: str, rule: str) -> Header:
    name, sep, value = rule.partition(":")
    if not sep:
        raise ConfigError(f"{flag} {rule!r}: expected 'NAME: VALUE'")
    raw_value = value.strip().encode("latin-1", "replace")
    _check_rule_name(flag, rule, name)
    if _BAD_VALUE.search(raw_value) or len(raw_value) > MAX_RULE_VALUE:
        raise ConfigError(f"{flag} {rule!r}: the value has a line break or is over 8 KiB")
    return name.strip().encode("latin-1"), raw_value


def _check_rule_name(flag: str, rule: str, name: str) -> None:
    raw = name.strip().encode("latin-1", "replace")
    if not _TOKEN.match(raw):
        raise ConfigError(f"{flag} {rule!r}: {name.strip()!r} is not a header name")
    if raw.lower() in _RESERVED:
        hint = " (use --host-header)" if raw.lower() == b"host" else ""
        raise ConfigError(f"{flag} {rule!r}: burrow manages {name.strip()}{hint}")


def _pairs(headers: HeaderInput) -> list[Header]:
    return [
        (name, value)
        if type(name) is bytes and type(value) is bytes
        else (_bytes(name), _bytes(value))
        for name, value in headers
    ]


def _bytes(text: bytes | str) -> bytes:
    return text.encode("latin-1", "replace") if isinstance(text, str) else bytes(text)


@lru_cache(maxsize=1024)
def _display_ip(text: str) -> str:
    address = _parse_ip(text)
    return str(address) if address is not None else text


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- pages -----------------------------------------------------------------------------------


def error_page(status: int, title: str, detail: str) -> tuple[int, list[Header], bytes]:
    """A small HTML page for a response burrow makes itself (502, 504, 401, ...); it names the
    problem in words, since the visitor cannot see the agent's log."""
    text_title = html.escape(f"{status} {title}")
    body = (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{text_title}</title></head>\n<body>\n<h1>{text_title}</h1>\n"
        f"<p>{html.escape(detail)}</p>\n</body></html>\n"
    ).encode()
    headers: list[Header] = [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
        (b"X-Content-Type-Options", b"nosniff"),
    ]
    return status, headers, body
