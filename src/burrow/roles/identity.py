"""The agent's identity: an Ed25519 key kept in its state directory, so the relay gives a
restarted agent its ports and names back (leases belong to identities, not sessions)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from burrow.errors import ConfigError
from burrow.statefiles import create_once


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """The identity kept at ``path`` (mode 0600), made on first use; safe when several agents
    start at once (they all end up with the same key)."""

    def make() -> bytes:
        key = Ed25519PrivateKey.generate()
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    try:
        data, _ = create_once(path, make)
    except OSError as exc:
        raise ConfigError(f"cannot read the agent identity {path}: {exc.strerror}") from None
    try:
        loaded = load_pem_private_key(data, password=None)
    except ValueError:
        raise ConfigError(
            f"{path} is not an agent identity key; delete it to make a new one"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; delete it to make a new one")
    return loaded
