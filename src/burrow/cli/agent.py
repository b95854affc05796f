"""Agents: ``burrow tcp``, ``burrow http``, ``burrow exit`` for one service, ``burrow up`` for
the services of a ``burrow.toml``. All of them build their services with ``burrow.kinds`` and
run one ``Agent`` through ``run_agent``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import click

from burrow.addresses import is_websocket_url, parse_hostport
from burrow.cli.common import (
    Lines,
    check_name,
    client_options,
    client_settings,
    fail,
    main,
    option,
    run_client,
)
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


def _run_agent(
    reporter: Reporter,
    services: list[Any],
    common: dict[str, Any],
    **options: Any,
) -> None:
    """Run one agent offering ``services`` until a signal or a failure. A ``wss://`` (or
    ``ws://``) relay is the serverless one: its agent speaks that protocol instead."""
    from burrow.roles.agent import Agent, AgentConfig

    def build(settings: Any, embedded_at: tuple[str, int] | None) -> Any:
        if is_websocket_url(settings.relay):
            from burrow.aws.serverless.agent import ServerlessAgent, ServerlessConfig

            serverless = ServerlessConfig.from_settings(settings, services)
            return ServerlessAgent(serverless, on_event=reporter.event)
        config = settings.build(AgentConfig, relay=embedded_at, tunnels=services)
        return Agent(config, on_event=reporter.event)

    try:
        settings = options.pop("settings", None) or client_settings(common)
    except BurrowError as exc:
        fail(reporter, exc)
    run_client(reporter, build, settings, verbose=common["verbose"], **options)


@main.command()
@click.argument("local", envvar="BURROW_LOCAL")
@option(
    "--port",
    "-p",
    type=int,
    envvar="BURROW_PORT",
    help="Public port to ask for [default: any in the relay's range].",
)
@option("--name", envvar="BURROW_NAME", help="Tunnel name (keeps its port across restarts).")
@option(
    "--private",
    is_flag=True,
    envvar="BURROW_PRIVATE",
    help="No public port: only connectors with a token for --name reach it.",
)
@option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    envvar="BURROW_PROXY_PROTOCOL",
    help="Send a PROXY protocol header so the local service sees visitors' addresses.",
)
@client_options(embedded=True)
def tcp(
    local: str,
    port: int | None,
    name: str | None,
    private: bool,
    proxy_protocol: str | None,
    **common: Any,
) -> None:
    """Expose LOCAL (PORT or HOST:PORT) as a public TCP port on the relay (or, with
    --private, as a service only connectors can reach)."""
    from burrow.kinds import tcp_service

    reporter = Reporter(as_json=common["as_json"])
    try:
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"invalid --port {port}: expected 1 to 65535")
        if private and not name:
            raise ConfigError("--private needs --name: connectors reach the service by name")
        if private:
            name = check_name(name)
        if private and port:
            raise ConfigError("--private services have no public port; drop --port")
        service = tcp_service(
            local,
            name=name.lower() if name else None,
            port=port,
            proxy_protocol=proxy_protocol,
            private=private,
        )
    except BurrowError as exc:
        fail(reporter, exc)
    _run_agent(reporter, [service], common)


