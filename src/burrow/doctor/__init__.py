"""``burrow doctor``: diagnose a connection layer by layer and name the failing one.

    checklist = await diagnose(parse_target(url), parse_via(None), Options(), on_phase=print)
    checklist.verdict()  # Verdict(ok, layer, cause, fix)

The protocol probes (PostgreSQL, MySQL/MariaDB, Redis, HTTP, TCP) run the phases of
``model.PHASES`` in order through a ``Dialer`` that may go through a SOCKS5 or HTTP CONNECT
proxy or burrow's own connector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from burrow.doctor.common import Options
from burrow.doctor.dial import Dialer, Via, parse_via
from burrow.doctor.model import PHASES, Checklist, PhaseResult, Stop, Verdict
from burrow.doctor.target import Target, parse_target, redact

if TYPE_CHECKING:
    from burrow.roles.settings import ClientSettings

__all__ = [
    "PHASES",
    "Checklist",
    "Options",
    "PhaseResult",
    "Target",
    "Verdict",
    "Via",
    "diagnose",
    "parse_target",
    "parse_via",
    "redact",
]


async def diagnose(
    target: Target,
    via: Via,
    options: Options,
    *,
    burrow: ClientSettings | None = None,
    on_phase: Callable[[PhaseResult], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> Checklist:
    """Run every phase that applies to ``target``; the checklist holds results and verdict."""
    from burrow.doctor.probe_mysql import MySqlProbe
    from burrow.doctor.probe_net import HttpProbe, TcpProbe
    from burrow.doctor.probe_pg import PgProbe
    from burrow.doctor.probe_redis import RedisProbe

    probes: dict[str, type[PgProbe | MySqlProbe | RedisProbe | HttpProbe | TcpProbe]] = {
        "pg": PgProbe,
        "mysql": MySqlProbe,
        "redis": RedisProbe,
        "http": HttpProbe,
        "tcp": TcpProbe,
    }
    checklist = Checklist(on_phase, on_start)
    dialer = Dialer(target, via, options.timeout, burrow)
    probe = probes[target.kind](target, dialer, checklist, options)
    try:
        await probe.run()
    except Stop:
        pass
    finally:
        await dialer.close()
    return checklist
