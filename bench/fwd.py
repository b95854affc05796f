#!/usr/bin/env python3
"""The yardstick for Python: a plain asyncio TCP forwarder, ``fwd.py TARGET_PORT``. It listens
on 127.0.0.1 (a free port, printed as ``PORT n``), joins each connection to 127.0.0.1:TARGET_PORT
with Protocols, backpressure and half-close, and exits when its stdin closes (or after 30 min).

As a TLS pair, the floor of Python's stack under burrow (uvloop and the ssl module, no framing
or multiplexing): ``fwd.py MID --dial-tls CA`` dials MID with TLS, verifying the certificate
against CA; ``fwd.py TARGET --listen-tls CERT KEY`` accepts TLS and dials TARGET in plaintext.
Over TLS an end of data closes the connection (asyncio's TLS transports cannot half-close)."""

import argparse
import asyncio
import os
import socket
import ssl
import sys
import threading
from typing import Any

ARGS = argparse.Namespace(target=0, listen_tls=None, dial_tls=None)
DIAL_TLS: ssl.SSLContext | None = None
LISTEN_TLS: ssl.SSLContext | None = None


def end_writing(transport: Any) -> None:
    """Half-close where the transport can; a TLS transport closes once its buffer is sent."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


class Side(asyncio.Protocol):
    def __init__(self, peer: Any = None) -> None:
        self.peer, self.eof, self.early = peer, False, b""
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.peer is None:  # accepted: dial the target
            self.dialing = asyncio.ensure_future(self.dial())
        elif self.peer.transport.is_closing():
            transport.close()
        else:  # the target answered: pass on what arrived meanwhile, then read again
            self.peer.peer = self
            transport.write(self.peer.early)
            if self.peer.eof:
                end_writing(transport)
            self.peer.transport.resume_reading()

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: Side(self),
                "127.0.0.1",
                ARGS.target,
                ssl=DIAL_TLS,
                server_hostname="localhost" if DIAL_TLS else None,
            )
        except OSError:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:  # bounded: no more reads until the target answers
            self.early += data
            self.transport.pause_reading()
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            end_writing(self.peer.transport)
            if self.peer.eof:  # both directions done
                self.transport.close()
        return True

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(
        Side, "127.0.0.1", 0, backlog=1024, ssl=LISTEN_TLS
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.sleep(1800)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=int)
    ap.add_argument("--listen-tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--dial-tls", metavar="CA")
    ARGS = ap.parse_args()
    if ARGS.listen_tls:
        LISTEN_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        LISTEN_TLS.minimum_version = ssl.TLSVersion.TLSv1_3
        LISTEN_TLS.load_cert_chain(*ARGS.listen_tls)
    if ARGS.dial_tls:
        DIAL_TLS = ssl.create_default_context(cafile=ARGS.dial_tls)
        DIAL_TLS.minimum_version = ssl.TLSVersion.TLSv1_3
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
    try:
        from uvloop import new_event_loop as factory
    except ImportError:
        factory = None  # type: ignore[assignment]
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
