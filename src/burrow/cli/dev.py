"""``burrow dev``: deployed Lambda functions use the databases on this machine, privately, for
as long as the command runs; ``burrow dev restore`` puts back what a session that died left.

The work is ``burrow.aws.dev``'s; this module parses flags, shows the plan and a live status,
and turns SIGINT, SIGTERM and SIGHUP (the terminal closing) into a clean restore.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from burrow.addresses import is_websocket_url
from burrow.cli.common import (
    check_name,
    client_options,
    client_settings,
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

if TYPE_CHECKING:
    import asyncio

    from burrow.aws.dev import DevSession
    from burrow.aws.devplan import Resource
    from burrow.roles.services import Service


def parse_locals(items: tuple[str, ...]) -> list[tuple[str, int]]:
    """``--local NAME=PORT[,NAME=PORT...]`` (repeatable): names are DNS labels, each name and
    port once."""
    found: list[tuple[str, int]] = []
    for item in (p.strip() for text in items for p in text.split(",")):
        if not item:
            continue
        name, sep, port_text = item.partition("=")
        if not sep or not port_text.strip().isdigit():
            raise ConfigError(f"--local {item!r}: expected NAME=PORT, e.g. pg=5432")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConfigError(f"--local {item!r}: port must be 1 to 65535")
        checked = check_name(name.strip(), "--local name")
        assert checked is not None
        if len(checked) > 50:
            raise ConfigError(f"--local {item!r}: keep the name under 50 characters")
        if any(n == checked for n, _ in found):
            raise ConfigError(f"--local names {checked!r} twice")
        if any(p == port for _, p in found):
            raise ConfigError(f"--local gives port {port} twice")
        found.append((checked, port))
    if not found:
        raise ConfigError(
            "burrow dev needs --local NAME=PORT for each resource on this machine that "
            "functions use (e.g. --local pg=5432,cache=6379)"
        )
    return found


def check_relay(relay: str | None) -> str:
    if not relay:
        raise ConfigError(
            "burrow dev needs a relay the functions can reach: --to HOST:PORT (a burrow relay "
            "on a public host) or --to wss://... (the serverless relay)"
        )
    if is_websocket_url(relay):
        from burrow.aws.serverless.agent import check_url

        check_url(relay)
    return relay


def check_serverless(
    common: dict[str, Any],
    *,
    public: bool,
    token_key_dir: Path | None,
    function_relay: str | None,
    dry_run: bool = False,
) -> None:
    """What ``--to wss://...`` (the serverless relay) cannot go with, said before anything
    dials or changes."""
    from burrow.aws.dev import SERVERLESS_NO_KEY, SERVERLESS_NO_PUBLIC

    if public:
        raise ConfigError(SERVERLESS_NO_PUBLIC)
    if token_key_dir is None and not dry_run:
        raise ConfigError(SERVERLESS_NO_KEY)
    if common.get("secret") or common.get("secret_file"):
        raise ConfigError(
            "a serverless relay takes tokens, not --secret: leave it out (burrow dev mints the "
            "agent's token with the stack's key) or pass --token"
        )
    for flag, key in (("--fingerprint", "fingerprint"), ("--insecure", "insecure")):
        if common.get(key):
            raise ConfigError(
                f"{flag} is for a burrow relay (HOST:PORT); a wss:// relay's certificate is "
                "checked against the system's CAs (or --ca)"
            )
    if function_relay is not None:
        from burrow.aws.serverless.agent import check_url

        if not is_websocket_url(function_relay):
            raise ConfigError(
                f"--function-relay {function_relay!r}: with --to wss://... the functions dial "
                "the serverless relay too: give its wss:// URL as they reach it"
            )
        check_url(function_relay, "--function-relay")


def make_service(resource: Resource, private: bool) -> Service:
    """The agent's service for a local resource (private: reachable by name only)."""
    from burrow.kinds import tcp_service

    return tcp_service(f"127.0.0.1:{resource.port}", name=resource.service, private=private)


# --- output --------------------------------------------------------------------------------


def _plan_line(record: dict[str, Any]) -> str | None:
    mode = "" if record.get("mode") == "private" else " (--public)"
    lines = [
        f"{record['change']} function(s) in {record['region']} refer to local resources{mode}; "
        f"{record['skip']} skipped, {record['unrelated']} refer to nothing local"
    ]
    return "\n".join(lines)


