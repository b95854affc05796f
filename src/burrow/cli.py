"""The ``burrow`` command. Every flag also reads an environment variable (``BURROW_...``).

A user's mistake ends in one line on stderr (and an ``error`` event with ``--json``) and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from burrow import __version__
from burrow.cli_output import Reporter
from burrow.config import parse_hostport, parse_local
from burrow.errors import BurrowError, ConfigError

T = TypeVar("T")

DEFAULT_RELAY_PORT = 7835


def _run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on uvloop when installed (BURROW_NO_UVLOOP=1 to opt out)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not os.environ.get("BURROW_NO_UVLOOP"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())  # type: ignore[arg-type]


class _Stopper:
    """SIGINT/SIGTERM handling installed before anything starts, so a signal during start-up
    ends the process as cleanly as one later on."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.event.set)

    async def run(self, *waits: Awaitable[T]) -> T | None:
        """Wait for a signal or the first of ``waits``; its result (or exception), or None."""
        stop_task = asyncio.ensure_future(self.event.wait())
        tasks = [asyncio.ensure_future(w) for w in waits]
        done, pending = await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            if task in done:
                return task.result()
        return None


def _fail(reporter: Reporter, exc: BurrowError) -> None:
    reporter.error(str(exc))
    sys.exit(exc.exit_code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if verbose == 0:
        logging.getLogger("burrow").setLevel(logging.CRITICAL)  # events are printed by Reporter


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="BURROW_JSON",
    help="One JSON object per line on stdout.",
)
verbose_option = click.option("-v", "--verbose", count=True, help="Log more (-vv for debug).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="burrow")
def main() -> None:
    """burrow: tunnels between serverless functions, private databases and local services."""


# --- relay ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--listen",
    default=f"0.0.0.0:{DEFAULT_RELAY_PORT}",
    show_default=True,
    envvar="BURROW_LISTEN",
    help="Control address agents dial (TLS).",
)
@click.option(
    "--secret",
    envvar="BURROW_SECRET",
    show_envvar=True,
    help="Shared secret agents must prove they know (never sent on the wire).",
)
@click.option("--min-port", type=int, default=1024, show_default=True, envvar="BURROW_MIN_PORT")
@click.option("--max-port", type=int, default=65535, show_default=True, envvar="BURROW_MAX_PORT")
@click.option(
    "--bind-tunnels",
    envvar="BURROW_BIND_TUNNELS",
    help="Address public tunnel ports listen on [default: the --listen host].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="Where the relay keeps its certificate [default: ~/.local/state/burrow/relay].",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    envvar="BURROW_TLS_CERT",
    help="Certificate (PEM) instead of the self-signed one.",
)
@click.option("--tls-key", type=click.Path(path_type=Path), envvar="BURROW_TLS_KEY")
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    envvar="BURROW_HOSTNAME",
    help="Name to put in the self-signed certificate (repeatable).",
)
@click.option(
    "--public-host",
    envvar="BURROW_PUBLIC_HOST",
    help="Host name shown in agents' public addresses.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="BURROW_INSECURE",
    help="Plaintext control port (no TLS). Agents must pass --insecure too.",
)
@click.option(
    "--lease-grace",
    type=float,
    default=60.0,
    show_default=True,
    envvar="BURROW_LEASE_GRACE",
    help="Seconds a port stays reserved for an agent that went away.",
)
@click.option(
    "--heartbeat",
    type=float,
    default=5.0,
    show_default=True,
    envvar="BURROW_HEARTBEAT",
    help="Seconds between pings; a peer silent for 3 intervals is dead.",
)
@click.option("--admin", envvar="BURROW_ADMIN", help="HOST:PORT serving /healthz and /metrics.")
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
    lease_grace: float,
    heartbeat: float,
    admin: str | None,
    as_json: bool,
    verbose: int,
) -> None:
    """Run a relay that agents dial out to."""
    from burrow.roles.relay import Relay, RelayConfig

    _setup_logging(verbose)
    reporter = Reporter(as_json=as_json)
    try:
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
            tls_cert=tls_cert,
            tls_key=tls_key,
            hostnames=hostnames,
            public_host=public_host,
            lease_grace=lease_grace,
            heartbeat=heartbeat,
            admin=parse_hostport(admin, 9090, listen=True) if admin else None,
        )
        server = Relay(config, on_event=reporter.event)
    except BurrowError as exc:
        _fail(reporter, exc)

    async def run() -> None:
        stopper = _Stopper()
        try:
            await stopper.run(server.start())
            if not stopper.event.is_set():
                await stopper.run()
        finally:
            await server.close()

    try:
        _run(run)
    except BurrowError as exc:
        _fail(reporter, exc)


