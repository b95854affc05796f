"""How much one client may take of a relay: registrations, open streams, stream opens per
second, visitors per tunnel, buffered bytes, and connections that have not authenticated yet.

No clock inside (callers pass ``now``), so the rules are tested without sleeping. Every refusal
names the limit and the flag that raises it; the relay counts it in ``/metrics`` by ``kind``
and logs it at most once per ``LOG_EVERY`` seconds per kind.
"""

from __future__ import annotations

from dataclasses import dataclass

LOG_EVERY = 10.0


@dataclass(frozen=True)
class Limits:
    """Per-relay ceilings; each has a ``--max-...`` flag of ``burrow relay``."""

    registrations_per_session: int = 64
    registrations_per_token: int = 256
    streams_per_session: int = 1024  # streams a client (a connector) has open at once
    streams_per_service: int = 4096  # visitors and connector streams to one tunnel at once
    opens_per_second: float = 500.0  # stream opens per session, with bursts of twice that
    buffer_per_session: int = 64 * 1024 * 1024  # receive windows of one session together
    buffer_total: int = 512 * 1024 * 1024  # ... of every session together
    unauthenticated: int = 512  # connections that have not finished the handshake
    unauthenticated_per_source: int = 64  # ... from one source address

    def check(self) -> None:
        from burrow.errors import ConfigError

        for name, value in vars(self).items():
            if value <= 0:
                raise ConfigError(f"--max-{name.replace('_', '-')} must be positive")
        if self.buffer_per_session < 1024 * 1024:
            raise ConfigError("--max-buffer-per-session must be at least 1 MiB")
        if self.buffer_total < self.buffer_per_session:
            raise ConfigError("--max-buffer-total must be at least --max-buffer-per-session")


class Refused(Exception):
    """A limit was reached; ``kind`` names it (metrics label), ``str()`` says which flag."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class TokenBucket:
    """``rate`` events per second on average, ``burst`` at once."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class Quiet:
    """Says whether a log line of ``kind`` is due: at most one per ``every`` seconds."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def due(self, kind: str, now: float) -> bool:
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        return True

    def take_suppressed(self, kind: str) -> int:
        return self.suppressed.pop(kind, 0)


class Counts:
    """How many of something each key holds, with a ceiling: ``add`` refuses past it."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self._counts: dict[object, int] = {}

    def __getitem__(self, key: object) -> int:
        return self._counts.get(key, 0)

    def full(self, key: object) -> bool:
        return self._counts.get(key, 0) >= self.ceiling

    def add(self, key: object) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, key: object) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)
