"""How an HTTP/1.1 message's body is delimited (RFC 9112 §6.3): a small type for the four ways
a body ends, so code that frames a message says which one it means.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Body(enum.Enum):
    """The four ways a message body ends."""

    NONE = "no body"
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # the chunked coding's last chunk
    UNTIL_CLOSE = "until close"  # the sender closes the connection (responses only)


class Framing(NamedTuple):
    """A message's framing: ``body``; ``length`` for ``Body.LENGTH``; ``close`` when the sender
    ends the connection after this message (``Connection: close``)."""

    body: Body
    length: int = 0
    close: bool = False
