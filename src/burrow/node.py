"""A relay with every face its configuration asks for, and the embedded relay the CLI, the
Python API and the tests start on loopback when no relay is named.

``burrow.roles.relay.Relay`` knows sessions, ports and names; the HTTP frontend is a protocol-
aware part above it, so it is plugged in here, by the faces, and never imported by the role.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from burrow.events import EventSink
from burrow.roles import relay as relay_role
from burrow.roles.registry import Registry
from burrow.roles.relay import RelayConfig

__all__ = ["Relay", "RelayConfig", "embedded_relay", "https_context"]


class Relay(relay_role.Relay):
    """``burrow.roles.relay.Relay`` plus the HTTP(S) frontend when ``http_listen`` or
    ``https_listen`` is set."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        on_event: EventSink | None = None,
        registry: Registry | None = None,
    ) -> None:
        config.validate()
        frontends: list[Any] = []
        if config.http_listen is not None or config.https_listen is not None:
            from burrow.http.frontend import HttpFrontend

            listen: list[tuple[str, tuple[str, int], Any]] = []
            if config.http_listen is not None:
                listen.append(("http", config.http_listen, None))
            if config.https_listen is not None:
                listen.append(("https", config.https_listen, https_context(config)))
            frontends.append(HttpFrontend(config.domain, listen, fallback=config.http_fallback))
        super().__init__(config, on_event=on_event, registry=registry, frontends=tuple(frontends))

    @property
    def http(self) -> Any:
        """The HTTP frontend (its ``addresses`` and ``url_for``), or None."""
        return self.frontends[0] if self.frontends else None


def https_context(config: RelayConfig) -> ssl.SSLContext:
    """The HTTPS listener's context: the given certificate, or a self-signed wildcard one
    kept in the relay's state directory."""
    from burrow.net import tls

    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = config.tls_cert, config.tls_key
    else:
        state_dir = (config.state_dir or tls.default_state_dir("relay")) / "https"
        names = (config.domain, f"*.{config.domain}", *config.hostnames)
        pair = tls.load_or_create_relay_cert(state_dir, names)
        cert, key = pair.cert_path, pair.key_path
    context = tls.server_context(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def embedded_relay(
    *,
    http: bool = False,
    secret: str | None = None,
    on_event: EventSink | None = None,
    min_port: int = 20000,
    max_port: int = 60000,
    state_dir: Path | None = None,
) -> Relay:
    """A relay for this process only: loopback, plaintext (nothing leaves the machine), any
    free control port, and with ``http`` an HTTP listener that routes any Host to its one
    tunnel (clients of a loopback relay may not resolve NAME.localhost)."""
    return Relay(
        RelayConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            insecure=True,
            secret=secret,
            http_listen=("127.0.0.1", 0) if http else None,
            http_fallback=True,
            min_port=min_port,
            max_port=max_port,
            state_dir=state_dir,
        ),
        on_event=on_event,
    )
