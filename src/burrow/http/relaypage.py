"""The pages a relay answers visitors with itself (tunnel offline, not found, ...): one small
HTML page, shared by the relay's HTTP listener and the serverless relay's HTTP handler so a
visitor sees the same page from both. Standard library only: the Lambda package imports it."""

from __future__ import annotations

import html


def page(title: str, message: str) -> bytes:
    heading = html.escape(title)
    return (
        "<!doctype html><meta charset=utf-8><title>"
        f"{heading}</title><style>body{{font:16px system-ui;margin:4em auto;max-width:40em}}"
        f"</style><h1>{heading}</h1><p>{html.escape(message)}</p><hr><small>burrow</small>\n"
    ).encode()


def offline_message(name: str) -> str:
    """Why a visitor got 502: the tunnel's agent is away (the same words on both relays)."""
    return f"The tunnel {name!r} is offline: its agent is not connected right now."


def gone_message(name: str) -> str:
    """Why a visitor got 502 in the middle of a request: the agent left before answering."""
    return (
        f"The tunnel {name!r} went offline before it answered: its agent is not connected "
        "right now."
    )


def not_found_message(name: str) -> str:
    return f"There is no tunnel named {name!r} on this relay."
