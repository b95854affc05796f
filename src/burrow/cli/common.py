"""What every command shares: the group, options that also read ``BURROW_*`` variables, the
event loop runner, signal handling, and running a client (agent or connector) until it ends.

A user's mistake ends in one line on stderr (and an ``error`` event with ``--json``) and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError
from burrow.version import __version__

if TYPE_CHECKING:
    import asyncio

    from burrow.roles.settings import ClientSettings

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` that shows its environment variable in ``--help``."""
    attrs.setdefault("show_envvar", True)
    return click.option(*decls, **attrs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="burrow")
def main() -> None:
    """burrow: tunnels between serverless functions, private databases and local services."""


def run(entry: Callable[[], Awaitable[T]]) -> T:
    """Run ``entry`` on uvloop when installed (BURROW_NO_UVLOOP=1 to opt out), with the C heap
    tuned for streaming."""
    import asyncio
    import gc
    import os

    from burrow.net import heap

    heap.tune()
    # What start-up made (modules, classes, functions: most of the process's objects) lives as
    # long as the process: out of the collector's sight, a full collection stops walking it
    # again and again while connections come and go (about 7% of a relay's work per stream).
    gc.freeze()

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not os.environ.get("BURROW_NO_UVLOOP"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(entry())  # type: ignore[arg-type]


class Stopper:
    """SIGINT/SIGTERM handling installed before anything starts, so a signal during start-up
    ends the process as cleanly as one later on."""

    def __init__(self) -> None:
        import asyncio
        import contextlib
        import signal

        loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.event.set)

    async def run(self, *waits: Awaitable[T]) -> T | None:
        """Wait for a signal or the first of ``waits``; its result (or exception), or None."""
        import asyncio

        stop_task = asyncio.ensure_future(self.event.wait())
        tasks = [asyncio.ensure_future(w) for w in waits]
        done, pending = await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            if task in done:
                return task.result()
        return None


def fail(reporter: Reporter, exc: BurrowError) -> NoReturn:
    reporter.error(str(exc))
    sys.exit(exc.exit_code)


def setup_logging(verbose: int) -> None:
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if verbose == 0:
        logging.getLogger("burrow").setLevel(logging.CRITICAL)  # events are printed by Reporter


json_option = option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="BURROW_JSON",
    help="One JSON object per line on stdout.",
)
verbose_option = option(
    "-v", "--verbose", count=True, envvar="BURROW_VERBOSE", help="Log more (-vv for debug)."
)


if TYPE_CHECKING:
    _TextType = click.ParamType[str]
else:  # click before 8.2 has no generic ParamType
    _TextType = click.ParamType


class Lines(_TextType):
    """A repeatable option whose environment variable holds one value per line (header rules
    contain spaces, so whitespace cannot separate them)."""

    name = "text"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value)


def client_options(*, embedded: bool) -> Callable[[F], F]:
    """Options every command that dials a relay shares (agents and connectors). ``embedded``
    says whether the command starts a relay of its own when none is named."""
    to_help = (
        "Relay control address HOST[:PORT] [default port 7835]; without it, an embedded relay "
        "on loopback."
        if embedded
        else "Relay control address HOST[:PORT] [default port 7835] (required)."
    )

    def decorate(f: F) -> F:
        options = [
            option("--to", "relay_addr", envvar="BURROW_RELAY", metavar="RELAY", help=to_help),
            option(
                "--secret",
                envvar="BURROW_SECRET",
                help="The relay's shared secret (visible in `ps`: prefer --secret-file).",
            ),
            option(
                "--secret-file",
                type=click.Path(path_type=Path),
                envvar="BURROW_SECRET_FILE",
                help="Read the relay's shared secret from this file (its first line).",
            ),
            option(
                "--token",
                envvar="BURROW_TOKEN",
                help="A scoped token from `burrow token issue` (visible in `ps`: prefer "
                "--token-file).",
            ),
            option(
                "--token-file",
                type=click.Path(path_type=Path),
                envvar="BURROW_TOKEN_FILE",
                help="Read the scoped token from this file (its first line).",
            ),
            option(
                "--fingerprint",
                envvar="BURROW_FINGERPRINT",
                help="Pin the relay's certificate (sha256:... as `burrow relay` prints).",
            ),
            option(
                "--ca",
                type=click.Path(path_type=Path),
                envvar="BURROW_CA",
                help="Verify the relay's certificate against this CA (PEM).",
            ),
            option(
                "--insecure",
                is_flag=True,
                envvar="BURROW_INSECURE",
                help="Plaintext to the relay (only for a relay started with --insecure).",
            ),
            option(
                "--known-relays",
                type=click.Path(path_type=Path),
                envvar="BURROW_KNOWN_RELAYS",
                help="Trust-on-first-use file [default: ~/.config/burrow/known_relays].",
            ),
            option(
                "--state-dir",
                type=click.Path(path_type=Path),
                envvar="BURROW_STATE_DIR",
                help="Identity and remembered ports/names [default: ~/.local/state/burrow/agent].",
            ),
            option(
                "--connect-timeout",
                type=float,
                default=10.0,
                show_default=True,
                envvar="BURROW_CONNECT_TIMEOUT",
                help="Give up on the first connection after this many seconds.",
            ),
            option(
                "--retry-forever",
                is_flag=True,
                envvar="BURROW_RETRY_FOREVER",
                help="Keep retrying the first connection (for services started before the relay).",
            ),
            json_option,
            verbose_option,
        ]
        for decorator in reversed(options):
            f = decorator(f)
        return f

    return decorate


