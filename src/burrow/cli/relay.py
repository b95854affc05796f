"""``burrow relay``: the rendezvous agents dial out to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from burrow.addresses import DEFAULT_RELAY_PORT, parse_hostport
from burrow.cli.common import (
    Stopper,
    fail,
    json_option,
    main,
    option,
    run,
    secret_from,
    setup_logging,
    verbose_option,
)
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError
from burrow.events import format_hostport

_MIB = 1024 * 1024


def limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """One ``--max-...`` option per field of ``Limits`` (buffers in MiB)."""
    from burrow.roles.limits import Limits

    defaults = Limits()
    helps = {
        "registrations_per_session": "Tunnels one session may hold.",
        "registrations_per_token": "Tunnels the sessions of one token may hold together.",
        "streams_per_session": "Streams one client (a connector) may have open at once.",
        "streams_per_service": "Open connections to one tunnel at once (visitors, connectors).",
        "opens_per_second": "Streams one session may open per second (bursts of twice that).",
        "buffer_per_session": "MiB one session's streams may hold unread, together.",
        "buffer_total": "MiB every session's streams may hold unread, together.",
        "unauthenticated": "Connections still in their handshake, at once.",
        "unauthenticated_per_source": "... of those from one address.",
    }
    for name in reversed(list(vars(defaults))):
        value = getattr(defaults, name)
        mib = name.startswith("buffer")
        f = option(
            f"--max-{name.replace('_', '-')}",
            f"limit_{name}",
            type=float if name == "opens_per_second" else int,
            default=value // _MIB if mib else value,
            show_default=True,
            envvar=f"BURROW_MAX_{name.upper()}",
            help=helps[name],
        )(f)
    return f


def limits_from(values: dict[str, float]) -> Any:
    from burrow.roles.limits import Limits

    fields = {
        key.removeprefix("limit_"): value * _MIB if key.startswith("limit_buffer") else value
        for key, value in values.items()
        if key.startswith("limit_")
    }
    return Limits(**fields)  # type: ignore[arg-type]


@main.group(invoke_without_command=True)
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
    help="Shared secret agents must prove they know (never sent on the wire); visible in "
    "`ps`: prefer --secret-file.",
)
@option(
    "--secret-file",
    type=click.Path(path_type=Path),
    envvar="BURROW_SECRET_FILE",
    help="Read the shared secret from this file (its first line).",
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
@option(
    "--registry",
    envvar="BURROW_REGISTRY",
    metavar="URL",
    help="Share leases with other relay nodes in Redis (redis://HOST:PORT/DB, rediss:// for "
    "TLS): any node then answers for every tunnel, and agents fail over between nodes.",
)
@option(
    "--node-id",
    envvar="BURROW_NODE_ID",
    help="This node's name in the --registry [default: the host name].",
)
@option(
    "--advertise",
    envvar="BURROW_ADVERTISE",
    metavar="HOST:PORT",
    help="Control address the other nodes dial [default: the --listen address].",
)
@option(
    "--admin-names",
    is_flag=True,
    envvar="BURROW_ADMIN_NAMES",
    help="List private services and exits on /healthz too (HTTP names are always listed).",
)
@limit_options
@json_option
@verbose_option
@click.pass_context
def relay(
    ctx: click.Context,
    /,
    listen: str,
    secret: str | None,
    secret_file: Path | None,
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
    registry: str | None,
    node_id: str | None,
    advertise: str | None,
    admin_names: bool,
    as_json: bool,
    verbose: int,
    **limits: float,
) -> None:
    """Run a relay that agents dial out to (with no command), or one of the commands below.

    Under systemd (Type=notify) it says READY=1 once it listens and STOPPING=1 when it stops."""
    if ctx.invoked_subcommand is not None:
        _no_relay_options(ctx)
        return
    from burrow.cli.sdnotify import Notifier
    from burrow.node import Relay, RelayConfig

    setup_logging(verbose)
    reporter = Reporter(as_json=as_json)
    shared: Any = None
    try:
        secret = secret_from(secret, secret_file, "--secret")
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
            admin_names=admin_names,
            limits=limits_from(limits),
        )
        if registry is not None:
            shared = cluster_registry(config, registry, node_id, advertise, reporter)
        elif node_id is not None or advertise is not None:
            raise ConfigError("--node-id and --advertise are for a cluster: give --registry too")
        server = Relay(config, on_event=reporter.event, registry=shared)
    except BurrowError as exc:
        fail(reporter, exc)

    async def serve() -> None:
        stopper = Stopper()
        notifier = Notifier()
        try:
            await stopper.run(server.start())
            if not stopper.event.is_set():
                assert server.control_address is not None
                notifier.ready(f"listening on {format_hostport(*server.control_address)}")
                await stopper.run()
        finally:
            notifier.stopping()
            await server.close()

    try:
        run(serve)
    except BurrowError as exc:
        fail(reporter, exc)


def cluster_registry(
    config: Any, url: str, node_id: str | None, advertise: str | None, reporter: Reporter
) -> Any:
    """The Redis registry for ``--registry``, with this node's id and address checked."""
    import socket

    from burrow.roles.redis_registry import RedisRegistry, is_plaintext_remote, shown_url
    from burrow.tokens import NODE_ID_RE

    if node_id is None:
        node_id = socket.gethostname().split(".")[0][:64] or "relay"
    if not NODE_ID_RE.fullmatch(node_id):
        raise ConfigError(
            f"invalid --node-id {node_id[:70]!r}: use letters, digits, '.', '_' and '-' "
            "(64 at most)"
        )
    if advertise is not None:
        host, port = parse_hostport(advertise, config.listen_port or DEFAULT_RELAY_PORT)
        advertise = format_hostport(host, port)
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError("--registry needs redis-py: pip install 'burrow[cluster]'") from None
    if is_plaintext_remote(url):
        reporter.event(
            {
                "event": "warning",
                "message": f"--registry {shown_url(url)} is plaintext to another machine; "
                "use rediss:// (TLS) so leases and node records do not cross in clear",
            }
        )
    config.node_id = node_id
    config.advertise = advertise
    return RedisRegistry(url, grace=config.lease_grace, node_id=node_id)


#: Human lines for the events of a cluster node (``Reporter`` shows only the ones it knows).
def _no_relay_options(ctx: click.Context) -> None:
    """``burrow relay --listen ... template``: the relay's flags would be silently ignored."""
    from click.core import ParameterSource

    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name is not None
        and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)}: options of `burrow relay` itself; `burrow relay "
            f"{ctx.invoked_subcommand}` takes its own (see its --help)",
            ctx,
        )
