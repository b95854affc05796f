"""The ``dns`` and ``dial`` phases: resolve the target and open a byte stream to it, directly or
through a SOCKS5 proxy, an HTTP CONNECT proxy or burrow's own connector, reporting the exact
answer of whatever is in the way (SOCKS reply code, CONNECT status, burrow's reset reason).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from burrow.doctor.link import Link, set_nodelay
from burrow.doctor.model import PhaseFailed
from burrow.doctor.proxywire import (
    ProxyWireError,
    SocksClient,
    SocksRefused,
    connect_request,
    parse_connect_response,
)
from burrow.doctor.target import Target
from burrow.errors import BurrowError, ConfigError

if TYPE_CHECKING:
    from burrow.roles.settings import ClientSettings

_SOCKS_CAUSES: Final[Mapping[int, tuple[str, str]]] = {
    0x01: (
        "the proxy could not connect to {t} and does not say why (Tailscale's SOCKS server "
        "answers 0x01 to every dial error; after ~5 s it means its dial timed out)",
        "ask the proxy's own log why it failed (tailscaled logs 'socks5: client connection "
        "failed'); an HTTP CONNECT proxy, if it has one, returns the real error",
    ),
    0x02: (
        "the proxy's rules forbid {t} (for a burrow exit: not in its --allow list)",
        "allow {t} on the proxy (burrow: `burrow exit --allow CIDR:PORT`), or use an address "
        "it allows",
    ),
    0x03: (
        "the proxy has no route to the network of {t}",
        "check the routes on the proxy's side (subnet routes accepted? VPC route tables?)",
    ),
    0x04: (
        "the proxy cannot resolve or reach {t}",
        "check the name resolves where the proxy runs, and the routes and security groups "
        "between the proxy and the host",
    ),
    0x05: (
        "{t} refused the proxy's connection: nothing listens there",
        "check the port, and that the server runs and listens on that address",
    ),
    0x06: (
        "the proxy's connection to {t} timed out",
        "a firewall or security group drops the packets, or the return path is asymmetric",
    ),
    0x07: ("the proxy does not support CONNECT", "use a proxy that supports CONNECT"),
    0x08: (
        "the proxy does not support this address type",
        "give the target as an IPv4 address or a name",
    ),
}

_RESET_CAUSES: Final[Mapping[str, tuple[str, str]]] = {
    "refused": _SOCKS_CAUSES[0x05],
    "unreachable": _SOCKS_CAUSES[0x04],
    "timeout": _SOCKS_CAUSES[0x06],
    "not_allowed": (
        "the agent's allow-list or your token's scope forbids {t}",
        "allow it on the exit (`burrow exit --allow CIDR:PORT`) or use a token that may "
        "connect to this service",
    ),
    "no_such_tunnel": (
        "no agent offers this service on the relay",
        "check the name after burrow:, and that its agent is running and connected",
    ),
    "too_many_streams": (
        "the session has too many open streams",
        "close idle connections, or raise the agent's stream limit",
    ),
}


@dataclass(frozen=True)
class Via:
    kind: str  # direct, socks5, http, burrow
    host: str = ""
    port: int = 0
    name: str = ""
    credentials: tuple[str, str] | None = None
    display: str = "direct"


def parse_via(text: str | None) -> Via:
    """``socks5://[USER:PASS@]HOST:PORT``, ``http://HOST:PORT`` or ``burrow:NAME``."""
    if not text:
        return Via("direct")
    if text.startswith("burrow:"):
        name = text[len("burrow:") :].strip().lower()
        if not name or len(name) > 63 or not all(c.isalnum() or c in "-." for c in name):
            raise ConfigError(f"invalid --via {text!r}: expected burrow:NAME (a service or exit)")
        return Via("burrow", name=name, display=f"burrow:{name}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        port, parts = None, urlsplit("")
    scheme = parts.scheme.lower()
    if scheme in ("socks5", "socks5h", "http") and parts.hostname and port:
        credentials = None
        if parts.username is not None:
            credentials = (unquote(parts.username), unquote(parts.password or ""))
        kind = "http" if scheme == "http" else "socks5"
        shown = f"{kind}://{parts.hostname}:{port}"
        return Via(kind, parts.hostname, port, credentials=credentials, display=shown)
    raise ConfigError(
        f"invalid --via {text.split('@')[-1]!r}: expected socks5://HOST:PORT, "
        "http://HOST:PORT or burrow:NAME"
    )


class Dialer:
    """Resolves once, dials as often as a probe needs (a second probe, a retry over TLS)."""

    def __init__(
        self,
        target: Target,
        via: Via,
        timeout: float,
        burrow: ClientSettings | None = None,
    ) -> None:
        self.target = target
        self.via = via
        self.timeout = timeout
        self.burrow = burrow
        self.addresses: list[str] = []
        self._connector: Any = None

    # --- dns ---------------------------------------------------------------------------------

    async def resolve(self) -> str:
        host = self.target.address
        if _is_ip(host):
            self.addresses = [host.strip("[]")]
            return f"{host} is an IP address: nothing to resolve"
        local = await self._local_lookup(host)
        if self.via.kind != "direct":
            where = "the exit" if self.via.kind == "burrow" else f"the proxy ({self.via.display})"
            seen = (
                f"here it resolves to {', '.join(local[:4])}"
                if isinstance(local, list)
                else "it does not resolve here, which is fine"
            )
            return f"{host} is resolved by {where} when it dials; {seen}"
        if not isinstance(local, list):
            raise PhaseFailed(
                f"{host} does not resolve: {local}",
                f"{host} does not resolve with this machine's resolver",
                "check the spelling; a private name (an RDS endpoint, MagicDNS) resolves only "
                "inside its network: use --via so the far side resolves it, or give the IP",
            )
        self.addresses = local
        return f"{host} → {', '.join(local[:4])}" + (" …" if len(local) > 4 else "")

    async def _local_lookup(self, host: str) -> list[str] | str:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, self.target.port, type=socket.SOCK_STREAM)
        except TimeoutError:
            return f"no answer from the resolver within {self.timeout:g} s"
        except socket.gaierror as exc:
            return str(exc.strerror or exc)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    # --- dial --------------------------------------------------------------------------------

    async def fresh(self) -> Link:
        """Another connection like the first, for a retry that only needs the link."""
        link, _ = await self.dial()
        return link

    async def dial(self) -> tuple[Link, str]:
        """A connected Link and the dial phase's detail line; ``PhaseFailed`` otherwise."""
        if self.via.kind == "direct":
            return await self._dial_direct()
        if self.via.kind == "burrow":
            return await self._dial_burrow()
        proxy = (self.via.host, self.via.port)
        reader, writer = await self._tcp(proxy[0], proxy[1], what=f"the proxy {self.via.display}")
        link = Link(reader, writer)
        try:
            if self.via.kind == "socks5":
                detail = await self._socks(link)
            else:
                detail = await self._connect(link)
        except BaseException:
            await link.close()
            raise
        return link, detail

    async def _tcp(
        self, host: str, port: int, *, what: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except TimeoutError:
            raise PhaseFailed(
                f"{what} at {_hp(host, port)}: no answer within {self.timeout:g} s",
                f"TCP SYNs to {_hp(host, port)} go unanswered: a firewall or security group "
                "drops them, the host is down, or the return path is asymmetric",
                "check security groups / firewall rules for this port from this machine, and "
                "that the host is up",
            ) from None
        except ConnectionRefusedError:
            raise PhaseFailed(
                f"{what} at {_hp(host, port)}: connection refused",
                f"nothing listens on {_hp(host, port)} (the host answered the SYN with a reset)",
                "check the port, and that the server runs and listens on this address "
                "(listen_addresses, bind-address, bind)",
            ) from None
        except OSError as exc:
            unreachable = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
            raise PhaseFailed(
                f"{what} at {_hp(host, port)}: {exc.strerror or exc}",
                f"this machine has no route to {host}"
                if unreachable
                else f"cannot connect to {_hp(host, port)}: {exc.strerror or exc}",
                "check routes and the VPN/tunnel that should carry this traffic, or use --via",
            ) from None
        set_nodelay(writer)
        return reader, writer

    async def _dial_direct(self) -> tuple[Link, str]:
        port = self.target.port
        addresses = self.addresses or [self.target.address]
        last: PhaseFailed | None = None
        for address in addresses[:4]:
            try:
                reader, writer = await self._tcp(address, port, what="TCP")
            except PhaseFailed as exc:
                last = exc
                continue
            return Link(reader, writer), f"TCP connected to {_hp(address, port)}"
        assert last is not None
        raise last

    async def _socks(self, link: Link) -> str:
        target = self.target
        client = SocksClient(target.address, target.port, self.via.credentials)
        t = target.dial_hostport
        try:
            await link.send(client.start(), self.timeout)
            while not client.done:
                data = await link.recv(self.timeout)
                if not data:
                    raise PhaseFailed(
                        f"the SOCKS proxy {self.via.display} closed the connection mid-handshake",
                        "the SOCKS proxy hung up before answering (wrong port, or not SOCKS5)",
                        "check that --via names a SOCKS5 proxy",
                    )
                reply = client.receive(data)
                if reply:
                    await link.send(reply, self.timeout)
        except SocksRefused as exc:
            if exc.stage == "auth":
                raise PhaseFailed(
                    f"the SOCKS proxy refused the user and password (status 0x{exc.code:02x})",
                    "the SOCKS proxy does not accept these credentials",
                    "check the user and password in --via socks5://USER:PASS@HOST:PORT",
                ) from None
            cause, fix = _SOCKS_CAUSES.get(
                exc.code, ("the proxy refused with an unassigned code", "see the proxy's log")
            )
            raise PhaseFailed(
                f"{self.via.display} answered {exc} for {t}",
                f"SOCKS 0x{exc.code:02x}: " + cause.format(t=t),
                fix.format(t=t),
            ) from None
        except ProxyWireError as exc:
            raise PhaseFailed(
                f"{self.via.display}: {exc}",
                f"{self.via.display} does not speak SOCKS5 as expected: {exc}",
                "check that --via names a SOCKS5 proxy (not an HTTP one: use http://)",
            ) from None
        except TimeoutError:
            raise PhaseFailed(
                f"the SOCKS proxy gave no answer within {self.timeout:g} s",
                "the SOCKS proxy holds the CONNECT without answering (its dial hangs)",
                "see the proxy's log; raise --timeout if the far side is slow",
            ) from None
        except OSError as exc:
            raise PhaseFailed(
                f"the SOCKS proxy {self.via.display} dropped the connection: {exc}",
                "the SOCKS proxy reset the connection mid-handshake",
                "check that --via names a SOCKS5 proxy, and its log",
            ) from None
        if client.trailing:
            link.unread(client.trailing)
        bound = f", bound {_hp(*client.bound)}" if client.bound else ""
        return f"SOCKS5 {self.via.display}: reply 0x00 (succeeded) for {t}{bound}"

    async def _connect(self, link: Link) -> str:
        t = self.target.dial_hostport
        await link.send(
            connect_request(self.target.address, self.target.port, self.via.credentials),
            self.timeout,
        )
        head = b""
        try:
            while True:
                data = await link.recv(self.timeout)
                if not data:
                    raise PhaseFailed(
                        f"{self.via.display} closed the connection without answering CONNECT",
                        "the HTTP proxy hung up on CONNECT",
                        "check that --via names an HTTP proxy that allows CONNECT",
                    )
                head += data
                response = parse_connect_response(head)
                if response is not None:
                    break
        except ProxyWireError as exc:
            raise PhaseFailed(
                f"{self.via.display}: {exc}",
                f"{self.via.display} is not an HTTP proxy: {exc}",
                "check --via (socks5:// for a SOCKS proxy)",
            ) from None
        except TimeoutError:
            raise PhaseFailed(
                f"{self.via.display} did not answer CONNECT within {self.timeout:g} s",
                "the HTTP proxy holds the CONNECT without answering (its dial hangs)",
                "see the proxy's log; raise --timeout if the far side is slow",
            ) from None
        except OSError as exc:
            raise PhaseFailed(
                f"{self.via.display} dropped the connection on CONNECT: {exc}",
                "the HTTP proxy reset the connection on CONNECT",
                "check that --via names an HTTP proxy that allows CONNECT, and its log",
            ) from None
        said = f"{response.status} {response.reason}".strip()
        error = response.error_header()
        if response.status // 100 != 2:
            why = f": {error}" if error else ""
            raise PhaseFailed(
                f"{self.via.display} answered CONNECT {t} with {said}{why}",
                f"the HTTP proxy refused CONNECT {t} ({said}){why}",
                "407: give credentials (http://USER:PASS@HOST:PORT); 403: the proxy forbids "
                "this target; 502/504: the proxy could not reach it (see its error text)",
            )
        if response.trailing:
            link.unread(response.trailing)
        return f"HTTP CONNECT via {self.via.display}: {said} for {t}"

    async def _dial_burrow(self) -> tuple[Link, str]:
        from burrow.net.channel import ChannelReset

        if self._connector is None:
            self._connector = await self._start_connector()
        connector = self._connector
        t = self.target.dial_hostport
        name = self.via.name
        # NAME is an exit (it dials the URL's host:port) or a private service (its address is
        # fixed); the relay says which by refusing a target for a service.
        target: str | None = t
        for _ in range(2):
            try:
                channel = connector.open_channel(name, target)
            except BurrowError as exc:
                raise PhaseFailed(
                    f"no session to the relay: {exc}",
                    f"the session to the relay is down: {exc}",
                    "check the relay is up, then retry",
                ) from None
            try:
                async with asyncio.timeout(self.timeout):
                    await channel.wait_accepted()
            except TimeoutError:
                channel.reset("timeout", "doctor gave up")
                raise PhaseFailed(
                    f"burrow:{name} did not accept the stream within {self.timeout:g} s",
                    f"the agent offering {name} did not answer in time",
                    "check the agent's log; raise --timeout if the far side is slow",
                ) from None
            except ChannelReset as exc:
                if (
                    target is not None
                    and exc.code == "not_allowed"
                    and "not an exit" in (exc.reason)
                ):
                    target = None
                    continue
                cause, fix = _RESET_CAUSES.get(
                    exc.code, ("the far side reset the stream", "see the agent's log")
                )
                raise PhaseFailed(
                    f"burrow:{name} refused the stream to {t}: reset {exc.code}: "
                    f"{exc.reason or exc.code}",
                    f"burrow reset {exc.code}: " + cause.format(t=t) + f" ({exc.reason})",
                    fix.format(t=t),
                ) from None
            break
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=theirs)
        channel.splice(transport)  # the stream's far half runs on Protocols from here
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        what = f"exit {name} to {t}" if target else f"private service {name}"
        return Link(reader, writer), (
            f"burrow stream to {what} accepted via relay {connector.relay_label}"
        )

    async def _start_connector(self) -> Any:
        from burrow.roles.connector import Connector, ConnectorConfig

        if self.burrow is None or not self.burrow.relay:
            raise ConfigError("--via burrow:NAME needs the relay: pass --to RELAY")
        # The doctor keeps nothing between runs: no identity, a first connection bounded by
        # its own timeout.
        settings = replace(self.burrow, keep_identity=False, connect_timeout=self.timeout)
        connector = Connector(settings.build(ConnectorConfig))
        try:
            await connector.start()
        except BurrowError as exc:
            await connector.close()
            raise PhaseFailed(
                f"relay {settings.relay}: {exc}",
                f"burrow's session to the relay failed: {exc}",
                "check --to, the relay's fingerprint/CA and the token or secret",
            ) from None
        return connector

    async def close(self) -> None:
        if self._connector is not None:
            connector, self._connector = self._connector, None
            await connector.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _hp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
