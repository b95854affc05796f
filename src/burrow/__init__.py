"""burrow: tunnels between serverless functions, private databases and local services.

The Python API is imported lazily, so ``import burrow`` stays cheap (it matters in Lambda)::

    with burrow.forward(3000) as tunnel:        # a public URL for a local web service
        print(tunnel.url)
    with burrow.connect("db", relay=..., token=...) as (host, port):
        psycopg.connect(host=host, port=port, ...)
"""

from __future__ import annotations

from typing import Any

from burrow.version import __version__ as __version__

__all__ = [
    "Agent",
    "AsyncTunnel",
    "Connector",
    "Relay",
    "Tunnel",
    "aconnect",
    "aforward",
    "connect",
    "forward",
    "open_socket",
]

_LAZY = {
    "forward": "burrow.api",
    "aforward": "burrow.api",
    "connect": "burrow.api",
    "aconnect": "burrow.api",
    "open_socket": "burrow.api",
    "Tunnel": "burrow.api",
    "AsyncTunnel": "burrow.api",
    "Relay": "burrow.roles.relay",
    "Agent": "burrow.roles.agent",
    "Connector": "burrow.roles.connector",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'burrow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
