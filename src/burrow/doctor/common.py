"""What the protocol probes share: options, the first-bytes checks of the ``hello`` phase, the
payload ladder's sizes and timeouts, and the idle phase's reading of how a connection ended.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from burrow.doctor.dial import Dialer
from burrow.doctor.greeting import IDENTIFY_PROBE, identify, preview
from burrow.doctor.link import Link
from burrow.doctor.model import PhaseFailed
from burrow.doctor.pgwire import SSL_REQUEST

#: Payload ladder: 256 B doubling to 1 MiB, so the first size that stalls is within a factor
#: of two of the path's real limit.
LADDER: Final = tuple(256 << i for i in range(13))
#: How long a silent server may take before the doctor asks who it is.
NAT_TIMEOUTS: Final = (
    "known idle timeouts: AWS NAT gateway 350 s, RDS Proxy idle client timeout 1800 s by "
    "default, SSM port forwarding 20 min, Cloud SQL connector's forwarder 30 s"
)
MTU_FIX: Final = (
    "clamp the TCP MSS on the tunnel or VPN path (iptables -t mangle ... -j TCPMSS "
    "--clamp-mss-to-pmtu, or --set-mss 1200), or set the tunnel's MTU to 1280 "
    "(WireGuard/Tailscale); let ICMP 'fragmentation needed' through"
)
KEEPALIVE_FIX: Final = (
    "send TCP keepalives more often than the path's idle timeout (libpq keepalives_idle=60, "
    "tcp_user_timeout), or have the pool pre-ping or recycle idle connections; or raise the "
    "middlebox's idle timeout"
)


@dataclass(frozen=True)
class Options:
    timeout: float = 5.0
    idle: float | None = None
    payload: bool = True


def human(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


def step_timeout(size: int, rtt: float, cap: float) -> float:
    """A payload step's deadline: a second, plus ten round trips, plus the size at 256 KiB/s;
    never more than ``--timeout``."""
    return min(cap, 1.0 + 10 * rtt + size / (256 * 1024))


def not_this_service(expected: str, seen: str) -> PhaseFailed:
    if "TLS server" in seen:
        return PhaseFailed(
            f"{seen} answers here: plaintext {expected} gets nowhere",
            f"this port speaks TLS from the first byte, and the URL asked for plaintext {expected}",
            "use the TLS scheme: rediss:// for Redis, https:// for HTTP, "
            "sslnegotiation=direct for PostgreSQL 17+",
        )
    return PhaseFailed(
        f"{seen} answers here, not {expected}",
        f"this port is served by {seen}, not {expected}",
        "check the port in the URL (and, through a tunnel, the port it forwards to)",
    )


def closed_at_once(expected: str, how: str, via: str) -> PhaseFailed:
    through = via != "direct"
    return PhaseFailed(
        f"the connection was {how} before {expected} said anything",
        (
            f"TCP connected but the far side {how} it at once: "
            + (
                "the proxy's own dial to the target probably failed after it answered"
                if through
                else "a tunnel or forwarder that accepts locally (tun2socks, ssh -L, SST) "
                "could not reach the target, or the server refused this client before "
                "speaking"
            )
        ),
        "check the tunnel's or forwarder's log and that the far side can reach the target; "
        "run the doctor from the far side to compare",
    )


async def second_opinion(dialer: Dialer, timeout: float) -> str | None:
    """On fresh connections, send bytes that make HTTP and Redis servers answer, then a
    PostgreSQL SSLRequest, and name what answered; None when nothing did."""
    for probe in (IDENTIFY_PROBE, SSL_REQUEST):
        try:
            link, _ = await dialer.dial()
        except PhaseFailed:
            return None
        try:
            await link.send(probe, timeout)
            data = await link.recv(min(timeout, 2.0))
        except (TimeoutError, OSError):
            data = b""
        finally:
            await link.close()
        if probe is SSL_REQUEST and data in (b"S", b"N"):
            return f"a PostgreSQL server (it answered {data.decode()!r} to an SSLRequest)"
        if data:
            return identify(data) or f"a service that answered {preview(data)}"
    if await _speaks_tls(dialer, timeout):
        return "a TLS server (it completed a TLS handshake: TLS from the first byte)"
    return None


async def _speaks_tls(dialer: Dialer, timeout: float) -> bool:
    """Whether the port completes a TLS handshake (a TLS-only port drops plaintext silently)."""
    from burrow.doctor.tlsprobe import make_context

    try:
        link, _ = await dialer.dial()
    except PhaseFailed:
        return False
    try:
        await link.start_tls(make_context("require", None, None), None, min(timeout, 2.0))
    except (TimeoutError, OSError):
        return False
    finally:
        await link.close()
    return True


async def hung_up(expected: str, how: str, dialer: Dialer, timeout: float) -> PhaseFailed:
    """The far side closed before speaking: another service that drops unknown bytes, or a
    forwarder whose far leg failed."""
    other = await second_opinion(dialer, timeout)
    if other is not None and expected.split()[0] not in other:
        return not_this_service(expected, other)
    return closed_at_once(expected, how, dialer.via.kind)


async def silent(expected: str, dialer: Dialer, timeout: float) -> PhaseFailed:
    other = await second_opinion(dialer, timeout)
    if other is not None:
        return not_this_service(expected, other)
    return PhaseFailed(
        f"no answer within {timeout:g} s",
        f"the port accepts connections but nothing answers like {expected}: a proxy or "
        "tunnel that holds the connection without reaching the target, or a service that "
        "waits for something else",
        "check what listens on this port, and the far side of any tunnel or proxy",
    )


async def watch_idle(link: Link, seconds: float) -> tuple[bytes, float, str]:
    """Hold ``link`` idle for ``seconds``; return (bytes the server sent, when, how it ended:
    "quiet", "eof" or "reset")."""
    start = time.perf_counter()
    received = b""
    deadline = start + seconds
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return received, time.perf_counter() - start, "quiet"
        try:
            data = await link.recv(left)
        except TimeoutError:
            return received, time.perf_counter() - start, "quiet"
        except (ConnectionError, OSError):
            return received, time.perf_counter() - start, "reset"
        if not data:
            return received, time.perf_counter() - start, "eof"
        received += data
        if len(received) > 64 * 1024:
            return received, time.perf_counter() - start, "quiet"


def idle_dropped(after: float, how: str, idle: float) -> PhaseFailed:
    return PhaseFailed(
        f"connection {how} after {after:.1f} s idle, with no error from the server",
        f"the connection was {how} after {after:.1f} s idle and the server said nothing: a NAT "
        f"or proxy idle timeout on the path ({NAT_TIMEOUTS})",
        KEEPALIVE_FIX,
    )


def idle_hang(idle: float, timeout: float) -> PhaseFailed:
    return PhaseFailed(
        f"after {idle:g} s idle the query got no answer within {timeout:g} s",
        "after the idle period the connection hangs: a firewall or conntrack table dropped its "
        "state silently (no reset, no error)",
        KEEPALIVE_FIX,
    )


async def sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        await asyncio.sleep(left)
