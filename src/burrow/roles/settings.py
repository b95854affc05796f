"""One way to turn what a user gave (flags, a config file, function arguments, a Lambda's
environment) into a ``ClientConfig``: the CLI, the Python API and the Lambda extension all
build their clients here, so a combination refused in one is refused in all, with the same
words, and defaults (port, trust, identity) are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from burrow.addresses import is_websocket_url, parse_relays
from burrow.errors import ConfigError
from burrow.roles.client import CONNECT_TIMEOUT, ClientConfig

C = TypeVar("C", bound=ClientConfig)


@dataclass
class ClientSettings:
    """Everything that says how a client reaches and trusts its relay, as the user gave it.

    ``relay`` None means an embedded relay on loopback (the faces start it and pass its
    address to ``build``); several relays separated by commas are the nodes of a cluster,
    tried in order (``RelayClient`` moves to another when its session dies).
    ``trust_default`` is what an unpinned client trusts: its own known_relays file (trust on
    first use, as SSH) or, where nothing persists (Lambda), the system's CAs.
    ``keep_identity`` keeps an Ed25519 identity in ``state_dir`` so leases (ports, names)
    survive restarts.
    """

    relay: str | None = None
    secret: str | None = None
    token: str | None = None
    fingerprint: str | None = None
    ca: Path | None = None
    insecure: bool = False
    known_relays: Path | None = None
    state_dir: Path | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    retry_forever: bool = False
    trust_default: Literal["tofu", "system"] = "tofu"
    keep_identity: bool = True

    def check(self) -> None:
        """Refuse contradictory or empty settings, each with the flag to change."""
        embedded = self.relay is None
        if self.secret == "":
            raise ConfigError(
                "--secret is empty (is $SECRET unset?); give the relay's secret, or leave it out"
            )
        if self.token == "":
            raise ConfigError("--token is empty; give a token from `burrow token issue`")
        if embedded and (self.fingerprint or self.ca):
            raise ConfigError("--fingerprint and --ca need a relay: pass --to RELAY")
        if not embedded and self.insecure and (self.fingerprint or self.ca):
            raise ConfigError("--insecure turns TLS off; it cannot go with --fingerprint or --ca")
        if self.connect_timeout <= 0:
            raise ConfigError("--connect-timeout must be positive")
        if self.relay is not None and not is_websocket_url(self.relay):
            parse_relays(self.relay)

    def build(self, kind: type[C], *, relay: tuple[str, int] | None = None, **extra: Any) -> C:
        """The role's config (``ClientConfig`` or a subclass, with ``extra`` fields). An
        embedded relay's address comes as ``relay``; the session to it is plaintext, since it
        never leaves the process."""
        from burrow.net.tls import TrustPolicy, default_state_dir

        self.check()
        embedded = self.relay is None
        relays: tuple[tuple[str, int], ...] = ()
        if embedded:
            if relay is None:
                raise ConfigError("no relay: pass --to RELAY (or BURROW_RELAY)")
            address, trust = relay, None
        else:
            assert self.relay is not None
            relays = tuple(parse_relays(self.relay))
            address = relays[0]
            trust = None if self.insecure else self._trust(TrustPolicy)
        identity = None
        if self.keep_identity and not embedded:
            from burrow.roles.identity import load_or_create_identity

            state = self.state_dir or default_state_dir("agent")
            identity = load_or_create_identity(state / "identity.key")
        names = {f.name for f in fields(kind)}
        if "state_dir" in names and "state_dir" not in extra:
            extra["state_dir"] = (
                None if embedded else (self.state_dir or default_state_dir("agent"))
            )
        return kind(
            relay=address,
            secret=self.secret,
            token=self.token or None,
            trust=trust,
            identity_key=identity,
            connect_timeout=self.connect_timeout,
            retry_forever=self.retry_forever,
            relays=relays if len(relays) > 1 else (),
            **extra,
        )

    def _trust(self, policy: Any) -> Any:
        if self.trust_default == "system" and not (self.fingerprint or self.ca):
            return policy(system_ca=True)
        return policy(ca_file=self.ca, fingerprint=self.fingerprint, known_relays=self.known_relays)
