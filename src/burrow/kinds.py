"""The service kinds the faces offer, in one table: what ``burrow tcp``/``http``/``exit``
build from flags, ``burrow up`` from ``[[tunnel]]`` tables, and the Python API from arguments.

Each builder takes plain values and returns a ``Service`` (``burrow.roles.services``); the
table maps a ``burrow.toml`` ``kind`` to the builder, so a new kind is a builder and a line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from burrow.config import TunnelSpec, parse_local
from burrow.roles.services import ExitSpec, Service, TcpTunnelSpec


def tcp_service(
    local: str,
    *,
    name: str | None = None,
    port: int | None = None,
    proxy_protocol: str | None = None,
    private: bool = False,
) -> TcpTunnelSpec:
    """A TCP service: a public port on the relay, or (``private``) a name only connectors use."""
    return TcpTunnelSpec(
        local=parse_local(local),
        port=port or None,
        name=name or None,
        proxy_protocol=proxy_protocol,
        private=private,
    )


def http_service(
    local: str, *, name: str | None = None, recorder: Any = None, **options: Any
) -> Service:
    """A web service as NAME.DOMAIN; ``options`` are ``HttpOptions``' (policies, headers)."""
    from burrow.http.policy import HttpOptions
    from burrow.http.service import HttpTunnelSpec

    return HttpTunnelSpec(
        options=HttpOptions.for_local(local, **options),
        name=name.lower() if name else None,
        recorder=recorder,
    )


def exit_service(name: str, allow: Sequence[str]) -> ExitSpec:
    """An exit that dials allow-listed CIDR[:PORTS] targets for connectors."""
    from burrow.allowlist import AllowList

    return ExitSpec(name=name.lower(), allow=AllowList.parse(list(allow)))


def pg_service(
    upstream: str,
    *,
    name: str | None = None,
    private: bool = True,
    ca: Path | None = None,
    server_name: str | None = None,
    insecure: bool = False,
    direct_tls: bool = False,
    users: Sequence[str] = (),
    databases: Sequence[str] = (),
) -> Service:
    """A PostgreSQL server behind pgproxy: verified TLS to it, allow-lists, cancels, logs."""
    from burrow.addresses import parse_hostport
    from burrow.errors import ConfigError
    from burrow.pg.policy import PgPolicy
    from burrow.pg.service import PgService
    from burrow.pg.upstream import PgUpstream

    if ca is not None and not ca.is_file():
        raise ConfigError(f"--upstream-ca {str(ca)!r}: no such file")
    pg_upstream = PgUpstream.create(
        parse_hostport(upstream, 5432),
        ca=ca,
        name=server_name,
        insecure=insecure,
        direct_tls=direct_tls,
    )
    policy = PgPolicy.create(users, databases)
    return PgService(pg_upstream, name=name, policy=policy, private=private)


def _tcp(t: TunnelSpec, base: Path) -> Service:
    return tcp_service(
        t.local,
        name=t.name or None,
        port=t.port,
        proxy_protocol=t.proxy_protocol,
        private=t.kind == "private",
    )


def _http(t: TunnelSpec, base: Path) -> Service:
    return http_service(
        t.local,
        name=t.name or None,
        local_https=t.local_https,
        local_ca=(base / t.local_ca) if t.local_ca else None,
        local_insecure=t.local_insecure,
        host_header=t.host_header,
        basic_auth=t.basic_auth,
        allow=t.allow,
        deny=t.deny,
        request_header_add=t.request_header_add,
        request_header_remove=t.request_header_remove,
        response_header_add=t.response_header_add,
        response_header_remove=t.response_header_remove,
    )


def _exit(t: TunnelSpec, base: Path) -> Service:
    return exit_service(t.name, t.allow)


def _pg(t: TunnelSpec, base: Path) -> Service:
    return pg_service(
        t.local,
        name=t.name.lower() or None,
        private=not t.public,
        ca=(base / t.upstream_ca) if t.upstream_ca else None,
        server_name=t.upstream_name,
        insecure=t.upstream_insecure,
        direct_tls=t.direct_tls,
        users=t.allow_user,
        databases=t.allow_database,
    )


#: ``kind`` in burrow.toml -> how to build its service (``base``: the file's directory).
KINDS: dict[str, Callable[[TunnelSpec, Path], Service]] = {
    "tcp": _tcp,
    "private": _tcp,
    "http": _http,
    "exit": _exit,
    "pg": _pg,
}


def service_from_file(t: TunnelSpec, base: Path) -> Service:
    return KINDS[t.kind](t, base)
