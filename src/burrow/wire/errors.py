"""Errors of the wire layer: what a peer can do wrong, each with a stable ``code`` that is sent
in the GOAWAY frame, logged as the reason the session closed and counted in metrics.

    BurrowError (burrow.errors)
    ├── ProtocolError           the peer broke the protocol; the session must close
    │   ├── BadPreface          the first bytes are not a burrow client's
    │   ├── FrameTooLarge       a frame announces more than the limit for its type
    │   ├── UnknownFrameType    a frame type this version does not define
    │   ├── BadFrame            a frame's payload does not parse, or arrives in the wrong state
    │   ├── UnknownStream       a frame names a stream that was never opened
    │   ├── FlowControlError    the peer sent more than the window it was given
    │   └── TooManyStreams      the peer opened more streams than allowed
    └── HandshakeRejected       the peer refused the handshake (version, secret); not a protocol bug
"""

from __future__ import annotations

from burrow.errors import BurrowError


class ProtocolError(BurrowError):
    """The peer broke the protocol; the session must close."""

    code = "protocol"


class BadPreface(ProtocolError):
    code = "bad_preface"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnknownFrameType(ProtocolError):
    code = "unknown_frame"


class BadFrame(ProtocolError):
    code = "bad_frame"


class UnknownStream(ProtocolError):
    code = "unknown_stream"


class FlowControlError(ProtocolError):
    code = "flow_control"


class TooManyStreams(ProtocolError):
    code = "too_many_streams"


class HandshakeRejected(BurrowError):
    """The handshake ended in a refusal; ``code`` says which ("auth", "version", ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


DOCUMENTED_ERRORS: tuple[type[Exception], ...] = (ProtocolError, HandshakeRejected)