# --- agent ---------------------------------------------------------------------------------


def agent_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--to",
            "relay_addr",
            envvar="BURROW_RELAY",
            metavar="RELAY",
            help="Relay control address HOST[:PORT]; none: an embedded relay on loopback.",
        ),
        click.option("--secret", envvar="BURROW_SECRET", help="The relay's shared secret."),
        click.option(
            "--fingerprint",
            envvar="BURROW_FINGERPRINT",
            help="Pin the relay's certificate (sha256:... as `burrow relay` prints).",
        ),
        click.option(
            "--ca",
            type=click.Path(path_type=Path),
            envvar="BURROW_CA",
            help="Verify the relay's certificate against this CA (PEM).",
        ),
        click.option(
            "--insecure",
            is_flag=True,
            envvar="BURROW_INSECURE",
            help="Plaintext to the relay (only for a relay started with --insecure).",
        ),
        click.option(
            "--known-relays",
            type=click.Path(path_type=Path),
            envvar="BURROW_KNOWN_RELAYS",
            help="Trust-on-first-use file [default: ~/.config/burrow/known_relays].",
        ),
        click.option(
            "--state-dir",
            type=click.Path(path_type=Path),
            envvar="BURROW_STATE_DIR",
            help="Agent identity and remembered ports [default: ~/.local/state/burrow/agent].",
        ),
        click.option(
            "--connect-timeout",
            type=float,
            default=10.0,
            show_default=True,
            envvar="BURROW_CONNECT_TIMEOUT",
            help="Give up on the first connection after this.",
        ),
        click.option(
            "--retry-forever",
            is_flag=True,
            envvar="BURROW_RETRY_FOREVER",
            help="Keep retrying the first connection (for services started before the relay).",
        ),
        json_option,
        verbose_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.argument("local", envvar="BURROW_LOCAL")
@click.option(
    "--port",
    "-p",
    type=int,
    envvar="BURROW_PORT",
    help="Public port to ask for [default: any in the relay's range].",
)
@click.option("--name", envvar="BURROW_NAME", help="Tunnel name (keeps its port across restarts).")
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    envvar="BURROW_PROXY_PROTOCOL",
    help="Send a PROXY protocol header so the local service sees visitors' addresses.",
)
@agent_options
def tcp(
    local: str, port: int | None, name: str | None, proxy_protocol: str | None, **common: Any
) -> None:
    """Expose LOCAL (PORT or HOST:PORT) as a public TCP port on the relay."""
    from burrow.roles.agent import TcpTunnelSpec

    reporter = Reporter(as_json=common["as_json"])
    try:
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"invalid --port {port}: expected 1 to 65535")
        spec = TcpTunnelSpec(
            local=parse_local(local), port=port or None, name=name, proxy_protocol=proxy_protocol
        )
    except BurrowError as exc:
        _fail(reporter, exc)
    _run_agent(reporter, [spec], **common)


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default="burrow.toml",
    show_default=True,
    envvar="BURROW_CONFIG",
)
@click.option("--json", "as_json", is_flag=True, envvar="BURROW_JSON")
@verbose_option
def up(config_path: Path, as_json: bool, verbose: int) -> None:
    """Open every tunnel listed in a config file, in one agent."""
    from burrow.config import load_agent_config
    from burrow.roles.agent import TcpTunnelSpec

    reporter = Reporter(as_json=as_json)
    try:
        file = load_agent_config(config_path)
        specs = [
            TcpTunnelSpec(
                local=parse_local(t.local),
                port=t.port,
                name=t.name or None,
                proxy_protocol=t.proxy_protocol,
            )
            for t in file.tunnels
        ]
    except BurrowError as exc:
        _fail(reporter, exc)
    _run_agent(
        reporter,
        specs,
        relay_addr=file.relay,
        secret=file.secret,
        fingerprint=file.fingerprint,
        ca=Path(file.ca) if file.ca else None,
        insecure=file.insecure,
        known_relays=None,
        state_dir=None,
        connect_timeout=10.0,
        retry_forever=False,
        as_json=as_json,
        verbose=verbose,
    )


