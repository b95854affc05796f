"""``burrow dev``: deployed Lambda functions reach the databases on the developer's machine,
privately, and always get their configuration back.

One session: find the functions whose environment points at a local resource, show the plan,
offer each resource as a private service on the relay (an agent), mint a token that may reach
exactly those services and expires with the session, add the extension's layer and
``BURROW_*`` variables to each function (inside the function the same ``localhost:PORT`` then
reaches the laptop), and at the end put every function back. Each change is journaled before
it is made (``burrow.aws.journal``), so a session that dies is undone by ``burrow dev
restore`` or by the next ``burrow dev``; a change someone else made meanwhile is kept
(``burrow.aws.devplan.restore``).

The relay is a burrow relay (``--to HOST:PORT``) or the serverless one (``--to wss://...``,
``aws.serverless``): there the agent is a ``ServerlessAgent`` and the token is minted with the
stack's token key. A serverless relay reads its deny list from the stack's ``RevokedTokens``
parameter, which a session cannot change: its tokens are not revoked at exit, only expire
with the session (``--ttl``), and the session says so.

``--public`` is the stacktape way, for functions that cannot take a layer: public TCP ports on
the relay and connection strings rewritten to them, the database then reachable from the
internet behind its password only (a burrow relay only: the serverless one has no public
TCP ports).
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import importlib
import importlib.util
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from burrow.aws.devplan import (
    FunctionInfo,
    LayerNeed,
    Mode,
    Resource,
    Skip,
    Target,
    desired,
    plan,
    restore,
)
from burrow.aws.journal import Entry, Journal, locked
from burrow.errors import BurrowError, ConfigError, ConnectError
from burrow.events import EventSink, emit

if TYPE_CHECKING:
    from burrow.aws.lambdas import Aws
    from burrow.aws.serverless.agent import ServerlessAgent
    from burrow.roles.agent import Agent
    from burrow.roles.services import Service
    from burrow.roles.settings import ClientSettings

__all__ = [
    "DevConfig",
    "DevError",
    "DevSession",
    "restore_journal",
    "revoke_tokens",
    "service_name",
]

#: How many times a function that keeps changing under burrow is read again.
RACE_ATTEMPTS: Final = 4
DEFAULT_TTL: Final = 12 * 3600

_STACK_KEY_HOW: Final = (
    "put the stack's key (its TokenKeySecret output: `aws secretsmanager get-secret-value "
    "--secret-id SECRET --query SecretString --output text > DIR/token.key`, chmod 600) in a "
    "directory and pass --token-key-dir DIR"
)
SERVERLESS_NO_KEY: Final = (
    "burrow dev --to wss://... mints the functions' token with the serverless stack's token "
    f"key: {_STACK_KEY_HOW}"
)
SERVERLESS_NO_PUBLIC: Final = (
    "--public needs a burrow relay (--to HOST:PORT): the serverless relay has no public TCP "
    "ports; drop --public to reach the resources privately"
)


class DevError(BurrowError):
    """``burrow dev`` cannot go on (no functions, nothing to do, a restore that failed)."""


def service_name(tag: str, name: str) -> str:
    """The private service's name on the relay: the session's tag keeps two developers (or
    two sessions) on one relay apart."""
    return f"dev-{tag}-{name}"


@dataclass
class DevConfig:
    """What the user asked for (the CLI's flags, checked)."""

    locals: list[tuple[str, int]]
    relay: str  # --to, as the laptop dials it
    mode: Mode = "private"
    functions: tuple[str, ...] = ()
    stack: str | None = None
    region: str | None = None
    profile: str | None = None
    function_relay: str | None = None  # what the functions dial, when not --to
    ttl: int = DEFAULT_TTL
    key_dir: Path | None = None
    layer_zip: Path | None = None
    layer_arn: str | None = None
    dry_run: bool = False
    state_dir: Path | None = None
    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    @property
    def serverless(self) -> bool:
        """The relay is the serverless one (``--to wss://...``)."""
        from burrow.addresses import is_websocket_url

        return is_websocket_url(self.relay)

    @property
    def state(self) -> Path:
        from burrow.net.tls import default_state_dir

        return self.state_dir or default_state_dir("dev")

    def resources(self) -> list[Resource]:
        return [Resource(name, port, service_name(self.tag, name)) for name, port in self.locals]


@dataclass
class FunctionStatus:
    state: str  # planned, skipped, updating, updated, failed, restoring, restored
    detail: str = ""


class DevSession:
    """One ``burrow dev`` run. ``make_service(resource, private)`` builds the agent's service
    for a resource (the faces own the table of service kinds)."""

    def __init__(
        self,
        config: DevConfig,
        settings: ClientSettings,
        make_service: Callable[[Resource, bool], Service],
        *,
        on_event: EventSink | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.make_service = make_service
        self.on_event = on_event
        self.resources = config.resources()
        self.agent: Agent | ServerlessAgent | None = None
        self.tunnels: dict[str, str] = {r.name: "starting" for r in self.resources}
        self.functions: dict[str, FunctionStatus] = {}
        self.relay_label = config.relay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._region = config.region or ""
        self._expires: float | None = None  # when the session's tokens expire

    # --- events --------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        emit(self.on_event, event, **fields)

    def _emit_soon(self, event: str, **fields: Any) -> None:
        """From a worker thread: the event goes out on the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self.emit(event, **fields))

    def _agent_event(self, record: dict[str, Any]) -> None:
        name = record.get("event")
        if name == "tunnel_ready":
            for resource in self.resources:
                if record.get("name") in (resource.service,):
                    self.tunnels[resource.name] = "online"
        elif name in ("session_lost", "reconnecting"):
            for key in self.tunnels:
                self.tunnels[key] = "reconnecting"
        elif name == "connected" and self.config.serverless:
            # The serverless agent holds its names again once connected (its welcome).
            for key in self.tunnels:
                self.tunnels[key] = "online"
        if self.on_event is not None:
            self.on_event(record)

    def _status(self, function: str, state: str, detail: str = "") -> None:
        self.functions[function] = FunctionStatus(state, detail)

    # --- the session ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Plan, apply, wait for ``stop`` (or the end of the token's life), restore. The exit
        code: 0, or 1 when something could not be restored."""
        self._loop = asyncio.get_running_loop()
        config = self.config
        with locked(config.state):
            aws = await asyncio.to_thread(_connect_aws, config.region, config.profile)
            self._region = aws.region
            await self._recover(aws)
            functions = await asyncio.to_thread(self._discover, aws)
            plans = await asyncio.to_thread(self._plan_all, aws, functions)
            targets = [p for p in plans if isinstance(p, Target)]
            self._show(plans)
            if config.dry_run:
                return 0
            if not targets:
                raise DevError(
                    "no function refers to a local resource that --local names; nothing to do "
                    "(see the skipped functions above)"
                )
            if stop.is_set():
                return 0
            return await self._session(aws, targets, stop)

    async def _session(self, aws: Aws, targets: list[Target], stop: asyncio.Event) -> int:
        config = self.config
        journal = Journal.at(config.state)
        key, key_dir = self._token_key()
        token = ""
        nothing = False
        if key is not None:
            token, journal.tokens = self._mint(key)
            journal.expires = self._expires
            # A serverless relay's deny list is the stack's parameter, not token.deny: no
            # key_dir, so that nothing pretends to revoke there (revoke_tokens says so).
            journal.key_dir = None if config.serverless else str(key_dir)
            journal.save()  # before anything can use the tokens: a crash still revokes them
        try:
            self.agent = await self._start_agent()
            fingerprint = self._relay_fingerprint()
            layers: dict[LayerNeed, str] = {}
            if config.mode == "private":
                layers = await self._layers(aws, targets)
                targets = [t for t in targets if t.layer is None or t.layer in layers]
            updated = 0
            for target in targets:
                if stop.is_set():
                    break
                done = await asyncio.to_thread(
                    self._apply, aws, journal, target, token, fingerprint, layers
                )
                updated += done
            nothing = updated == 0 and not stop.is_set()
            if not stop.is_set() and updated:
                self.emit(
                    "dev_ready",
                    relay=self.relay_label,
                    mode=config.mode,
                    functions=[n for n, s in self.functions.items() if s.state == "updated"],
                    resources=[self._describe_resource(r) for r in self.resources],
                    expires=int(time.time() + config.ttl),
                )
                await self._wait(stop)
        finally:
            failed = await self._restore_all(aws, journal)
            if self.agent is not None:
                await self.agent.close()
            self._revoke(journal)
        if nothing and not failed:
            self.emit("error", message="no function could be changed (see why above)")
            return 1
        if failed:
            self.emit(
                "error",
                message=f"{failed} function(s) not restored; their original configuration is "
                f"in {journal.path}: run `burrow dev restore`",
            )
            return 1
        return 0

    async def _wait(self, stop: asyncio.Event) -> None:
        assert self.agent is not None
        waits = {
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self.agent.wait_failed()),
            asyncio.ensure_future(asyncio.sleep(self.config.ttl)),
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if stop.is_set():
            return
        for task in done:
            result = task.result()
            if isinstance(result, BurrowError):
                self.emit("warning", message=f"the tunnel failed for good: {result}; restoring")
                return
        self.emit("warning", message="the session reached its --ttl; restoring the functions")

    # --- finding functions ---------------------------------------------------------------

    def _discover(self, aws: Aws) -> list[FunctionInfo]:
        config = self.config
        from burrow.aws.lambdas import Gone

        if config.functions or config.stack:
            names = list(config.functions)
            if config.stack:
                in_stack = aws.stack_functions(config.stack)
                if not in_stack:
                    raise DevError(f"stack {config.stack!r} has no Lambda functions")
                names += [n for n in in_stack if n not in names]
            found: list[FunctionInfo] = []
            for name in names:
                try:
                    found.append(aws.get_function(name))
                except Gone:
                    if name in config.functions:
                        raise DevError(
                            f"function {name!r} is not deployed in {aws.region} "
                            "(check the name, --region and your AWS account)"
                        ) from None
                    self.emit("function_skipped", function=name, reason="not deployed")
            return found
        everything = aws.list_functions()
        if not everything:
            raise DevError(f"no Lambda functions in {aws.region} for this AWS account")
        return everything

    def _plan_all(self, aws: Aws, functions: list[FunctionInfo]) -> list[Target | Skip]:
        config = self.config
        relay_host = _host_of(config.function_relay or config.relay)
        standalone = importlib.util.find_spec("burrow.aws.standalone") is not None
        given = config.layer_zip is not None or config.layer_arn is not None
        plans: list[Target | Skip] = []
        for info in functions:
            routes = aws.routes(info.vpc_id, info.subnets) if info.subnets else None
            plans.append(
                plan(
                    info,
                    self.resources,
                    config.mode,
                    routes=routes,
                    relay_host=relay_host,
                    standalone=standalone,
                    layer_given=given,
                )
            )
        return plans

    def _show(self, plans: Sequence[Target | Skip]) -> None:
        by_port = {r.port: r for r in self.resources}
        self.emit(
            "dev_plan",
            region=self._region,
            mode=self.config.mode,
            change=sum(isinstance(p, Target) for p in plans),
            skip=sum(isinstance(p, Skip) and not p.quiet for p in plans),
            unrelated=sum(isinstance(p, Skip) and p.quiet for p in plans),
            dry_run=self.config.dry_run,
        )
        for item in plans:
            name = item.info.name
            if isinstance(item, Skip):
                self._status(name, "skipped", item.reason)
                self.emit(
                    "function_skipped",
                    function=name,
                    reason=item.reason,
                    quiet=item.quiet,
                    references=[ref.describe() for ref in item.references],
                )
                continue
            self._status(name, "planned")
            changes = self._changes(item)
            self.emit(
                "function_found",
                function=name,
                references=[
                    {
                        "variable": ref.key,
                        "host": ref.host,
                        "port": ref.port,
                        "resource": by_port[ref.port].name,
                        **({"port_variable": ref.port_key} if len(ref.keys) > 1 else {}),
                    }
                    for ref in item.references
                ],
                unmatched=[ref.describe() for ref in item.unmatched],
                changes=changes,
            )

    def _changes(self, target: Target) -> list[str]:
        """What will change, in words (before anything is known of the relay)."""
        if self.config.mode == "public":
            keys = sorted({k for ref in target.references for k in ref.keys})
            return [f"points {', '.join(keys)} at the relay's public ports"]
        changes = []
        if target.layer is not None:
            layer = self.config.layer_arn or f"burrow's layer ({target.layer.describe()})"
            changes.append(f"adds {layer}")
        changes.append("sets BURROW_RELAY, BURROW_TOKEN, BURROW_CONNECT")
        docker = sorted(
            {ref.key for ref in target.references if ref.host.lower() == "host.docker.internal"}
        )
        if docker:
            changes.append(f"host.docker.internal -> 127.0.0.1 in {', '.join(docker)}")
        return changes

    def _describe_resource(self, resource: Resource) -> dict[str, Any]:
        described: dict[str, Any] = {"name": resource.name, "port": resource.port}
        if self.config.mode == "public" and resource.public is not None:
            described["public"] = "{}:{}".format(*resource.public)
        else:
            described["service"] = resource.service
        described["tunnel"] = self.tunnels.get(resource.name, "?")
        return described

    # --- tokens, agent, layers -----------------------------------------------------------

    def _token_key(self) -> tuple[Any, Path | None]:
        """The relay's token key, to mint the session's tokens; None in --public mode when the
        agent has credentials of its own."""
        from burrow.net.tls import default_state_dir
        from burrow.tokens import TokenKey

        settings = self.settings
        if self.config.serverless:
            key_dir = self.config.key_dir
            if key_dir is None:
                raise ConfigError(SERVERLESS_NO_KEY)
            try:
                return TokenKey.load(key_dir), key_dir
            except ConfigError:
                raise ConfigError(
                    f"burrow dev mints the functions' token with the serverless stack's token "
                    f"key, and there is none in {key_dir}: {_STACK_KEY_HOW}"
                ) from None
        key_dir = self.config.key_dir or default_state_dir("relay")
        have_credentials = bool(settings.secret or settings.token)
        if self.config.mode == "public" and have_credentials:
            return None, None
        try:
            return TokenKey.load(key_dir), key_dir
        except ConfigError:
            if self.config.mode == "public":
                return None, None
            raise ConfigError(
                f"burrow dev mints the functions' token with the relay's token key, and there "
                f"is none in {key_dir}: run it where the relay keeps its state, or copy the "
                "relay's token.key (chmod 600) and pass --token-key-dir"
            ) from None

    def _mint(self, key: Any) -> tuple[str, list[str]]:
        """The functions' token (connect to exactly this session's services) and, when the
        user gave the agent no credentials, the agent's (expose exactly them)."""
        from burrow.tokens import mint, parse_token

        names = [r.service for r in self.resources]
        now = time.time()
        self._expires = now + self.config.ttl
        ids: list[str] = []
        token = ""
        if self.config.mode == "private":
            token = mint(key, [], names, self.config.ttl, now, "burrow-dev-functions")
            ids.append(parse_token(token)[0]["id"])
        if not (self.settings.secret or self.settings.token):
            who = f"burrow-dev:{_user()}@{socket.gethostname()}"[:128]
            agent_token = mint(key, names, [], self.config.ttl, now, who)
            self.settings.token = agent_token
            ids.append(parse_token(agent_token)[0]["id"])
        return token, ids

    def _revoke(self, journal: Journal) -> None:
        revoke_tokens(journal, self.on_event, expires=self._expires)

    async def _start_agent(self) -> Agent | ServerlessAgent:
        private = self.config.mode == "private"
        services = [self.make_service(r, private) for r in self.resources]
        settings = self.settings
        if settings.state_dir is None:
            settings.state_dir = self.config.state
        agent: Agent | ServerlessAgent
        if self.config.serverless:
            from burrow.aws.serverless.agent import ServerlessAgent, ServerlessConfig

            if not private:
                raise ConfigError(SERVERLESS_NO_PUBLIC)
            config = ServerlessConfig.from_settings(settings, services)
            agent = ServerlessAgent(config, on_event=self._agent_event)
        else:
            from burrow.roles.agent import Agent, AgentConfig

            agent = Agent(settings.build(AgentConfig, tunnels=services), on_event=self._agent_event)
        try:
            await agent.start()
        except BaseException as exc:
            await agent.close()
            if isinstance(exc, ConnectError):
                raise ConnectError(f"the relay is unreachable: {exc}") from None
            raise
        if not private:
            host = _host_of(self.config.function_relay or self.config.relay)
            self.resources = [
                Resource(r.name, r.port, r.service, (host, int(tunnel.port or 0)))
                for r, tunnel in zip(self.resources, agent.tunnels, strict=True)
            ]
        for resource in self.resources:
            self.tunnels[resource.name] = "online"
        await self._check_local()
        return agent

    async def _check_local(self) -> None:
        """A resource that is not running yet is worth a warning (not an error: it may start
        later, and connections reach it from then on)."""

        async def answers(port: int) -> bool:
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                return False
            writer.close()
            return True

        for resource in self.resources:
            if not await answers(resource.port):
                self.emit(
                    "warning",
                    message=f"nothing answers on 127.0.0.1:{resource.port} ({resource.name}) "
                    "yet: the functions' connections to it will be refused until it runs",
                )

    def _relay_fingerprint(self) -> str | None:
        """The certificate the agent verified: what the functions pin."""
        from burrow.net.tls import fingerprint_of_der

        agent = self.agent
        if self.config.serverless or agent is None:
            return None  # checked against the system's CAs: nothing to pin
        from burrow.roles.agent import Agent

        assert isinstance(agent, Agent)
        if agent.conn is None or agent.conn.transport is None:
            return None
        ssl_object = agent.conn.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return fingerprint_of_der(der) if der else None

    async def _layers(self, aws: Aws, targets: list[Target]) -> dict[LayerNeed, str]:
        """A layer version for each kind of function, published once and reused while its
        content is the same."""
        config = self.config
        needs = {t.layer for t in targets if t.layer is not None}
        result: dict[LayerNeed, str] = {}
        from burrow.version import __version__

        for need in sorted(needs, key=lambda n: (n.kind, n.arch, n.python or "")):
            if config.layer_arn:
                result[need] = config.layer_arn
                continue
            try:
                zip_path = await asyncio.to_thread(self._layer_zip, need)
                arn, published = await asyncio.to_thread(aws.layer, need, zip_path, __version__)
            except BurrowError as exc:
                # Those functions cannot have the extension; the others can still go on.
                for target in targets:
                    if target.layer == need:
                        reason = f"no layer for {need.describe()}: {exc}"
                        self._status(target.info.name, "skipped", reason)
                        self.emit("function_skipped", function=target.info.name, reason=reason)
                continue
            self.emit("layer_ready", layer=arn, published=published, kind=need.describe())
            result[need] = arn
        return result

    def _layer_zip(self, need: LayerNeed) -> Path:
        if self.config.layer_zip is not None:
            if not self.config.layer_zip.is_file():
                raise ConfigError(f"--layer-zip {self.config.layer_zip}: no such file")
            return self.config.layer_zip
        from burrow.aws.lambdas import layer_name

        cache = self.config.state / "layers" / f"{layer_name(need)}-{_source_digest()}.zip"
        if cache.is_file():
            return cache
        self._emit_soon("warning", message=f"building burrow's layer ({need.describe()})")
        if need.kind == "python":
            from burrow.aws.layer import build_layer

            assert need.python is not None
            build_layer(cache, python_version=need.python, arch=need.arch)
        else:
            standalone = importlib.import_module("burrow.aws.standalone")
            standalone.build_standalone_layer(cache, arch=need.arch)
        return cache

    # --- changing functions --------------------------------------------------------------

    def _apply(
        self,
        aws: Aws,
        journal: Journal,
        target: Target,
        token: str,
        fingerprint: str | None,
        layers: dict[LayerNeed, str],
    ) -> int:
        """Change one function (in a worker thread); 1 if it was changed."""
        from burrow.aws.lambdas import AwsError, Gone, Stale

        config = self.config
        name = target.info.name
        self._status(name, "updating")
        try:
            for _ in range(RACE_ATTEMPTS):
                info = aws.wait_settled(target.info.arn)
                if info.env != target.info.env or info.layers != target.info.layers:
                    fresh = self._replan(info)
                    if isinstance(fresh, Skip):
                        self._status(name, "skipped", fresh.reason)
                        self._emit_soon("function_skipped", function=name, reason=fresh.reason)
                        return 0
                    target = fresh
                arn = layers.get(target.layer) if target.layer is not None else None
                env, new_layers = desired(
                    target,
                    self.resources,
                    config.mode,
                    relay=config.function_relay or config.relay,
                    token=token,
                    fingerprint=fingerprint,
                    insecure=self.settings.insecure and not config.serverless,
                    layer_arn=arn,
                )
                entry = Entry(
                    arn=info.arn,
                    name=info.name,
                    region=aws.region,
                    original_env=dict(info.env),
                    original_layers=list(info.layers),
                    applied_env=env,
                    applied_layers=list(new_layers),
                    original_revision=info.revision,
                )
                journal.put(entry)  # on disk before AWS hears of it
                try:
                    aws.update(
                        info.arn, env, new_layers, info.revision, on_retry=self._retrying(name)
                    )
                except Stale:
                    continue
                except Gone:
                    journal.drop(info.arn)
                    raise
                except AwsError as exc:
                    if exc.code and exc.code != "connection":
                        journal.drop(info.arn)  # refused: AWS changed nothing
                    raise
                entry.state = "applied"
                journal.save()
                settled = aws.wait_settled(info.arn)
                if settled.last_update == "Failed":
                    raise AwsError(f"Lambda could not apply the update to {name}")
                keys = sorted(k for k in env if env.get(k) != info.env.get(k))
                self._status(name, "updated", ", ".join(keys))
                self._emit_soon(
                    "function_updated",
                    function=name,
                    variables=keys,
                    layer=arn,
                    connect=env.get("BURROW_CONNECT"),
                )
                return 1
            raise AwsError(f"function {name} kept changing while burrow updated it")
        except AwsError as exc:
            self._status(name, "failed", str(exc))
            self._emit_soon("function_skipped", function=name, reason=str(exc))
            return 0

    def _replan(self, info: FunctionInfo) -> Target | Skip:
        config = self.config
        standalone = importlib.util.find_spec("burrow.aws.standalone") is not None
        given = config.layer_zip is not None or config.layer_arn is not None
        return plan(
            info,
            self.resources,
            config.mode,
            routes={s: True for s in info.subnets},  # checked already, before the plan
            relay_host=_host_of(config.function_relay or config.relay),
            standalone=standalone,
            layer_given=given,
        )

    def _retrying(self, name: str) -> Callable[[str, int, float], None]:
        def note(code: str, attempt: int, delay: float) -> None:
            self._emit_soon(
                "function_retry", function=name, code=code, attempt=attempt, delay=round(delay, 2)
            )

        return note

    # --- restoring -----------------------------------------------------------------------

    async def _restore_all(self, aws: Aws, journal: Journal) -> int:
        """Put every journaled function back; the number that could not be."""
        if not journal.entries:
            return 0
        return await restore_journal(
            journal, aws, on_event=self.on_event, status=self._status, loop=self._loop
        )

    async def _recover(self, aws: Aws) -> None:
        """A journal left by a session that died: restore it before anything else."""
        leftover = Journal.load(self.config.state)
        if leftover is None:
            return
        if leftover.entries:
            self.emit(
                "warning",
                message=f"an earlier burrow dev (pid {leftover.pid}) ended without restoring "
                f"{len(leftover.entries)} function(s): restoring them first",
            )
        failed = await restore_journal(leftover, aws, on_event=self.on_event, loop=self._loop)
        self._revoke(leftover)
        if failed:
            raise DevError(
                f"{failed} function(s) left by an earlier session could not be restored; "
                f"their configuration is in {leftover.path}: fix the cause and run "
                "`burrow dev restore`"
            )


async def restore_journal(
    journal: Journal,
    aws: Aws,
    *,
    on_event: EventSink | None = None,
    status: Callable[[str, str, str], None] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> int:
    """Restore every entry of ``journal`` (each in its own region); the number that failed.
    An entry leaves the journal only once AWS accepted the restore."""
    loop = loop or asyncio.get_running_loop()
    failed = 0
    for entry in list(journal.entries.values()):
        if status is not None:
            status(entry.name, "restoring", "")
        try:
            regional = (
                aws
                if entry.region == aws.region
                else await asyncio.to_thread(aws.for_region, entry.region)
            )
            result, kept = await asyncio.to_thread(_restore_entry, regional, journal, entry)
        except BurrowError as exc:
            failed += 1
            if status is not None:
                status(entry.name, "failed", str(exc))
            emit(on_event, "warning", message=f"could not restore {entry.name}: {exc}")
            continue
        if status is not None:
            detail = {"unchanged": "nothing of burrow's was left", "gone": "deleted meanwhile"}
            kept_text = f"kept what others changed: {', '.join(kept)}" if kept else ""
            status(entry.name, "restored", detail.get(result, kept_text))
        emit(on_event, "function_restored", function=entry.name, result=result, kept=kept)
    return failed


def revoke_tokens(
    journal: Journal, on_event: EventSink | None = None, *, expires: float | None = None
) -> None:
    """Deny a session's tokens (the relay reads its deny list at the next handshake and
    stream), then forget them. A serverless relay's session has tokens but no key_dir: its
    deny list is the stack's RevokedTokens parameter, so they are only said to expire."""
    from burrow.tokens import deny

    if expires is None:
        expires = journal.expires  # a session that crashed: what its journal says
    if journal.tokens and not journal.key_dir:
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires))
            if expires is not None
            else "the session's --ttl"
        )
        emit(
            on_event,
            "tokens_not_revoked",
            tokens=list(journal.tokens),
            expires=int(expires) if expires is not None else None,
            message=f"the serverless relay accepts this session's tokens until they expire "
            f"({when}); to refuse them sooner add {' '.join(journal.tokens)} to the stack's "
            "RevokedTokens parameter",
        )
    if journal.key_dir and journal.tokens:
        for token_id in journal.tokens:
            try:
                deny(Path(journal.key_dir), token_id)
            except (OSError, BurrowError) as exc:
                emit(on_event, "warning", message=f"could not revoke token {token_id}: {exc}")
    journal.tokens = []
    journal.save()