def _found_line(record: dict[str, Any]) -> str:
    refs = ", ".join(
        "{}: {}:{} -> {}".format(
            "+".join(filter(None, (ref["variable"], ref.get("port_variable")))),
            ref["host"],
            ref["port"],
            ref["resource"],
        )
        for ref in record["references"]
    )
    line = f"  will change {record['function']}: {refs}; {'; '.join(record['changes'])}"
    if record.get("unmatched"):
        line += f" (not covered by --local: {', '.join(record['unmatched'])})"
    return line


def _ready_line(record: dict[str, Any]) -> str:
    parts = []
    for resource in record["resources"]:
        where = resource.get("public") or f"private service {resource.get('service')}"
        parts.append(f"{resource['name']} (port {resource['port']}) as {where}")
    functions = ", ".join(record["functions"]) or "none"
    return (
        f"ready: {functions} reach {'; '.join(parts)} through {record['relay']}; "
        "Ctrl+C puts the functions back"
    )


def _restored_line(record: dict[str, Any]) -> str:
    result = record.get("result")
    text = {
        "restored": f"restored {record['function']}",
        "unchanged": f"{record['function']} needed no restore",
        "gone": f"{record['function']} no longer exists; nothing to restore",
    }.get(str(result), f"{record['function']}: {result}")
    if record.get("kept"):
        text += f" (kept what was changed since in {', '.join(record['kept'])})"
    return text


_LINES: dict[str, Any] = {
    "dev_plan": _plan_line,
    "function_found": _found_line,
    "function_skipped": lambda r: (
        None if r.get("quiet") else f"  skipping {r['function']}: {r['reason']}"
    ),
    "layer_ready": lambda r: f"layer {r['layer']} ({'published' if r['published'] else 'reused'})",
    "function_updated": lambda r: (
        f"updated {r['function']}: "
        + ", ".join(r["variables"])
        + (f" + layer {r['layer']}" if r.get("layer") else "")
    ),
    "function_retry": lambda r: (
        f"retrying {r['function']} in {r['delay']} s ({r['code']}, attempt {r['attempt']})"
    ),
    "dev_ready": _ready_line,
    "function_restored": _restored_line,
    "tokens_not_revoked": lambda r: f"note: {r['message']}",
}


class DevReporter(Reporter):
    """JSON lines, plain lines, or (on a terminal) the plain lines above a live table of the
    resources, their tunnels and the functions."""

    def __init__(self, *, as_json: bool) -> None:
        super().__init__(as_json=as_json)
        self.session: DevSession | None = None

    def event(self, record: dict[str, Any]) -> None:
        name = record["event"]
        if self.as_json or name == "error" or name not in _LINES:
            if name == "tunnel_ready" and not self.as_json:
                return  # the ready line says it
            super().event(record)
            return
        line = _LINES[name](record)
        if name == "dev_plan" and record.get("dry_run"):
            line = (line or "") + " (dry run: nothing will change)"
        if name == "dev_ready" and self.stream.isatty() and self._live is None:
            self._start_live()
        if line is None:
            return
        if self._live is not None:
            self._live.console.print(line)
            self._live.refresh()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _start_live(self) -> None:
        from rich.live import Live

        self._live = Live(self._table(), refresh_per_second=2, get_renderable=self._table)
        self._live.start()

    def _table(self) -> Any:
        from rich.table import Table

        session = self.session
        table = Table(title=f"burrow dev · relay {session.relay_label if session else ''}")
        for column in ("what", "name", "state", "detail"):
            table.add_column(column)
        if session is None:
            return table
        for resource in session.resources:
            where = "{}:{}".format(*resource.public) if resource.public else resource.service
            table.add_row(
                "resource",
                f"{resource.name} (:{resource.port})",
                session.tunnels.get(resource.name, "?"),
                where,
            )
        for function, status in session.functions.items():
            if status.state == "skipped" and status.detail.startswith("refers to nothing"):
                continue
            table.add_row("function", function, status.state, status.detail[:80])
        return table


# --- the commands --------------------------------------------------------------------------


