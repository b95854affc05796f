"""PostgreSQL: ``burrow pg`` (a database offered through the relay, with pgproxy on every
connection) and ``burrow pgproxy`` (the same proxy on a local port, without a relay)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from burrow.addresses import parse_hostport
from burrow.cli.agent import _run_agent
from burrow.cli.common import (
    Stopper,
    check_name,
    client_options,
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

__all__ = ["pg", "pgproxy", "upstream_from_options", "upstream_options"]


def upstream_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The database leg and the allow-lists, for every command that runs pgproxy."""
    options = [
        option(
            "--upstream-ca",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar="BURROW_UPSTREAM_CA",
            help="Trust only this CA bundle (PEM) for the database's certificate, e.g. the RDS "
            "global bundle [default: the system's roots].",
        ),
        option(
            "--upstream-name",
            envvar="BURROW_UPSTREAM_NAME",
            help="Name the database's certificate must carry [default: the upstream host].",
        ),
        option(
            "--upstream-insecure",
            is_flag=True,
            envvar="BURROW_UPSTREAM_INSECURE",
            help="Do not verify the database's certificate (TLS still on). Test set-ups only.",
        ),
        option(
            "--direct-tls",
            is_flag=True,
            envvar="BURROW_DIRECT_TLS",
            help="Start TLS at once with ALPN postgresql (PostgreSQL 17+), no SSLRequest.",
        ),
        option(
            "--allow-user",
            "allow_users",
            multiple=True,
            envvar="BURROW_ALLOW_USER",
            metavar="USER",
            help="Only this database user may connect (repeatable) [default: any].",
        ),
        option(
            "--allow-database",
            "allow_databases",
            multiple=True,
            envvar="BURROW_ALLOW_DATABASE",
            metavar="DB",
            help="Only this database may be opened (repeatable) [default: any].",
        ),
    ]
    for decorator in reversed(options):
        f = decorator(f)
    return f


def upstream_from_options(upstream: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """``(PgUpstream, PgPolicy)`` from the options above; ``ConfigError`` for bad input."""
    from burrow.pg.policy import PgPolicy
    from burrow.pg.upstream import PgUpstream

    address = parse_hostport(upstream, 5432)
    ca: Path | None = options["upstream_ca"]
    if ca is not None and not ca.is_file():
        raise ConfigError(f"--upstream-ca {str(ca)!r}: no such file")
    pg_upstream = PgUpstream.create(
        address,
        ca=ca,
        name=options["upstream_name"] or None,
        insecure=options["upstream_insecure"],
        direct_tls=options["direct_tls"],
    )
    policy = PgPolicy.create(options["allow_users"], options["allow_databases"])
    return pg_upstream, policy


@main.command(name="pg")
@click.argument("upstream", envvar="BURROW_PG_UPSTREAM", metavar="HOST:PORT")
@option("--name", envvar="BURROW_NAME", help="The name connectors use (--private needs one).")
@option(
    "--private",
    is_flag=True,
    envvar="BURROW_PRIVATE",
    help="No public port: only connectors with a token for --name reach it (recommended: "
    "clients speak plaintext to pgproxy inside burrow's TLS session).",
)
@upstream_options
@client_options(embedded=True)
def pg(upstream: str, name: str | None, private: bool, **options: Any) -> None:
    """Offer the PostgreSQL server at HOST:PORT through the relay, with pgproxy on every
    connection: verified TLS to the database, SCRAM-PLUS withheld (its TLS ends here),
    cancels forwarded, users and databases allow-listed, one log line per connection."""
    from burrow.kinds import pg_service
    from burrow.pg.service import warn_upstream

    reporter = Reporter(as_json=options["as_json"])
    try:
        if private and not name:
            raise ConfigError("--private needs --name: connectors reach the service by name")
        service = pg_service(
            upstream,
            name=check_name(name),
            private=private,
            ca=options.pop("upstream_ca"),
            server_name=options.pop("upstream_name"),
            insecure=options.pop("upstream_insecure"),
            direct_tls=options.pop("direct_tls"),
            users=options.pop("allow_users"),
            databases=options.pop("allow_databases"),
        )
    except BurrowError as exc:
        fail(reporter, exc)
    warn_upstream(service, reporter.event)  # type: ignore[arg-type]
    _run_agent(reporter, [service], options)


@main.command()
@option(
    "--listen",
    default="127.0.0.1:6432",
    show_default=True,
    envvar="BURROW_PGPROXY_LISTEN",
    help="Address clients connect to (plaintext: keep it on loopback).",
)
@option(
    "--upstream",
    required=True,
    envvar="BURROW_PGPROXY_UPSTREAM",
    metavar="HOST[:PORT]",
    help="The PostgreSQL server (always reached over TLS).",
)
@upstream_options
@json_option
@verbose_option
def pgproxy(listen: str, upstream: str, as_json: bool, verbose: int, **options: Any) -> None:
    """A local PostgreSQL proxy: plaintext clients in, verified TLS to the database out.

    Withholds SCRAM-SHA-256-PLUS (the database's TLS ends here, so libpq's default
    channel_binding=prefer goes on without binding; channel_binding=require cannot work),
    forwards query cancels, refuses users and databases outside the allow-lists with SQLSTATE
    28000, and prints one line per connection.
    """
    from burrow.pg.standalone import PgProxyServer

    setup_logging(verbose)
    reporter = Reporter(as_json=as_json)
    try:
        host, port = parse_hostport(listen, 6432, listen=True)
        pg_upstream, policy = upstream_from_options(upstream, options)
    except BurrowError as exc:
        fail(reporter, exc)

    async def serve() -> None:
        stopper = Stopper()
        server = PgProxyServer(pg_upstream, policy, on_event=reporter.event)
        try:
            await server.start(host, port)
        except OSError as exc:
            raise BurrowError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        try:
            await stopper.run()
        finally:
            await server.close()

    try:
        run(serve)
    except BurrowError as exc:
        fail(reporter, exc)