@main.command()
@click.argument("local", envvar="BURROW_LOCAL")
@option("--name", envvar="BURROW_NAME", help="Public name: NAME.DOMAIN [default: random].")
@option(
    "--local-https",
    is_flag=True,
    envvar="BURROW_LOCAL_HTTPS",
    help="The local service speaks HTTPS.",
)
@option(
    "--local-ca",
    type=click.Path(path_type=Path),
    envvar="BURROW_LOCAL_CA",
    help="CA (PEM) to verify the local HTTPS service.",
)
@option(
    "--local-insecure",
    is_flag=True,
    envvar="BURROW_LOCAL_INSECURE",
    help="Do not verify the local HTTPS service's certificate.",
)
@option(
    "--host-header",
    default="preserve",
    show_default=True,
    envvar="BURROW_HOST_HEADER",
    help="preserve, rewrite (to the local address), or a literal value.",
)
@option(
    "--basic-auth",
    multiple=True,
    envvar="BURROW_BASIC_AUTH",
    help="USER:PASS visitors must give (repeatable).",
)
@option(
    "--allow",
    "allow_cidrs",
    multiple=True,
    envvar="BURROW_ALLOW",
    help="Only these visitor CIDRs (repeatable).",
)
@option(
    "--deny",
    "deny_cidrs",
    multiple=True,
    envvar="BURROW_DENY",
    help="Refuse these visitor CIDRs (repeatable).",
)
@option(
    "--request-header-add",
    multiple=True,
    type=Lines(),
    envvar="BURROW_REQUEST_HEADER_ADD",
    help="'Name: value' to add to requests.",
)
@option(
    "--request-header-remove",
    multiple=True,
    type=Lines(),
    envvar="BURROW_REQUEST_HEADER_REMOVE",
    help="Header to remove from requests.",
)
@option(
    "--response-header-add",
    multiple=True,
    type=Lines(),
    envvar="BURROW_RESPONSE_HEADER_ADD",
    help="'Name: value' to add to responses.",
)
@option(
    "--response-header-remove",
    multiple=True,
    type=Lines(),
    envvar="BURROW_RESPONSE_HEADER_REMOVE",
    help="Header to remove from responses.",
)
@option(
    "--inspect",
    default="127.0.0.1:4040",
    show_default=True,
    envvar="BURROW_INSPECT",
    help="Address of the local request inspector.",
)
@option("--no-inspect", is_flag=True, envvar="BURROW_NO_INSPECT", help="Do not run the inspector.")
@client_options(embedded=True)
def http(
    local: str,
    name: str | None,
    local_https: bool,
    local_ca: Path | None,
    local_insecure: bool,
    host_header: str,
    basic_auth: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    deny_cidrs: tuple[str, ...],
    request_header_add: tuple[str, ...],
    request_header_remove: tuple[str, ...],
    response_header_add: tuple[str, ...],
    response_header_remove: tuple[str, ...],
    inspect: str,
    no_inspect: bool,
    **common: Any,
) -> None:
    """Expose the web service at LOCAL (PORT, HOST:PORT or URL) as http(s)://NAME.DOMAIN."""
    from burrow.kinds import http_service

    reporter = Reporter(as_json=common["as_json"])
    recorder = None
    try:
        inspect_at = None if no_inspect else parse_hostport(inspect, 4040, listen=True)
        if inspect_at is not None:
            from burrow.http.inspector import ExchangeStore

            recorder = ExchangeStore()
        service: Any = http_service(
            local,
            name=check_name(name),
            recorder=recorder,
            local_https=local_https,
            local_ca=local_ca,
            local_insecure=local_insecure,
            host_header=host_header,
            basic_auth=basic_auth,
            allow=allow_cidrs,
            deny=deny_cidrs,
            request_header_add=request_header_add,
            request_header_remove=request_header_remove,
            response_header_add=response_header_add,
            response_header_remove=response_header_remove,
        )
    except BurrowError as exc:
        fail(reporter, exc)
    options = service.options

    async def start_inspector(agent: Any) -> Any:
        if inspect_at is None:
            return None
        from burrow.http.inspector import Inspector, InspectorBindError
        from burrow.http.proxy import replay

        def tunnels() -> list[dict[str, Any]]:
            return [
                {
                    "name": t.name,
                    "public_url": t.public,
                    "kind": "http",
                    "local": "{}:{}".format(*options.local),
                }
                for t in agent.tunnels
            ]

        assert recorder is not None
        inspector = Inspector(recorder, tunnels, partial(replay, options, recorder=recorder))
        try:
            bound = await inspector.start(*inspect_at)
        except InspectorBindError as exc:
            if inspect_at[1] == 0 or not exc.in_use:
                raise
            reporter.event({"event": "warning", "message": f"{exc}; using a free port instead"})
            bound = await inspector.start(inspect_at[0], 0)
        reporter.event({"event": "inspector_ready", "url": f"http://{bound[0]}:{bound[1]}"})
        return inspector

    _run_agent(reporter, [service], common, embedded_http=True, after_start=start_inspector)


@main.command(name="exit")
@option("--name", required=True, envvar="BURROW_NAME", help="Name connectors use.")
@option(
    "--allow",
    "allow",
    multiple=True,
    required=True,
    envvar="BURROW_ALLOW",
    help="CIDR[:PORTS],... the exit may dial (repeatable).",
)
@client_options(embedded=False)
def exit_command(name: str, allow: tuple[str, ...], **common: Any) -> None:
    """Dial allow-listed addresses for connectors: a bastion with no sudo and no TUN device."""
    from burrow.kinds import exit_service

    reporter = Reporter(as_json=common["as_json"])
    try:
        if not common["relay_addr"]:
            raise ConfigError("burrow exit needs a relay: pass --to RELAY (or BURROW_RELAY)")
        service = exit_service(check_name(name) or name, allow)
    except BurrowError as exc:
        fail(reporter, exc)
    _run_agent(reporter, [service], common)


@main.command()
@option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default="burrow.toml",
    show_default=True,
    envvar="BURROW_CONFIG",
    help="The file listing the tunnels ([[tunnel]] tables) and the relay.",
)
@client_options(embedded=True)
def up(config_path: Path, **common: Any) -> None:
    """Open every tunnel listed in a config file, in one agent. Flags (and BURROW_*
    variables) win over the file's settings. SIGHUP (systemctl reload) reads the file again:
    tunnels added, removed or changed follow it, the others keep their connections."""
    from burrow.cli.reload import FileReloader
    from burrow.config import load_agent_config
    from burrow.kinds import service_from_file

    reporter = Reporter(as_json=common["as_json"])
    try:
        file = load_agent_config(config_path)
        services = [service_from_file(t, config_path.parent) for t in file.tunnels]
        settings = client_settings(
            common,
            relay=file.relay,
            secret=file.secret,
            token=file.token,
            fingerprint=file.fingerprint,
            ca=Path(file.ca) if file.ca else None,
            insecure=file.insecure,
        )
    except BurrowError as exc:
        fail(reporter, exc)
    if (file.secret or file.token) and _readable_by_others(config_path):
        reporter.event(
            {
                "event": "warning",
                "message": f"{config_path} holds a secret and other users can read it; "
                f"run `chmod 600 {config_path}`",
            }
        )
    has_http = any(t.kind == "http" for t in file.tunnels)
    reloader = FileReloader(config_path, file, services, reporter.event, service_from_file)
    _run_agent(
        reporter,
        services,
        common,
        settings=settings,
        embedded_http=has_http,
        reload=reloader.reload,
    )


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o077)
    except OSError:
        return False