@main.group(name="dev", invoke_without_command=True)
@option(
    "--local",
    "locals_",
    multiple=True,
    envvar="BURROW_DEV_LOCAL",
    metavar="NAME=PORT[,...]",
    help="A resource on this machine that functions use (repeatable): pg=5432.",
)
@option(
    "--function",
    "functions",
    multiple=True,
    envvar="BURROW_DEV_FUNCTION",
    help="Only this function (name or ARN; repeatable) [default: all in the region].",
)
@option(
    "--stack", envvar="BURROW_DEV_STACK", help="Only the functions of this CloudFormation stack."
)
@option(
    "--public",
    is_flag=True,
    envvar="BURROW_DEV_PUBLIC",
    help="Public TCP ports and rewritten connection strings instead of the extension: the "
    "databases are then reachable from the internet behind their passwords only.",
)
@option(
    "--dry-run", is_flag=True, envvar="BURROW_DEV_DRY_RUN", help="Show the plan; change nothing."
)
@option("--region", envvar="BURROW_DEV_REGION", help="AWS region [default: the AWS config's].")
@option("--profile", envvar="BURROW_DEV_PROFILE", help="AWS profile [default: the AWS config's].")
@option(
    "--function-relay",
    envvar="BURROW_DEV_FUNCTION_RELAY",
    metavar="HOST:PORT|URL",
    help="The relay's address as the functions reach it [default: --to].",
)
@option(
    "--token-key-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_TOKEN_KEY_DIR",
    help="The relay's state directory (its token.key mints the session's tokens) "
    "[default: ~/.local/state/burrow/relay]; for --to wss://..., a directory holding the "
    "serverless stack's token.key (required).",
)
@option(
    "--ttl",
    default="12h",
    show_default=True,
    envvar="BURROW_DEV_TTL",
    help="The session's longest life: its tokens expire then, and the functions are restored.",
)
@option(
    "--layer-zip",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    envvar="BURROW_DEV_LAYER_ZIP",
    help="Publish this layer zip for every function instead of building burrow's.",
)
@option(
    "--layer-arn",
    envvar="BURROW_DEV_LAYER_ARN",
    help="Use this published layer version for every function.",
)
@client_options(embedded=False)
@click.pass_context
def dev(
    ctx: click.Context,
    /,
    locals_: tuple[str, ...],
    functions: tuple[str, ...],
    stack: str | None,
    public: bool,
    dry_run: bool,
    region: str | None,
    profile: str | None,
    function_relay: str | None,
    token_key_dir: Path | None,
    ttl: str,
    layer_zip: Path | None,
    layer_arn: str | None,
    **common: Any,
) -> None:
    """Let deployed Lambda functions use the databases on this machine while this runs.

    Finds the functions whose environment names localhost:PORT (or 127.0.0.1, [::1],
    host.docker.internal), shows what it will change, then offers each --local resource as a
    private service on the relay (a burrow relay, --to HOST:PORT, or the serverless relay,
    --to wss://...) and gives each function burrow's extension with a token for exactly
    those services: inside the function the same localhost:PORT reaches this machine.
    Ctrl+C (or SIGTERM, or closing the terminal) puts every function back; after a crash,
    `burrow dev restore` or the next `burrow dev` does.
    """
    if ctx.invoked_subcommand is not None:
        return
    from burrow.aws.dev import DevConfig
    from burrow.tokens import parse_ttl

    reporter = DevReporter(as_json=common["as_json"])
    try:
        relay = check_relay(common.get("relay_addr"))
        resources = parse_locals(locals_)
        seconds = parse_ttl(ttl)
        if seconds is None:
            raise ConfigError("--ttl must be finite: a dev session's tokens must expire")
        if layer_zip is not None and layer_arn is not None:
            raise ConfigError("--layer-zip and --layer-arn exclude each other: give one")
        if public and (layer_zip is not None or layer_arn is not None):
            raise ConfigError("--public adds no layer: drop --layer-zip/--layer-arn")
        if is_websocket_url(relay):
            check_serverless(
                common,
                public=public,
                token_key_dir=token_key_dir,
                function_relay=function_relay,
                dry_run=dry_run,
            )
        elif function_relay is not None:
            from burrow.addresses import DEFAULT_RELAY_PORT, parse_hostport

            if is_websocket_url(function_relay):
                raise ConfigError(
                    f"--function-relay {function_relay!r} is the serverless relay's URL; with "
                    "--to HOST:PORT give the burrow relay's address as the functions reach it"
                )
            parse_hostport(function_relay, DEFAULT_RELAY_PORT)
        settings = client_settings(common)
        settings.check()
        config = DevConfig(
            locals=resources,
            relay=relay,
            mode="public" if public else "private",
            functions=functions,
            stack=stack,
            region=region,
            profile=profile,
            function_relay=function_relay,
            ttl=seconds,
            key_dir=token_key_dir,
            layer_zip=layer_zip,
            layer_arn=layer_arn,
            dry_run=dry_run,
            state_dir=common.get("state_dir"),
        )
    except BurrowError as exc:
        fail(reporter, exc)
    setup_logging(common["verbose"])
    _warn_reach(reporter, config.function_relay or relay, public)

    async def main_task() -> int:
        from burrow.aws.dev import DevSession

        stop = _stop_event(reporter)
        session = DevSession(config, settings, make_service, on_event=reporter.event)
        reporter.session = session
        try:
            return await session.run(stop)
        finally:
            reporter.detach()

    try:
        code = run(main_task)
    except BurrowError as exc:
        fail(reporter, exc)
    sys.exit(code)


