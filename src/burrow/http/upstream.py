"""The agent's connection to the local web service: dialling it (each address of its name, TLS
when it is https://), and one h11 CLIENT per connection, kept across a visitor's keep-alive
requests. Every way dialling fails becomes the page the visitor sees (``burrow.http.pages``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field
from functools import lru_cache

import h11

from burrow.errors import ConfigError
from burrow.http import limits, pages
from burrow.http.policy import HttpOptions


class Retry(Exception):
    """A kept-alive local connection died before answering and nothing is lost by redialling."""


@dataclass(eq=False)
class Upstream:
    """One connection to the local service, kept across a visitor's keep-alive requests."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(
        default_factory=lambda: h11.Connection(
            h11.CLIENT, max_incomplete_event_size=limits.MAX_HEAD
        )
    )
    reused: bool = False
    #: False once the local service framed a response doubtfully (both Content-Length and
    #: Transfer-Encoding): its next bytes are not trusted to start a response.
    keep: bool = True

    def usable(self) -> bool:
        return (
            self.keep
            and self.conn.our_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def send(self, event: h11.Event) -> None:
        data = self.conn.send_with_data_passthrough(event)
        if data:
            self.writer.writelines(data)

    def close(self) -> None:
        self.writer.close()


def _client() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.MAX_HEAD)


def local_ssl_context(options: HttpOptions) -> ssl.SSLContext | None:
    """The TLS context for an https:// local service, or None for http://. Raises
    ``ConfigError`` when ``local_ca`` cannot be loaded, so a CLI can check it at start-up."""
    if not options.local_https:
        return None
    return _ssl_context(str(options.local_ca) if options.local_ca else None, options.local_insecure)


@lru_cache(maxsize=16)
def _ssl_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--local-ca {cafile!r}: cannot load it: {detail}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


async def dial(options: HttpOptions) -> Upstream:
    """Connect to the local service, trying each address of its name; failures raise
    ``pages.Fail`` naming the local address and what went wrong."""
    host, port = options.local
    where = options.local_address
    try:
        context = local_ssl_context(options)
    except ConfigError as exc:
        raise pages.bad_setting(exc) from None
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    try:
        async with asyncio.timeout(options.connect_timeout):
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise pages.unresolvable(host, exc.strerror) from None
            for address in dict.fromkeys(info[4][:2] for info in infos):
                try:
                    reader, writer = await asyncio.open_connection(
                        str(address[0]),
                        int(address[1]),
                        ssl=context,
                        server_hostname=host if context is not None else None,
                        ssl_handshake_timeout=options.connect_timeout if context else None,
                    )
                except ssl.SSLCertVerificationError as exc:
                    raise pages.untrusted_certificate(where, exc.verify_message) from None
                except ssl.SSLError as exc:
                    raise pages.tls_failed(where, exc.reason or exc) from None
                except OSError as exc:
                    errors.append(exc)
                    continue
                return Upstream(reader, writer)
    except TimeoutError:
        raise pages.not_accepted(where, options.connect_timeout) from None
    if errors and all(isinstance(exc, ConnectionRefusedError) for exc in errors):
        raise pages.refused(where)
    why = "; ".join(dict.fromkeys(exc.strerror or str(exc) for exc in errors)) or "no address"
    raise pages.unreachable(where, why)