def _restore_entry(aws: Aws, journal: Journal, entry: Entry) -> tuple[str, list[str]]:
    from burrow.aws.lambdas import AwsError, Gone, Stale

    for _ in range(RACE_ATTEMPTS):
        try:
            current = aws.wait_settled(entry.arn)
        except Gone:
            journal.drop(entry.arn)
            return "gone", []
        plan_ = restore(
            (entry.original_env, entry.original_layers),
            (entry.applied_env, entry.applied_layers),
            (current.env, current.layers),
        )
        if not plan_.needed:
            journal.drop(entry.arn)
            return "unchanged", plan_.kept
        try:
            aws.update(entry.arn, plan_.env, plan_.layers, current.revision)
        except Stale:
            continue
        except Gone:
            journal.drop(entry.arn)
            return "gone", []
        settled = aws.wait_settled(entry.arn)
        if settled.last_update == "Failed":
            raise AwsError(f"Lambda could not apply the restore of {entry.name}")
        journal.drop(entry.arn)
        return "restored", plan_.kept
    raise AwsError(f"function {entry.name} kept changing while burrow restored it")


def _connect_aws(region: str | None, profile: str | None) -> Aws:
    from burrow.aws.lambdas import Aws

    return Aws.connect(region, profile)


def _host_of(address: str) -> str:
    """The relay's host, from HOST:PORT or a ws(s):// URL (the VPC route check needs it)."""
    from burrow.addresses import DEFAULT_RELAY_PORT, is_websocket_url, parse_hostport

    if is_websocket_url(address):
        from urllib.parse import urlsplit

        try:
            return urlsplit(address).hostname or address
        except ValueError:
            return address
    try:
        return parse_hostport(address, DEFAULT_RELAY_PORT)[0]
    except ConfigError:
        return address


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _source_digest() -> str:
    """A hash of burrow's own files and version: a cached layer is rebuilt when they change."""
    from burrow.version import __version__

    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
