"""``burrow token``: scoped tokens signed with the relay's key."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from burrow.cli.common import fail, main, option
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError


@main.group()
def token() -> None:
    """Scoped tokens: which names a holder may expose or connect to."""


@token.command("issue")
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="The relay's state directory [default: ~/.local/state/burrow/relay].",
)
@option(
    "--expose",
    multiple=True,
    envvar="BURROW_TOKEN_EXPOSE",
    help="Names (globs) the holder may offer.",
)
@option(
    "--connect",
    "connect_names",
    multiple=True,
    envvar="BURROW_TOKEN_CONNECT",
    help="Names (globs) the holder may reach.",
)
@option(
    "--subject",
    envvar="BURROW_TOKEN_SUBJECT",
    help="Who the token is for (e.g. lambda-orders); the relay's and agents' logs name it.",
)
@option(
    "--ttl",
    default="30d",
    show_default=True,
    envvar="BURROW_TOKEN_TTL",
    help="Lifetime: 30d, 12h, 15m, never.",
)
def token_issue(
    state_dir: Path | None,
    expose: tuple[str, ...],
    connect_names: tuple[str, ...],
    subject: str | None,
    ttl: str,
) -> None:
    """Mint a token signed with the relay's key; printed once, on the last line."""
    import time as _time

    from burrow.net.tls import default_state_dir
    from burrow.tokens import TokenKey, mint, parse_ttl

    reporter = Reporter(as_json=False)
    try:
        if not expose and not connect_names:
            raise ConfigError("a token needs --expose and/or --connect names")
        seconds = parse_ttl(ttl)
        key = TokenKey.load(state_dir or default_state_dir("relay"))
        text = mint(key, list(expose), list(connect_names), seconds, _time.time(), subject)
    except BurrowError as exc:
        fail(reporter, exc)
    from burrow.tokens import parse_token

    claims, _, _ = parse_token(text)
    sys.stderr.write(
        f"token {claims['id']}: expose {list(expose) or '-'}, connect {list(connect_names) or '-'}"
        f", {'no expiry' if seconds is None else 'valid ' + ttl}\n"
    )
    click.echo(text)


@token.command("init")
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="The relay's state directory [default: ~/.local/state/burrow/relay].",
)
def token_init(state_dir: Path | None) -> None:
    """Create the relay's token key (once); a running relay accepts its tokens at once."""
    from burrow.net.tls import default_state_dir
    from burrow.tokens import KEY_FILE, TokenKey

    reporter = Reporter(as_json=False)
    directory = state_dir or default_state_dir("relay")
    try:
        key, created = TokenKey.create(directory)
    except BurrowError as exc:
        fail(reporter, exc)
    verb = "created" if created else "already had"
    click.echo(f"{verb} token key {key.kid} at {directory / KEY_FILE}")


@token.command("revoke")
@click.argument("token_id")
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="The relay's state directory [default: ~/.local/state/burrow/relay].",
)
@option(
    "--registry",
    envvar="BURROW_REGISTRY",
    help="A cluster's Redis (redis://HOST:PORT/DB): revoke the token on every relay node "
    "sharing it, at once (with --state-dir too: also in that directory).",
)
def token_revoke(token_id: str, state_dir: Path | None, registry: str | None) -> None:
    """Refuse the token with this id from the next handshake or stream on."""
    import asyncio

    from burrow.net.tls import default_state_dir
    from burrow.tokens import check_token_id, deny

    reporter = Reporter(as_json=False)
    where = []
    try:
        token_id = check_token_id(token_id)
        if registry is not None:
            from burrow.roles.redis_registry import revoke, shown_url

            asyncio.run(revoke(registry, token_id))
            where.append(f"in the registry {shown_url(registry)}")
        if registry is None or state_dir is not None:
            directory = state_dir or default_state_dir("relay")
            deny(directory, token_id)
            where.append(f"in {directory}")
    except BurrowError as exc:
        fail(reporter, exc)
    # Revoked in the relay's own directory only: the plain line, as before the clusters came.
    click.echo(f"revoked {token_id}" + (f" {' and '.join(where)}" if registry else ""))
