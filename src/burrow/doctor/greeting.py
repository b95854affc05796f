"""Name what is really listening from its first bytes: a greeting it sent unprompted (MySQL,
SSH, SMTP) or its answer to a probe (HTTP, Redis, PostgreSQL, a TLS-only port).

"TCP connects" proves little through a proxy or on a wrong port; the first bytes say which
service is there, and so whether the URL points at the right thing.
"""

from __future__ import annotations

import struct
from typing import Final

#: Bytes that make an HTTP server answer and a Redis server reply with an error, on a fresh
#: connection, when the first probe met silence.
IDENTIFY_PROBE: Final = b"GET / HTTP/1.0\r\n\r\n"


def _first_line(data: bytes, limit: int = 80) -> str:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")[:limit]
    return line.decode("utf-8", "replace")


def identify(data: bytes) -> str | None:
    """A short description of the service whose first bytes are ``data``, or None."""
    if not data:
        return None
    if data.startswith(b"SSH-"):
        return f"an SSH server ({_first_line(data)})"
    if data.startswith(b"HTTP/"):
        return f"an HTTP server ({_first_line(data)})"
    mysql = _mysql(data)
    if mysql is not None:
        return mysql
    if data[:4] in (b"220 ", b"220-"):
        line = _first_line(data)
        kind = (
            "an FTP server"
            if "FTP" in line.upper() and "SMTP" not in line.upper()
            else ("an SMTP server")
        )
        return f"{kind} ({line})"
    if data.startswith(b"+OK"):
        return f"a POP3 server ({_first_line(data)})"
    if data.startswith(b"* OK"):
        return f"an IMAP server ({_first_line(data)})"
    if data[:1] in (b"-", b"+", b"$", b"*", b":", b"%", b"_") and b"\r\n" in data[:256]:
        return f"a Redis server (it replied {_first_line(data)!r})"
    if data[:1] == b"E" and len(data) >= 6 and data[5:6] == b"S":
        return "a PostgreSQL server (it sent an ErrorResponse)"
    if len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03:
        return "a TLS server (it expects TLS from the first byte)"
    if data[:1] in (b"<", b"{") or data.lstrip()[:9].lower() == b"<!doctype":
        return "a server that sent text or markup unprompted"
    return None


def _mysql(data: bytes) -> str | None:
    if len(data) < 5:
        return None
    length = data[0] | data[1] << 8 | data[2] << 16
    if data[3] != 0 or length < 2 or length > 1024:
        return None
    if data[4] == 10:
        end = data.find(b"\0", 5)
        if end < 0:
            return None
        version = data[5:end].decode("utf-8", "replace").removeprefix("5.5.5-")
        product = "MariaDB" if "mariadb" in version.lower() else "MySQL"
        return f"a {product} server (version {version})"
    if data[4] == 0xFF and len(data) >= 7:
        (code,) = struct.unpack_from("<H", data, 5)
        message = data[7:].lstrip(b"#")[5:] if data[7:8] == b"#" else data[7:]
        return f"a MySQL server refusing this client (error {code}: {_first_line(message)})"
    return None


def preview(data: bytes, limit: int = 24) -> str:
    """Printable text, or hex, of the first bytes for a line of output."""
    head = data[:limit]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return repr(head.decode("ascii"))
    return head.hex(" ")
