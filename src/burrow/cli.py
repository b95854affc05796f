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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
verbose_option = click.option(
    "-v", "--verbose", count=True, envvar="BURROW_VERBOSE", help="Log more (-vv for debug)."
)


if TYPE_CHECKING:
    _TextType = click.ParamType[str]
else:  # click before 8.2 has no generic ParamType
    _TextType = click.ParamType


class _Lines(_TextType):
    """A repeatable option whose environment variable holds one value per line (header rules
    contain spaces, so whitespace cannot separate them)."""

    name = "text"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value)


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
@click.option(
    "--http-listen", envvar="BURROW_HTTP_LISTEN", help="HOST:PORT for HTTP tunnels (by Host name)."
)
@click.option(
    "--https-listen",
    envvar="BURROW_HTTPS_LISTEN",
    help="HOST:PORT for HTTPS tunnels (--tls-cert/--tls-key, or a self-signed certificate).",
)
@click.option(
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
            http_listen=parse_hostport(http_listen, 80, listen=True) if http_listen else None,
            https_listen=parse_hostport(https_listen, 443, listen=True) if https_listen else None,
            domain=domain,
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


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that dials a relay shares (agents and connectors)."""
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
            "--token", envvar="BURROW_TOKEN", help="A scoped token from `burrow token issue`."
        ),
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
            help="Identity and remembered ports/names [default: ~/.local/state/burrow/agent].",
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


def _check_name(name: str | None, what: str = "--name") -> str | None:
    """Names are DNS labels (they become NAME.DOMAIN): say so before dialling the relay."""
    if name is None:
        return None
    from burrow.roles.relay import NAME_PATTERN

    lowered = name.lower()
    if not NAME_PATTERN.fullmatch(lowered):
        raise ConfigError(
            f"invalid {what} {name!r}: use letters, digits and hyphens (a DNS label, at most "
            "63 characters, not starting or ending with a hyphen)"
        )
    return lowered


def _client_config(common: dict[str, Any], *, embedded: bool) -> dict[str, Any]:
    """ClientConfig fields from the shared options; raises ConfigError on bad combinations."""
    from burrow.net.tls import TrustPolicy, default_state_dir
    from burrow.roles.agent import load_or_create_identity

    fingerprint, ca, insecure = common["fingerprint"], common["ca"], common["insecure"]
    if embedded and (fingerprint or ca):
        raise ConfigError("--fingerprint and --ca need a relay: pass --to RELAY")
    if common["connect_timeout"] <= 0:
        raise ConfigError("--connect-timeout must be positive")
    trust = None
    if not embedded and not insecure:
        trust = TrustPolicy(
            ca_file=ca, fingerprint=fingerprint, known_relays=common["known_relays"]
        )
    elif not embedded and (fingerprint or ca):
        raise ConfigError("--insecure turns TLS off; it cannot go with --fingerprint or --ca")
    relay = (
        ("127.0.0.1", 0)
        if embedded
        else parse_hostport(str(common["relay_addr"]), DEFAULT_RELAY_PORT)
    )
    identity = None
    state = None
    if not embedded:
        state = common["state_dir"] or default_state_dir("agent")
        identity = load_or_create_identity(state / "identity.key")
    return {
        "relay": relay,
        "secret": common["secret"],
        "token": common["token"] or None,
        "trust": trust,
        "identity_key": identity,
        "connect_timeout": common["connect_timeout"],
        "retry_forever": common["retry_forever"],
        "state": state,
    }


def _run_client(
    reporter: Reporter,
    build: Callable[[dict[str, Any]], Any],
    common: dict[str, Any],
    *,
    embedded_http: bool = False,
    after_start: Callable[[Any], Awaitable[Any]] | None = None,
) -> None:
    """Build a client (agent or connector) from the options, run it until a signal or a
    failure it cannot recover from, and exit with a code that says which."""
    from burrow.roles.relay import Relay, RelayConfig

    _setup_logging(common["verbose"])
    embedded = not common["relay_addr"]
    try:
        fields = _client_config(common, embedded=embedded)
        client = build(fields)
    except BurrowError as exc:
        _fail(reporter, exc)

    async def run() -> int:
        stopper = _Stopper()
        embedded_relay = None
        extra: list[Any] = []
        if embedded:
            embedded_relay = Relay(
                RelayConfig(
                    listen_host="127.0.0.1",
                    listen_port=0,
                    insecure=True,
                    secret=common["secret"],
                    http_listen=("127.0.0.1", 0) if embedded_http else None,
                    http_fallback=True,
                ),
                on_event=reporter.embedded_relay_event,
            )
            await embedded_relay.start()
            assert embedded_relay.control_address is not None
            client.client_config.relay = embedded_relay.control_address
        reporter.attach_agent(client, embedded=embedded)
        try:
            await stopper.run(client.start())
            if stopper.event.is_set():
                return 0
            if after_start is not None:
                extra.append(await after_start(client))
            failure = await stopper.run(client.wait_failed())
            return failure.exit_code if isinstance(failure, BurrowError) else 0
        finally:
            reporter.detach()
            for item in extra:
                closing = getattr(item, "close", None)
                if closing is not None:
                    result = closing()
                    if asyncio.iscoroutine(result):
                        await result
            await client.close()
            if embedded_relay is not None:
                await embedded_relay.close()

    try:
        code = _run(run)
    except BurrowError as exc:
        _fail(reporter, exc)
    sys.exit(code)


def _run_agent(reporter: Reporter, specs: list[Any], common: dict[str, Any], **kw: Any) -> None:
    from burrow.roles.agent import Agent, AgentConfig

    def build(fields: dict[str, Any]) -> Agent:
        state = fields.pop("state")
        return Agent(
            AgentConfig(**fields, tunnels=specs, state_dir=state, recorder=kw.get("recorder")),
            on_event=reporter.event,
        )

    _run_client(
        reporter,
        build,
        common,
        embedded_http=kw.get("embedded_http", False),
        after_start=kw.get("after_start"),
    )


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
    "--private",
    is_flag=True,
    envvar="BURROW_PRIVATE",
    help="No public port: only connectors with a token for --name reach it.",
)
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    envvar="BURROW_PROXY_PROTOCOL",
    help="Send a PROXY protocol header so the local service sees visitors' addresses.",
)
@client_options
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
    from burrow.roles.agent import TcpTunnelSpec

    reporter = Reporter(as_json=common["as_json"])
    try:
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"invalid --port {port}: expected 1 to 65535")
        if private and not name:
            raise ConfigError("--private needs --name: connectors reach the service by name")
        if private:
            name = _check_name(name)
        if private and port:
            raise ConfigError("--private services have no public port; drop --port")
        spec = TcpTunnelSpec(
            local=parse_local(local),
            port=port or None,
            name=name.lower() if name else None,
            proxy_protocol=proxy_protocol,
            private=private,
        )
    except BurrowError as exc:
        _fail(reporter, exc)
    _run_agent(reporter, [spec], common)


@main.command()
@click.argument("local", envvar="BURROW_LOCAL")
@click.option("--name", envvar="BURROW_NAME", help="Public name: NAME.DOMAIN [default: random].")
@click.option(
    "--local-https",
    is_flag=True,
    envvar="BURROW_LOCAL_HTTPS",
    help="The local service speaks HTTPS.",
)
@click.option(
    "--local-ca",
    type=click.Path(path_type=Path),
    envvar="BURROW_LOCAL_CA",
    help="CA (PEM) to verify the local HTTPS service.",
)
@click.option(
    "--local-insecure",
    is_flag=True,
    envvar="BURROW_LOCAL_INSECURE",
    help="Do not verify the local HTTPS service's certificate.",
)
@click.option(
    "--host-header",
    default="preserve",
    show_default=True,
    envvar="BURROW_HOST_HEADER",
    help="preserve, rewrite (to the local address), or a literal value.",
)
@click.option(
    "--basic-auth",
    multiple=True,
    envvar="BURROW_BASIC_AUTH",
    help="USER:PASS visitors must give (repeatable).",
)
@click.option(
    "--allow",
    "allow_cidrs",
    multiple=True,
    envvar="BURROW_ALLOW",
    help="Only these visitor CIDRs (repeatable).",
)
@click.option(
    "--deny",
    "deny_cidrs",
    multiple=True,
    envvar="BURROW_DENY",
    help="Refuse these visitor CIDRs (repeatable).",
)
@click.option(
    "--request-header-add",
    multiple=True,
    type=_Lines(),
    envvar="BURROW_REQUEST_HEADER_ADD",
    help="'Name: value' to add to requests.",
)
@click.option(
    "--request-header-remove",
    multiple=True,
    type=_Lines(),
    envvar="BURROW_REQUEST_HEADER_REMOVE",
    help="Header to remove from requests.",
)
@click.option(
    "--response-header-add",
    multiple=True,
    type=_Lines(),
    envvar="BURROW_RESPONSE_HEADER_ADD",
    help="'Name: value' to add to responses.",
)
@click.option(
    "--response-header-remove",
    multiple=True,
    type=_Lines(),
    envvar="BURROW_RESPONSE_HEADER_REMOVE",
    help="Header to remove from responses.",
)
@click.option(
    "--inspect",
    default="127.0.0.1:4040",
    show_default=True,
    envvar="BURROW_INSPECT",
    help="Address of the local request inspector.",
)
@click.option(
    "--no-inspect", is_flag=True, envvar="BURROW_NO_INSPECT", help="Do not run the inspector."
)
@client_options
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
    from burrow.http.policy import HttpOptions
    from burrow.roles.agent import HttpTunnelSpec

    reporter = Reporter(as_json=common["as_json"])
    recorder = None
    try:
        options = HttpOptions.for_local(
            local,
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
        spec = HttpTunnelSpec(options=options, name=_check_name(name))
        inspect_at = None if no_inspect else parse_hostport(inspect, 4040, listen=True)
        if inspect_at is not None:
            from burrow.http.inspector import ExchangeStore

            recorder = ExchangeStore()
    except BurrowError as exc:
        _fail(reporter, exc)

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

    _run_agent(
        reporter, [spec], common, recorder=recorder, embedded_http=True, after_start=start_inspector
    )


@main.command(name="exit")
@click.option("--name", required=True, envvar="BURROW_NAME", help="Name connectors use.")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    required=True,
    envvar="BURROW_ALLOW",
    help="CIDR[:PORTS],... the exit may dial (repeatable).",
)
@client_options
def exit_command(name: str, allow: tuple[str, ...], **common: Any) -> None:
    """Dial allow-listed addresses for connectors: a bastion with no sudo and no TUN device."""
    from burrow.allowlist import AllowList
    from burrow.roles.agent import ExitSpec

    reporter = Reporter(as_json=common["as_json"])
    try:
        spec = ExitSpec(name=_check_name(name) or name, allow=AllowList.parse(allow))
    except BurrowError as exc:
        _fail(reporter, exc)
    _run_agent(reporter, [spec], common)


def _connector(reporter: Reporter, services: list[Any]) -> Callable[[dict[str, Any]], Any]:
    from burrow.roles.connector import Connector, ConnectorConfig

    def build(fields: dict[str, Any]) -> Connector:
        fields.pop("state")
        return Connector(ConnectorConfig(**fields, services=services), on_event=reporter.event)

    return build


@main.command()
@click.argument("services", nargs=-1, required=True, envvar="BURROW_CONNECT")
@client_options
def connect(services: tuple[str, ...], **common: Any) -> None:
    """Reach private services as local ports: NAME[=LISTEN] (PORT, HOST:PORT or unix:PATH)."""
    from burrow.roles.connector import ListenSpec

    reporter = Reporter(as_json=common["as_json"])
    try:
        specs = [ListenSpec.parse(item) for text in services for item in text.split(",") if item]
        if common["relay_addr"] in (None, ""):
            raise ConfigError("burrow connect needs a relay: pass --to RELAY (or BURROW_RELAY)")
    except BurrowError as exc:
        _fail(reporter, exc)
    _run_client(reporter, _connector(reporter, specs), common)


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:1055",
    show_default=True,
    envvar="BURROW_SOCKS",
    help="SOCKS5 address.",
)
@click.option(
    "--http-listen", envvar="BURROW_HTTP_PROXY", help="Also an HTTP CONNECT proxy on this address."
)
@click.option(
    "--exit",
    "exit_name",
    envvar="BURROW_EXIT",
    help="Exit that dials HOST:PORT targets (NAME targets go to private services).",
)
@click.option("--auth", envvar="BURROW_SOCKS_AUTH", help="USER:PASS the proxy's clients must give.")
@client_options
def socks(
    listen: str, http_listen: str | None, exit_name: str | None, auth: str | None, **common: Any
) -> None:
    """A SOCKS5 (and HTTP CONNECT) proxy to private services and exits."""
    reporter = Reporter(as_json=common["as_json"])
    try:
        if common["relay_addr"] in (None, ""):
            raise ConfigError("burrow socks needs a relay: pass --to RELAY (or BURROW_RELAY)")
        socks_at = parse_hostport(listen, 1055, listen=True)
        http_at = parse_hostport(http_listen, 1056, listen=True) if http_listen else None
        credentials = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user:
                raise ConfigError("--auth expects USER:PASS")
            credentials = (user, password)
    except BurrowError as exc:
        _fail(reporter, exc)

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

    _run_client(reporter, _connector(reporter, []), common, after_start=start_proxy)


@main.group()
def token() -> None:
    """Scoped tokens: which names a holder may expose or connect to."""


@token.command("issue")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="BURROW_STATE_DIR",
    help="The relay's state directory [default: ~/.local/state/burrow/relay].",
)
@click.option(
    "--expose",
    multiple=True,
    envvar="BURROW_TOKEN_EXPOSE",
    help="Names (globs) the holder may offer.",
)
@click.option(
    "--connect",
    "connect_names",
    multiple=True,
    envvar="BURROW_TOKEN_CONNECT",
    help="Names (globs) the holder may reach.",
)
@click.option(
    "--ttl",
    default="30d",
    show_default=True,
    envvar="BURROW_TOKEN_TTL",
    help="Lifetime: 30d, 12h, 15m, never.",
)
def token_issue(
    state_dir: Path | None, expose: tuple[str, ...], connect_names: tuple[str, ...], ttl: str
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
        key = TokenKey.load_or_create(state_dir or default_state_dir("relay"))
        text = mint(key, list(expose), list(connect_names), seconds, _time.time())
    except BurrowError as exc:
        _fail(reporter, exc)
    from burrow.tokens import parse_token

    claims, _, _ = parse_token(text)
    sys.stderr.write(
        f"token {claims['id']}: expose {list(expose) or '-'}, connect {list(connect_names) or '-'}"
        f", {'no expiry' if seconds is None else 'valid ' + ttl}\n"
    )
    click.echo(text)


@token.command("revoke")
@click.argument("token_id")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="BURROW_STATE_DIR")
def token_revoke(token_id: str, state_dir: Path | None) -> None:
    """Refuse the token with this id from the next handshake or stream on."""
    from burrow.net.tls import default_state_dir
    from burrow.tokens import deny

    reporter = Reporter(as_json=False)
    try:
        deny(state_dir or default_state_dir("relay"), token_id)
    except BurrowError as exc:
        _fail(reporter, exc)
    click.echo(f"revoked {token_id}")


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

    reporter = Reporter(as_json=as_json)
    try:
        file = load_agent_config(config_path)
        specs = [_spec_from_file(t, config_path.parent) for t in file.tunnels]
    except BurrowError as exc:
        _fail(reporter, exc)
    common = {
        "relay_addr": file.relay,
        "secret": file.secret,
        "token": file.token,
        "fingerprint": file.fingerprint,
        "ca": Path(file.ca) if file.ca else None,
        "insecure": file.insecure,
        "known_relays": None,
        "state_dir": None,
        "connect_timeout": 10.0,
        "retry_forever": False,
        "as_json": as_json,
        "verbose": verbose,
    }
    has_http = any(t.kind == "http" for t in file.tunnels)
    _run_agent(reporter, specs, common, embedded_http=has_http)


def _spec_from_file(t: Any, base: Path) -> Any:
    """An agent's tunnel spec from a ``[[tunnel]]`` table of burrow.toml."""
    from burrow.roles.agent import ExitSpec, HttpTunnelSpec, TcpTunnelSpec

    if t.kind == "exit":
        from burrow.allowlist import AllowList

        return ExitSpec(name=t.name.lower(), allow=AllowList.parse(t.allow))
    if t.kind == "http":
        from burrow.http.policy import HttpOptions

        options = HttpOptions.for_local(
            t.local,
            local_https=t.local_https,
            local_ca=(base / t.local_ca) if t.local_ca else None,
            local_insecure=t.local_insecure,
            host_header=t.host_header,
            basic_auth=t.basic_auth,
            allow=t.allow,
            deny=t.deny,
            request_header_add=t.request_header_add,
            request_header_remove=t.request_header_remove,
            response_header_add=t.response_header_add,
            response_header_remove=t.response_header_remove,
        )
        return HttpTunnelSpec(options=options, name=t.name.lower() or None)
    return TcpTunnelSpec(
        local=parse_local(t.local),
        port=t.port,
        name=t.name or None,
        proxy_protocol=t.proxy_protocol,
        private=t.kind == "private",
    )


# --- lambda (appended block: the AWS Lambda extension layer) -------------------------------


@main.group(name="lambda")
def lambda_group() -> None:
    """AWS Lambda: burrow as an extension that gives the function private services."""


@lambda_group.group(name="layer")
def lambda_layer() -> None:
    """The layer that installs the extension (extensions/burrow and python/)."""


@lambda_layer.command(name="build")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default="layer.zip",
    show_default=True,
    envvar="BURROW_LAYER_OUTPUT",
)
@click.option(
    "--python-version",
    default="3.12",
    show_default=True,
    envvar="BURROW_LAYER_PYTHON",
    help="The runtime's Python.",
)
@click.option(
    "--arch",
    default="x86_64",
    show_default=True,
    envvar="BURROW_LAYER_ARCH",
    help="x86_64 or arm64.",
)
@click.option(
    "--no-deps",
    is_flag=True,
    envvar="BURROW_LAYER_NO_DEPS",
    help="Only the burrow package (no download).",
)
def lambda_layer_build(output: Path, python_version: str, arch: str, no_deps: bool) -> None:
    """Build the layer zip; prints its path and size."""
    from burrow.aws.layer import build_layer

    reporter = Reporter(as_json=False)
    try:
        path = build_layer(output, python_version=python_version, arch=arch, no_deps=no_deps)
    except BurrowError as exc:
        _fail(reporter, exc)
    click.echo(f"{path} {path.stat().st_size} bytes")


from burrow.cli_lambda import layer_build as _layer_build; lambda_layer.add_command(_layer_build)  # noqa: E402, E702, I001


if __name__ == "__main__":
    main()
