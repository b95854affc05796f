"""Addresses as users write them (``PORT``, ``HOST:PORT``, ``[V6]:PORT``), parsed with one
set of rules for every flag, environment variable and config key. Kept apart from the config
file so that parsing a flag does not load the file's machinery."""

from __future__ import annotations

import ipaddress
import re

from burrow.errors import ConfigError

#: The relay's control port, when an address leaves it out.
DEFAULT_RELAY_PORT = 7835

_MAX_ADDRESS = 300  # 253-byte DNS name + ":65535" + brackets, with room to spare
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_DOTTED = re.compile(r"[0-9.]+")
_DIGITS = re.compile(r"[0-9]{1,5}")


def shown(spec: str) -> str:
    """Quote user input for an error line, cut short so a pasted blob stays one readable line."""
    return repr(spec if len(spec) <= 60 else spec[:57] + "...")


def _port(text: str, lowest: int = 1) -> int | None:
    if not _DIGITS.fullmatch(text):
        return None
    port = int(text)
    return port if lowest <= port <= 65535 else None


def _host(text: str) -> str | None:
    """Validate a host: a name, an IPv4 literal, or a bracketed IPv6 literal (brackets removed).

    All-numeric names are refused unless they are a dotted quad, since the resolver would read
    "7835" or "10.1" as an IPv4 address nobody meant."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return None
        return inner if "%" not in inner else None
    if not text or len(text) > 253 or text[0] in "-." or not _HOST_CHARS.fullmatch(text):
        return None
    if _DOTTED.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return None
    return text


def _split(spec: str) -> tuple[str, str | None]:
    """Split HOST[:PORT], where an IPv6 HOST must be bracketed so its colons are not a port."""
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            return spec, None
        host, rest = spec[: close + 1], spec[close + 1 :]
        if not rest:
            return host, None
        return (host, rest[1:]) if rest.startswith(":") else (spec, None)
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return host, port
    return spec, None


def parse_local(spec: str) -> tuple[str, int]:
    """Parse a tunnel's local service: ``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[V6]:PORT``."""
    bad = ConfigError(f"invalid local address {shown(spec)}: expected PORT or HOST:PORT")
    if len(spec) > _MAX_ADDRESS:
        raise bad
    if _DIGITS.fullmatch(spec):
        port = _port(spec)
        if port is None:
            raise ConfigError(f"invalid local address {shown(spec)}: port must be from 1 to 65535")
        return "127.0.0.1", port
    host_text, port_text = _split(spec)
    if port_text is None:
        raise bad
    host, port = _host(host_text), _port(port_text)
    if host is None:
        raise bad
    if port is None:
        if _DIGITS.fullmatch(port_text):
            raise ConfigError(f"invalid local address {shown(spec)}: port must be from 1 to 65535")
        raise bad
    return host, port


def parse_hostport(spec: str, default_port: int, *, listen: bool = False) -> tuple[str, int]:
    """Parse ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``; a missing port is
    ``default_port`` so users can write just the relay's name. With ``listen``, port 0
    (any free port) is allowed."""
    bad = ConfigError(f"invalid address {shown(spec)}: expected HOST or HOST:PORT")
    if len(spec) > _MAX_ADDRESS:
        raise bad
    host_text, port_text = _split(spec)
    if port_text is None and ":" in host_text and not host_text.startswith("["):
        raise ConfigError(
            f"invalid address {shown(spec)}: put an IPv6 address in brackets, e.g. [::1]:7835"
        )
    host = _host(host_text)
    if host is None:
        raise bad
    if port_text is None:
        return host, default_port
    port = _port(port_text, 0 if listen else 1)
    if port is None:
        if _DIGITS.fullmatch(port_text):
            raise ConfigError(
                f"invalid address {shown(spec)}: port must be from {0 if listen else 1} to 65535"
            )
        raise bad
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_websocket_url(text: str | None) -> bool:
    """Whether a relay address is a WebSocket URL (the serverless relay: ``wss://...``)."""
    return bool(text) and str(text).lower().startswith(("ws://", "wss://"))


#: The most relays one ``--to`` may list.
MAX_RELAYS = 16


def parse_relays(spec: str, default_port: int = DEFAULT_RELAY_PORT) -> list[tuple[str, int]]:
    """``HOST[:PORT][,HOST[:PORT]...]``: the nodes of a cluster, tried in order."""
    parts = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not part for part in parts):
        raise ConfigError(
            f"invalid relay list {shown(spec)}: expected HOST[:PORT], or several separated by "
            "commas (a:7835,b:7835)"
        )
    if len(parts) > MAX_RELAYS:
        raise ConfigError(f"too many relays in {shown(spec)}: at most {MAX_RELAYS}")
    relays = [parse_hostport(part, default_port) for part in parts]
    return list(dict.fromkeys(relays))
