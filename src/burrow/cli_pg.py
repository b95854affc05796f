"""PostgreSQL commands of the ``burrow`` CLI: ``burrow pgproxy`` (standalone). Defined here,
attached to ``burrow.cli.main`` there. ``upstream_options`` is shared with the agent's
``burrow pg`` service kind."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from burrow.config import parse_hostport
from burrow.errors import BurrowError, ConfigError

__all__ = ["format_pg_event", "pgproxy", "upstream_from_options", "upstream_options"]


def upstream_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The database leg and the allow-lists, for every command that runs pgproxy."""
    options = [
        click.option(
            "--upstream-ca",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar="BURROW_UPSTREAM_CA",
            help="Trust only this CA bundle (PEM) for the database's certificate, e.g. the RDS "
            "global bundle [default: the system's roots].",
        ),
        click.option(
            "--upstream-name",
            envvar="BURROW_UPSTREAM_NAME",
            help="Name the database's certificate must carry [default: the upstream host].",
        ),
        click.option(
            "--upstream-insecure",
            is_flag=True,
            envvar="BURROW_UPSTREAM_INSECURE",
            help="Do not verify the database's certificate (TLS still on). Test set-ups only.",
        ),
        click.option(
            "--direct-tls",
            is_flag=True,
            envvar="BURROW_DIRECT_TLS",
            help="Start TLS at once with ALPN postgresql (PostgreSQL 17+), no SSLRequest.",
        ),
        click.option(
            "--allow-user",
            "allow_users",
            multiple=True,
            envvar="BURROW_ALLOW_USER",
            metavar="USER",
            help="Only this database user may connect (repeatable) [default: any].",
        ),
        click.option(
            "--allow-database",
            "allow_databases",
            multiple=True,
            envvar="BURROW_ALLOW_DATABASE",
            metavar="DB",
            help="Only this database may be opened (repeatable) [default: any].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def upstream_from_options(upstream: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """``(PgUpstream, PgPolicy)`` from the options above; ``ConfigError`` for bad input."""
    from burrow.pg import PgPolicy, PgUpstream

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


def format_pg_event(record: dict[str, Any]) -> str | None:
    """The human line for pgproxy's events (None: not one of them)."""
    event = record.get("event")
    if event == "pgproxy_ready":
        return (
            "pgproxy listening on {listen} -> {upstream} (tls: {tls}, name {server_name})".format(
                **record
            )
        )
    if event == "pg_connection":
        if record.get("kind") == "cancel":
            who = f"cancel from {record.get('peer') or '-'} for pid {record.get('backend_pid')}"
        else:
            who = "{} user={} database={}".format(
                record.get("peer") or "-", record.get("user"), record.get("database")
            )
        line = (
            f"pg {who} identity={record.get('identity') or '-'} "
            f"{record.get('duration', 0):.3f}s in={record.get('bytes_from_client')} "
            f"out={record.get('bytes_from_server')} ended={record.get('ended')}"
        )
        if record.get("sqlstate"):
            line += f" sqlstate={record['sqlstate']}"
        if record.get("message"):
            line += f": {record['message']}"
        return line
    if event == "warning":
        return f"warning: {record.get('message')}"
    return None


@click.command()
@click.option(
    "--listen",
    default="127.0.0.1:6432",
    show_default=True,
    envvar="BURROW_PGPROXY_LISTEN",
    help="Address clients connect to (plaintext: keep it on loopback).",
)
@click.option(
    "--upstream",
    required=True,
    envvar="BURROW_PGPROXY_UPSTREAM",
    metavar="HOST[:PORT]",
    help="The PostgreSQL server (always reached over TLS).",
)
@upstream_options
@click.option(
    "--json", "as_json", is_flag=True, envvar="BURROW_JSON", help="One JSON object per line."
)
@click.option(
    "-v", "--verbose", count=True, envvar="BURROW_VERBOSE", help="Log more (-vv for debug)."
)
def pgproxy(listen: str, upstream: str, as_json: bool, verbose: int, **options: Any) -> None:
    """A local PostgreSQL proxy: plaintext clients in, verified TLS to the database out.

    Withholds SCRAM-SHA-256-PLUS (the database's TLS ends here, so libpq's default
    channel_binding=prefer goes on without binding; channel_binding=require cannot work),
    forwards query cancels, refuses users and databases outside the allow-lists with SQLSTATE
    28000, and prints one line per connection.
    """
    from burrow.cli import _run, _setup_logging, _Stopper
    from burrow.pg.standalone import PgProxyServer

    _setup_logging(verbose)

    def show(record: dict[str, Any]) -> None:
        if as_json:
            line: str | None = json.dumps(record, default=str)
        else:
            line = format_pg_event(record)
        if line is not None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def fail(message: str, code: int) -> None:
        if as_json:
            show({"event": "error", "message": message})
        sys.stderr.write(f"burrow: error: {message}\n")
        sys.exit(code)

    try:
        host, port = parse_hostport(listen, 6432, listen=True)
        pg_upstream, policy = upstream_from_options(upstream, options)
    except BurrowError as exc:
        fail(str(exc), exc.exit_code)

    async def run() -> None:
        stopper = _Stopper()
        server = PgProxyServer(pg_upstream, policy, on_event=show)
        try:
            await server.start(host, port)
        except OSError as exc:
            raise BurrowError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        try:
            await stopper.run()
        finally:
            await server.close()

    try:
        _run(run)
    except BurrowError as exc:
        fail(str(exc), exc.exit_code)
