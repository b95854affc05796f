"""``burrow relay``: the rendezvous agents dial out to."""

from __future__ import annotations

from pathlib import Path

import click

from burrow.addresses import DEFAULT_RELAY_PORT, parse_hostport
from burrow.cli.common import (
    Stopper,
    fail,
    json_option,
    main,
    option,
    run,
    setup_logging,
    verbose_option,
)
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


@main.command()
@option(
    "--listen",
    default=f"0.0.0.0:{DEFAULT_RELAY_PORT}",
    show_default=True,
    envvar="BURROW_LISTEN",
    help="Control address agents dial (TLS).",
)
@option(
    "--secret",
    envvar="BURROW_SECRET",
    help="Shared secret agents must prove they know (never sent on the wire).",
)
@option(
    "--min-port",
    type=int,
    default=20000,
    show_default=True,
    envvar="BURROW_MIN_PORT",
    help="Lowest public port a TCP tunnel may get.",
)
@option(
    "--max-port",
    type=int,
    default=30000,
    show_default=True,
    envvar="BURROW_MAX_PORT",
    help="Highest public port a TCP tunnel may get.",
)
@option(
    "--bind-tunnels",
    envvar="BURROW_BIND_TUNNELS",
    help="Address public tunnel ports listen on [default: the --listen host].",
)
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="Where the relay keeps its certificate [default: ~/.local/state/burrow/relay].",
)
@option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    envvar="BURROW_TLS_CERT",
    help="Certificate (PEM) instead of the self-signed one.",
)
@option(
    "--tls-key",
    type=click.Path(path_type=Path),
    envvar="BURROW_TLS_KEY",
    help="The key (PEM) of --tls-cert.",
)
@option(
    "--hostname",
    "hostnames",
    multiple=True,
    envvar="BURROW_HOSTNAME",
    help="Name to put in the self-signed certificate (repeatable).",
)
@option(
    "--public-host",
    envvar="BURROW_PUBLIC_HOST",
    help="Host name shown in agents' public addresses.",
)
@option(
    "--insecure",
    is_flag=True,
    envvar="BURROW_INSECURE",
    help="Plaintext control port (no TLS). Agents must pass --insecure too.",
)
@option(
    "--allow-anonymous",
    is_flag=True,
    envvar="BURROW_ALLOW_ANONYMOUS",
    help="Let in agents with neither --secret nor a token (anyone who reaches the relay).",
)
@option(
    "--lease-grace",
    type=float,
    default=60.0,
    show_default=True,
    envvar="BURROW_LEASE_GRACE",
    help="Seconds a port stays reserved for an agent that went away.",
)
@option(
    "--heartbeat",
    type=float,
    default=5.0,
    show_default=True,
    envvar="BURROW_HEARTBEAT",
    help="Seconds between pings; a peer silent for 3 intervals is dead.",
)
@option("--admin", envvar="BURROW_ADMIN", help="HOST:PORT serving /healthz and /metrics.")
@option(
    "--http-listen", envvar="BURROW_HTTP_LISTEN", help="HOST:PORT for HTTP tunnels (by Host name)."
)
@option(
    "--https-listen",
    envvar="BURROW_HTTPS_LISTEN",
    help="HOST:PORT for HTTPS tunnels (--tls-cert/--tls-key, or a self-signed certificate).",
)
@option(
    "--domain",
    default="localhost",
    show_default=True,
    envvar="BURROW_DOMAIN",
    help="HTTP tunnels are NAME.DOMAIN (localhost works in browsers with no DNS).",
)
@json_option
@verbose_option
def relay(
    listen: str,
    secret: str | None,
    min_port: int,
    max_port: int,
    bind_tunnels: str | None,
    state_dir: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    hostnames: tuple[str, ...],
    public_host: str | None,
    insecure: bool,
    allow_anonymous: bool,
    lease_grace: float,
    heartbeat: float,
    admin: str | None,
    http_listen: str | None,
    https_listen: str | None,
    domain: str,
    as_json: bool,
    verbose: int,
) -> None:
    """Run a relay that agents dial out to."""
    from burrow.node import Relay, RelayConfig

    setup_logging(verbose)
    reporter = Reporter(as_json=as_json)
    try:
        if secret == "":
            raise ConfigError(
                "--secret is empty (is $SECRET unset?); give a secret, or leave the flag out"
            )
        host, port = parse_hostport(listen, DEFAULT_RELAY_PORT, listen=True)
        config = RelayConfig(
            listen_host=host,
            listen_port=port,
            secret=secret,
            min_port=min_port,
            max_port=max_port,
            bind_tunnels=bind_tunnels,
            state_dir=state_dir,
            insecure=insecure,
            allow_anonymous=allow_anonymous,
            tls_cert=tls_cert,
            tls_key=tls_key,
            hostnames=hostnames,
            public_host=public_host,
            lease_grace=lease_grace,
            heartbeat=heartbeat,
            admin=parse_hostport(admin, 9090, listen=True) if admin else None,
            http_listen=parse_hostport(http_listen, 80, listen=True) if http_listen else None,
            https_listen=parse_hostport(https_listen, 443, listen=True) if https_listen else None,
            domain=domain,
        )
        server = Relay(config, on_event=reporter.event)
    except BurrowError as exc:
        fail(reporter, exc)

    async def serve() -> None:
        stopper = Stopper()
        try:
            await stopper.run(server.start())
            if not stopper.event.is_set():
                await stopper.run()
        finally:
            await server.close()

    try:
        run(serve)
    except BurrowError as exc:
        fail(reporter, exc)
