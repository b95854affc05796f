"""Connectors: ``burrow connect`` (private services as local ports) and ``burrow socks`` (a
SOCKS5 / HTTP CONNECT proxy to private services and exits)."""

from __future__ import annotations

from typing import Any

import click

from burrow.addresses import parse_hostport
from burrow.cli.common import (
    client_options,
    client_settings,
    fail,
    main,
    option,
    run_client,
)
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


def _run_connector(
    reporter: Reporter, services: list[Any], common: dict[str, Any], **options: Any
) -> None:
    from burrow.addresses import is_websocket_url
    from burrow.roles.connector import Connector, ConnectorConfig

    def build(settings: Any, embedded_at: tuple[str, int] | None) -> Any:
        if is_websocket_url(settings.relay):  # the serverless relay
            from burrow.aws.serverless.agent import ServerlessConfig, ServerlessConnector

            if not services:
                raise ConfigError("the serverless relay has no SOCKS proxy; use burrow connect")
            config = ServerlessConfig.from_settings(settings, [], listen=services)
            return ServerlessConnector(config, on_event=reporter.event)
        config = settings.build(ConnectorConfig, relay=embedded_at, services=services)
        return Connector(config, on_event=reporter.event)

    try:
        settings = client_settings(common)
    except BurrowError as exc:
        fail(reporter, exc)
    run_client(reporter, build, settings, verbose=common["verbose"], **options)


def _need_relay(common: dict[str, Any], command: str) -> None:
    if not common["relay_addr"]:
        raise ConfigError(f"burrow {command} needs a relay: pass --to RELAY (or BURROW_RELAY)")


@main.command()
@click.argument("services", nargs=-1, required=True, envvar="BURROW_CONNECT")
@client_options(embedded=False)
def connect(services: tuple[str, ...], **common: Any) -> None:
    """Reach private services as local ports: NAME[=LISTEN] (PORT, HOST:PORT or unix:PATH)."""
    from burrow.roles.connector import ListenSpec

    reporter = Reporter(as_json=common["as_json"])
    try:
        specs = [ListenSpec.parse(item) for text in services for item in text.split(",") if item]
        _need_relay(common, "connect")
    except BurrowError as exc:
        fail(reporter, exc)
    _run_connector(reporter, specs, common)


@main.command()
@option(
    "--listen",
    default="127.0.0.1:1055",
    show_default=True,
    envvar="BURROW_SOCKS",
    help="SOCKS5 address.",
)
@option(
    "--http-listen", envvar="BURROW_HTTP_PROXY", help="Also an HTTP CONNECT proxy on this address."
)
@option(
    "--exit",
    "exit_name",
    envvar="BURROW_EXIT",
    help="Exit that dials HOST:PORT targets (NAME targets go to private services).",
)
@option("--auth", envvar="BURROW_SOCKS_AUTH", help="USER:PASS the proxy's clients must give.")
@client_options(embedded=False)
def socks(
    listen: str, http_listen: str | None, exit_name: str | None, auth: str | None, **common: Any
) -> None:
    """A SOCKS5 (and HTTP CONNECT) proxy to private services and exits."""
    reporter = Reporter(as_json=common["as_json"])
    try:
        _need_relay(common, "socks")
        socks_at = parse_hostport(listen, 1055, listen=True)
        http_at = parse_hostport(http_listen, 1056, listen=True) if http_listen else None
        credentials = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user:
                raise ConfigError("--auth expects USER:PASS")
            credentials = (user, password)
    except BurrowError as exc:
        fail(reporter, exc)

    async def start_proxy(connector: Any) -> Any:
        from burrow.net.proxy_server import ProxyServer

        server = ProxyServer(connector, exit_name=exit_name, credentials=credentials)
        for kind, at in (("socks", socks_at), ("http", http_at)):
            if at is None:
                continue
            try:
                bound = await server.listen(kind, *at)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {at[0]}:{at[1]}: {exc.strerror}") from None
            reporter.event(
                {
                    "event": "tunnel_ready",
                    "kind": "socks" if kind == "socks" else "http-connect",
                    "local": f"{bound[0]}:{bound[1]}",
                }
            )
        return server

    _run_connector(reporter, [], common, after_start=start_proxy)