def _run_agent(
    reporter: Reporter,
    specs: list[Any],
    *,
    relay_addr: str | None,
    secret: str | None,
    fingerprint: str | None,
    ca: Path | None,
    insecure: bool,
    known_relays: Path | None,
    state_dir: Path | None,
    connect_timeout: float,
    retry_forever: bool,
    as_json: bool,
    verbose: int,
) -> None:
    from burrow.net.tls import TrustPolicy, default_state_dir
    from burrow.roles.agent import Agent, AgentConfig, load_or_create_identity
    from burrow.roles.relay import Relay, RelayConfig

    _setup_logging(verbose)
    embedded = relay_addr is None or relay_addr == ""
    try:
        if embedded and (fingerprint or ca):
            raise ConfigError("--fingerprint and --ca need a relay: pass --to RELAY")
        if connect_timeout <= 0:
            raise ConfigError("--connect-timeout must be positive")
        trust = None
        if not embedded and not insecure:
            trust = TrustPolicy(ca_file=ca, fingerprint=fingerprint, known_relays=known_relays)
        elif not embedded and (fingerprint or ca):
            raise ConfigError("--insecure turns TLS off; it cannot go with --fingerprint or --ca")
        relay_host, relay_port = (
            ("127.0.0.1", 0) if embedded else parse_hostport(str(relay_addr), DEFAULT_RELAY_PORT)
        )
        identity = None
        agent_state = None
        if not embedded:
            agent_state = state_dir or default_state_dir("agent")
            identity = load_or_create_identity(agent_state / "identity.key")
        config = AgentConfig(
            relay=(relay_host, relay_port),
            secret=secret,
            trust=trust,
            tunnels=specs,
            identity_key=identity,
            state_dir=agent_state,
            connect_timeout=connect_timeout,
            retry_forever=retry_forever,
        )
    except BurrowError as exc:
        _fail(reporter, exc)

    async def run() -> int:
        stopper = _Stopper()
        embedded_relay = None
        if embedded:
            embedded_relay = Relay(
                RelayConfig(listen_host="127.0.0.1", listen_port=0, insecure=True, secret=secret),
                on_event=reporter.embedded_relay_event,
            )
            await embedded_relay.start()
            assert embedded_relay.control_address is not None
            config.relay = embedded_relay.control_address
        agent = Agent(config, on_event=reporter.event)
        reporter.attach_agent(agent, embedded=embedded)
        try:
            await stopper.run(agent.start())
            if stopper.event.is_set():
                return 0
            failure = await stopper.run(agent.wait_failed())
            return failure.exit_code if isinstance(failure, BurrowError) else 0
        finally:
            reporter.detach()
            await agent.close()
            if embedded_relay is not None:
                await embedded_relay.close()

    try:
        code = _run(run)
    except BurrowError as exc:
        _fail(reporter, exc)
    sys.exit(code)


if __name__ == "__main__":
    main()
