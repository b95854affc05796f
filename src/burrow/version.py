"""burrow's version, in one place: the package, the handshake's ``software`` field and the
build read it from here."""

__version__ = "0.1.0"
