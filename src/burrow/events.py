"""Events: how roles tell their user what happened, one dict per event with stable names.

Roles call an ``EventSink`` (``burrow.cli`` prints JSON lines or human lines; the Python API
and tests collect them). Each event is also logged, so library users see it without a sink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

EventSink = Callable[[dict[str, Any]], None]

log = logging.getLogger("burrow")

_WARNINGS = frozenset({"warning", "reconnecting", "session_lost", "refused"})


def emit(sink: EventSink | None, event: str, **fields: Any) -> None:
    record: dict[str, Any] = {"event": event, **fields}
    level = (
        logging.ERROR
        if event == "error"
        else (logging.WARNING if event in _WARNINGS else logging.INFO)
    )
    if log.isEnabledFor(level):
        log.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
    if sink is not None:
        sink(record)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