for _param in dev.params:  # the shared client option, with what it means here
    if _param.name == "state_dir" and isinstance(_param, click.Option):
        _param.help = (
            "burrow dev's journal, identity and layer cache [default: ~/.local/state/burrow/dev]."
        )


def _warn_reach(reporter: Reporter, relay: str, public: bool) -> None:
    from burrow.aws.dev import _host_of

    host = _host_of(relay)
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        reporter.event(
            {
                "event": "warning",
                "message": f"functions in AWS cannot reach a relay on loopback ({relay}); "
                "use --to (or --function-relay) with the relay's public address",
            }
        )
    if public:
        reporter.event(
            {
                "event": "warning",
                "message": "--public: each --local resource gets a public port on the relay, "
                "reachable from the internet behind its own password only",
            }
        )


def _stop_event(reporter: Reporter) -> asyncio.Event:
    """SIGINT, SIGTERM and SIGHUP (the terminal closing) end the session with a restore. A
    third one leaves at once: the journal keeps what `burrow dev restore` needs."""
    import asyncio
    import contextlib
    import os
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        if count == 2:
            reporter.event(
                {
                    "event": "warning",
                    "message": "restoring the functions; another signal leaves them for "
                    "`burrow dev restore`",
                }
            )
        elif count >= 3:
            sys.stderr.write("burrow: stopped before restoring: run `burrow dev restore`\n")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    return stop


@dev.command(name="restore")
@option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="burrow dev's state directory [default: ~/.local/state/burrow/dev].",
)
@option("--profile", envvar="BURROW_DEV_PROFILE", help="AWS profile [default: the AWS config's].")
@json_option
@verbose_option
def dev_restore(state_dir: Path | None, profile: str | None, as_json: bool, verbose: int) -> None:
    """Put back the functions a `burrow dev` that died left changed (from its journal)."""
    reporter = DevReporter(as_json=as_json)
    setup_logging(verbose)

    async def main_task() -> int:
        import asyncio

        from burrow.aws.dev import restore_journal, revoke_tokens
        from burrow.aws.journal import Journal, locked
        from burrow.aws.lambdas import Aws
        from burrow.net.tls import default_state_dir

        state = state_dir or default_state_dir("dev")
        with locked(state):
            journal = Journal.load(state)
            if journal is None or not (journal.entries or journal.tokens):
                reporter.event({"event": "warning", "message": f"nothing to restore in {state}"})
                return 0
            failed = 0
            if journal.entries:
                region = next(iter(journal.entries.values())).region
                aws = await asyncio.to_thread(Aws.connect, region, profile)
                failed = await restore_journal(journal, aws, on_event=reporter.event)
            revoke_tokens(journal, reporter.event)
            if failed:
                reporter.error(
                    f"{failed} function(s) not restored; the journal {journal.path} keeps them: "
                    "fix the cause and run `burrow dev restore` again"
                )
                return 1
            return 0

    try:
        code = run(main_task)
    except BurrowError as exc:
        fail(reporter, exc)
    sys.exit(code)
