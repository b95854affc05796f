"""Handshake messages and the proofs they carry. No secret ever crosses the wire.

    client                                   relay
      PREFACE + HELLO {versions, nonce_c, identity?, window}  ->
                     <- CHALLENGE {version, nonce_r, auth, window}
      AUTH {mac?, signature?}                ->
                     <- WELCOME {session} | REJECT {code, message}

``mac`` is HMAC-SHA256 keyed with SHA-256(secret) over the transcript (both nonces), so an
empty secret differs from no secret and a recorded answer is useless on another session.
A scoped token (``burrow.tokens``) is proven the same way: the claims travel, and a MAC keyed
by the token's signature, which only the holder and the relay can compute.
``signature`` is an Ed25519 signature over the same transcript by the client's identity key;
the relay binds port and name leases to that key, so only the same agent gets them back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec

if TYPE_CHECKING:  # identities are rare (agents); a connector's start-up skips these imports
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from burrow.wire.errors import BadFrame

PREFACE: Final = b"BURROW\r\n"
VERSIONS: Final = (1,)
NONCE_SIZE: Final = 32
_TRANSCRIPT_LABEL: Final = b"burrow-auth-v1"
_IDENTITY_LABEL: Final = b"burrow-identity-v1"


class Hello(msgspec.Struct, forbid_unknown_fields=False):
    versions: list[int]
    nonce: str
    window: int
    identity: str | None = None
    software: str = ""


class Challenge(msgspec.Struct, forbid_unknown_fields=False):
    version: int
    nonce: str
    auth: str  # "secret" or "none"
    window: int
    heartbeat: float = 5.0


class Auth(msgspec.Struct, forbid_unknown_fields=False):
    mac: str | None = None
    signature: str | None = None
    token: str | None = None  # a scoped token's claims (public); its signature stays home
    token_mac: str | None = None  # HMAC keyed by the token's signature over the transcript


class Welcome(msgspec.Struct, forbid_unknown_fields=False):
    session: str
    heartbeat: float = 5.0


class Reject(msgspec.Struct, forbid_unknown_fields=False):
    code: str
    message: str


_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(payload: bytes | memoryview, kind: type[T]) -> T:
    """Decode one handshake message; any malformation is a ``BadFrame``."""
    try:
        return msgspec.json.decode(payload, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BadFrame(f"malformed {kind.__name__.lower()} message: {exc}") from None


def transcript(client_nonce: bytes, relay_nonce: bytes) -> bytes:
    return _TRANSCRIPT_LABEL + relay_nonce + client_nonce


def secret_key(secret: str) -> bytes:
    """The HMAC key for ``secret``; hashing first keeps any length of secret valid."""
    return hashlib.sha256(secret.encode()).digest()


def compute_mac(secret: str, client_nonce: bytes, relay_nonce: bytes) -> str:
    tag = hmac.new(secret_key(secret), transcript(client_nonce, relay_nonce), hashlib.sha256)
    return tag.hexdigest()


def verify_mac(secret: str, client_nonce: bytes, relay_nonce: bytes, mac: str) -> bool:
    """Constant-time check of a client's answer."""
    expected = compute_mac(secret, client_nonce, relay_nonce)
    return hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace"))


def public_identity(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sign_identity(key: Ed25519PrivateKey, client_nonce: bytes, relay_nonce: bytes) -> str:
    signature = key.sign(_IDENTITY_LABEL + transcript(client_nonce, relay_nonce))
    return base64.urlsafe_b64encode(signature).decode().rstrip("=")


def verify_identity(identity: str, signature: str, client_nonce: bytes, relay_nonce: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = _b64decode(identity)
        public = Ed25519PublicKey.from_public_bytes(raw)
        public.verify(
            _b64decode(signature), _IDENTITY_LABEL + transcript(client_nonce, relay_nonce)
        )
    except (ValueError, InvalidSignature):
        return False
    return True


def _b64decode(text: str) -> bytes:
    if len(text) > 128:
        raise ValueError("too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise BadFrame("nonce is not hex") from None
    if len(nonce) != NONCE_SIZE:
        raise BadFrame(f"nonce must be {NONCE_SIZE} bytes")
    return nonce
