"""The exit agent's allow-list: which addresses and ports it may dial for a connector.

Written ``CIDR[:PORTS]``, entries separated by commas, where PORTS is a port, a range
``A-B``, or several of those separated by commas too (a bare number after a comma belongs to
the entry before it, since a number alone is never an address): ``10.0.0.0/8:5432,6379``.
Cloud metadata and link-local addresses are refused unless an entry names them (or a
narrower network inside them) explicitly: ``0.0.0.0/0`` does not open 169.254.169.254, in any
of its IPv6 spellings either (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). The
unspecified addresses (0.0.0.0/8, ::) reach the exit's own host and are refused the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from burrow.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Reachable from inside a VM without a route, and full of credentials: never by accident.
GUARDED: tuple[Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")

_PORTS = re.compile(r"^\d{1,5}(-\d{1,5})?$")


@dataclass(frozen=True)
class Rule:
    network: Network
    ports: tuple[tuple[int, int], ...]  # empty: every port

    def matches(self, address: Address, port: int) -> bool:
        if address.version != self.network.version or address not in self.network:
            return False
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def __str__(self) -> str:
        ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
        return f"{self.network}:{ports}" if ports else str(self.network)


class AllowList:
    """An ordered set of rules; ``check`` says why a target is refused, or None."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> AllowList:
        rules: list[Rule] = []
        for spec in specs:
            for raw in spec.split(","):
                item = raw.strip()
                if not item:
                    continue
                if _PORTS.match(item) and rules:
                    last = rules[-1]
                    rules[-1] = Rule(last.network, (*last.ports, _port_range(item, spec)))
                    continue
                rules.append(_rule(item, spec))
        if not rules:
            raise ConfigError("--allow is empty: name at least one CIDR[:PORTS] the exit may dial")
        return cls(rules)

    def check(self, address: Address | str, port: int, *, shown: str | None = None) -> str | None:
        """None if ``address:port`` may be dialled, else the reason it may not. ``shown`` is
        how the target reads in that reason (the name the connector asked for: what it
        resolved to is the exit's business, not the connector's)."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return f"{shown or address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        target = shown or str(ip)
        matching = [rule for rule in self.rules if rule.matches(ip, port)]
        if not matching:
            return f"{target} port {port} is not in the exit's allow-list"
        for candidate in (ip, *_embedded_ipv4(ip)):
            for guarded in GUARDED:
                if candidate.version != guarded.version or candidate not in guarded:
                    continue
                explicit = any(
                    rule.network.version == guarded.version
                    and rule.network.subnet_of(guarded)  # type: ignore[arg-type]
                    and candidate in rule.network
                    for rule in matching
                )
                if not explicit:
                    return (
                        f"{target} is a link-local, cloud metadata or unspecified address; list "
                        "it explicitly in --allow to reach it"
                    )
        return None

    def __str__(self) -> str:
        return ",".join(str(rule) for rule in self.rules)


def _embedded_ipv4(ip: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may lead to (NAT64, 6to4, Teredo, compatible)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in prefix for prefix in _NAT64):
        found.append(low)
    if ip in _COMPATIBLE and int(ip) > 1:  # ::a.b.c.d, but not :: and ::1
        found.append(low)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _rule(item: str, spec: str) -> Rule:
    network_text, ports_text = item, ""
    if item.startswith("["):
        close = item.find("]")
        if close < 0:
            raise ConfigError(f"--allow {spec!r}: unclosed '[' in {item!r}")
        network_text, rest = item[1:close], item[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"--allow {spec!r}: expected ':PORTS' after ']' in {item!r}")
        ports_text = rest[1:]
    elif item.count(":") == 1:
        network_text, ports_text = item.split(":")
    try:
        network = ipaddress.ip_network(network_text, strict=False)
    except ValueError:
        raise ConfigError(
            f"--allow {spec!r}: {network_text!r} is not a CIDR (e.g. 10.0.0.0/16 or 127.0.0.1)"
        ) from None
    ports = (_port_range(ports_text, spec),) if ports_text else ()
    return Rule(network, ports)


def _port_range(text: str, spec: str) -> tuple[int, int]:
    if not _PORTS.match(text):
        raise ConfigError(f"--allow {spec!r}: {text!r} is not a port or a range like 5000-5100")
    low_text, _, high_text = text.partition("-")
    low, high = int(low_text), int(high_text or low_text)
    if not 1 <= low <= high <= 65535:
        raise ConfigError(f"--allow {spec!r}: ports must be 1-65535, low to high ({text})")
    return low, high