def client_settings(common: dict[str, Any], **overrides: Any) -> ClientSettings:
    """The shared options as ``ClientSettings`` (``overrides`` fill in what flags left out)."""
    from burrow.roles.settings import ClientSettings

    given = {
        "relay": common.get("relay_addr") or None,
        "secret": secret_from(common.get("secret"), common.get("secret_file"), "--secret"),
        "token": secret_from(common.get("token"), common.get("token_file"), "--token"),
        "fingerprint": common.get("fingerprint"),
        "ca": common.get("ca"),
        "insecure": bool(common.get("insecure")),
        "known_relays": common.get("known_relays"),
        "state_dir": common.get("state_dir"),
        "connect_timeout": common.get("connect_timeout", 10.0),
        "retry_forever": bool(common.get("retry_forever")),
    }
    for key, value in overrides.items():
        if given.get(key) in (None, False):
            given[key] = value
    return ClientSettings(**given)


def secret_from(value: str | None, path: Path | None, flag: str) -> str | None:
    """``value``, or the first line of ``path`` (a secret in a file stays out of ``ps``)."""
    if path is None:
        return value
    if value is not None:
        raise ConfigError(f"{flag} and {flag}-file exclude each other: give one")
    try:
        with path.open("rb") as handle:
            text = handle.read(65537)
    except OSError as exc:
        raise ConfigError(f"cannot read {flag}-file {path}: {exc.strerror or exc}") from None
    if len(text) > 65536:
        raise ConfigError(f"{flag}-file {path} is larger than 64 KiB; is it the right file?")
    line = text.decode("utf-8", "replace").splitlines()[0] if text.strip() else ""
    return line.strip()


def check_name(name: str | None, what: str = "--name") -> str | None:
    """Names are DNS labels (they become NAME.DOMAIN): say so before dialling the relay."""
    if name is None:
        return None
    from burrow.roles.names import NAME_PATTERN

    lowered = name.lower()
    if not NAME_PATTERN.fullmatch(lowered):
        raise ConfigError(
            f"invalid {what} {name!r}: use letters, digits and hyphens (a DNS label, at most "
            "63 characters, not starting or ending with a hyphen)"
        )
    return lowered


def run_client(
    reporter: Reporter,
    build: Callable[[ClientSettings, tuple[str, int] | None], Any],
    settings: ClientSettings,
    *,
    verbose: int = 0,
    embedded_http: bool = False,
    after_start: Callable[[Any], Awaitable[Any]] | None = None,
    reload: Callable[[Any], Awaitable[str]] | None = None,
) -> NoReturn:
    """Build a client (agent or connector), run it until a signal or a failure it cannot
    recover from, and exit with a code that says which; a failure always prints its line.

    Under systemd (``Type=notify``) it says READY=1 once the client is up and STOPPING=1 when
    it ends; with ``reload``, SIGHUP runs it (RELOADING=1 before, READY=1 after)."""
    setup_logging(verbose)
    embedded = settings.relay is None
    client: Any = None
    try:
        settings.check()
        if not embedded:
            client = build(settings, None)
    except BurrowError as exc:
        fail(reporter, exc)

    import asyncio

    async def main_task() -> int:
        nonlocal client
        from burrow.cli.reload import HangupReloads
        from burrow.cli.sdnotify import Notifier
        from burrow.node import embedded_relay

        stopper = Stopper()
        notifier = Notifier()
        relay = None
        extra: list[Any] = []

        async def reload_now() -> None:
            notifier.reloading("reloading")
            status = "reload failed"
            try:
                assert reload is not None
                status = await reload(client)
            finally:
                notifier.ready(status)

        if reload is not None:
            extra.append(HangupReloads(reload_now))
        try:
            if embedded:
                relay = embedded_relay(
                    http=embedded_http,
                    secret=settings.secret,
                    on_event=reporter.embedded_relay_event,
                )
                await relay.start()
                client = build(settings, relay.control_address)
            reporter.attach_agent(client, embedded=embedded)
            await stopper.run(client.start())
            if stopper.event.is_set():
                return 0
            if after_start is not None:
                extra.append(await after_start(client))
            notifier.ready(_ready_status(client))
            for item in extra:
                if isinstance(item, HangupReloads):
                    item.arm()
            failure = await stopper.run(client.wait_failed())
            return failure.exit_code if isinstance(failure, BurrowError) else 0
        finally:
            notifier.stopping()
            reporter.detach()
            for item in extra:
                closing = getattr(item, "close", None)
                if closing is not None:
                    result = closing()
                    if asyncio.iscoroutine(result):
                        await result
            if client is not None:
                await client.close()
            if relay is not None:
                await relay.close()

    try:
        code = run(main_task)
    except BurrowError as exc:
        fail(reporter, exc)
    sys.exit(code)


def _ready_status(client: Any) -> str:
    """systemd's STATUS line once a client is up."""
    tunnels = getattr(client, "tunnels", None)
    if tunnels is not None:
        return f"{len(tunnels)} tunnel{'s' if len(tunnels) != 1 else ''} ready"
    return "ready"
