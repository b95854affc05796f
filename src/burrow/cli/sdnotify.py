"""Telling systemd where a ``Type=notify`` service stands (sd_notify(3)): ready, reloading,
stopping. A datagram to ``$NOTIFY_SOCKET``, so units need no wrapper and burrow no dependency;
without the variable (not under systemd) every call does nothing.

``encode`` and ``socket_address`` are pure; ``Notifier`` does the one ``send``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("burrow.sdnotify")

#: Our messages are tens of bytes; a STATUS longer than this is cut (systemd shows one line).
MAX_STATUS = 512
#: A path in sockaddr_un holds 108 bytes with its NUL; systemd's own sockets are far shorter.
_MAX_PATH = 107
_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def socket_address(value: str | None) -> str | bytes | None:
    """Where ``NOTIFY_SOCKET`` points: a path, an abstract name (``@name`` becomes
    ``b"\\0name"``), or None when unset or of a kind this client does not speak (``vsock:``)."""
    if not value:
        return None
    if value.startswith("@"):
        name = value[1:].encode()
        return b"\0" + name if name and len(name) <= _MAX_PATH else None
    if value.startswith("/") and len(value.encode()) <= _MAX_PATH:
        return value
    return None


def encode(fields: Mapping[str, str | int]) -> bytes:
    """``{"READY": 1, "STATUS": "..."}`` as sd_notify's newline-separated assignments. A value
    is one line (newlines become spaces) and STATUS is cut to ``MAX_STATUS`` characters."""
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"not an sd_notify variable name: {key!r}")
        text = " ".join(str(value).splitlines())
        if key == "STATUS":
            text = text[:MAX_STATUS]
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what ``MONOTONIC_USEC`` carries beside RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The service manager's notification socket, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, str | int]) -> bool:
        """Send one message; False if there is no socket or it could not take it. Never raises:
        a service must not fail because its manager stopped listening."""
        if self.address is None:
            return False
        message = encode(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a full queue drops the message, never stalls the loop
                sock.connect(self.address)
                sock.send(message)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send({"READY": 1, **({"STATUS": status} if status else {})})

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; READY=1 must follow when it ends, whatever its outcome."""
        fields: dict[str, str | int] = {"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()}
        if status:
            fields["STATUS"] = status
        return self.send(fields)

    def stopping(self, status: str | None = None) -> bool:
        return self.send({"STOPPING": 1, **({"STATUS": status} if status else {})})

    def status(self, status: str) -> bool:
        return self.send({"STATUS": status})
