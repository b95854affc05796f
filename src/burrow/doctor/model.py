"""The doctor's report: phases in a fixed order, each ok / failed / skipped with its time and one
line of detail, and one verdict that names the failing layer, the cause and the fix.

A probe runs a phase with ``Checklist.run``; a step that finds a fault raises ``PhaseFailed``
with the cause and the fix, so the verdict is written where the fact was learnt.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from burrow.errors import BurrowError

PHASES: Final = ("dns", "dial", "hello", "tls", "auth", "session", "query", "payload", "idle")

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class PhaseResult:
    phase: str
    status: Status
    ms: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def event(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": "phase",
            "phase": self.phase,
            "ok": self.ok,
            "ms": round(self.ms, 1),
            "detail": self.detail,
        }
        if self.status == "skipped":
            record["skipped"] = True
        return record


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    layer: str | None
    cause: str
    fix: str

    def event(self, target: str) -> dict[str, Any]:
        return {
            "event": "verdict",
            "ok": self.ok,
            "layer": self.layer,
            "cause": self.cause,
            "fix": self.fix,
            "target": target,
        }


class PhaseFailed(Exception):
    """A phase found the fault: ``detail`` is its line, ``cause``/``fix`` feed the verdict.
    ``go_on`` lets the next phases run when they can still teach something."""

    def __init__(self, detail: str, cause: str, fix: str, *, go_on: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.cause = cause
        self.fix = fix
        self.go_on = go_on


class Stop(Exception):
    """Raised by ``Checklist.run`` after a failure that ends the probe."""


@dataclass
class Checklist:
    """Runs phases in order, times them, reports each as it completes, keeps the first fault."""

    on_phase: Callable[[PhaseResult], None] | None = None
    on_start: Callable[[str], None] | None = None  # a phase begins (a live display's spinner)
    results: list[PhaseResult] = field(default_factory=list)
    failure: tuple[str, PhaseFailed] | None = None
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # layer, cause, fix

    def _record(self, result: PhaseResult) -> None:
        self.results.append(result)
        if self.on_phase is not None:
            self.on_phase(result)

    async def run(self, phase: str, step: Callable[[], Awaitable[str]]) -> bool:
        """Run ``step`` as ``phase``; True if it passed. A failure that should stop the probe
        raises ``Stop`` after it is recorded. A user's error (``BurrowError``) propagates."""
        if self.on_start is not None:
            self.on_start(phase)
        start = time.perf_counter()
        try:
            detail = await step()
        except PhaseFailed as exc:
            failure = exc
        except BurrowError:
            raise
        except Exception as exc:  # a reply no parser foresaw: a finding, not a traceback
            failure = PhaseFailed(
                f"unexpected {type(exc).__name__}: {exc}",
                f"the {phase} phase met a reply the doctor cannot make sense of "
                f"({type(exc).__name__}: {exc})",
                "check what listens on this port; if it is the right service, report this "
                "with the --json output",
            )
        else:
            self._record(PhaseResult(phase, "ok", _ms(start), detail))
            return True
        self._record(PhaseResult(phase, "failed", _ms(start), failure.detail))
        if self.failure is None:
            self.failure = (phase, failure)
        if not failure.go_on:
            raise Stop from None
        return False

    def skip(self, phase: str, detail: str) -> None:
        self._record(PhaseResult(phase, "skipped", 0.0, detail))

    def note(self, layer: str, cause: str, fix: str) -> None:
        """Something that works but changes what the user can rely on (a pooler, ...)."""
        self.notes.append((layer, cause, fix))

    @property
    def passed(self) -> bool:
        return self.failure is None and all(r.status != "failed" for r in self.results)

    def verdict(self) -> Verdict:
        if self.failure is not None:
            phase, exc = self.failure
            return Verdict(False, phase, exc.cause, exc.fix)
        if self.notes:
            layer, cause, fix = self.notes[0]
            return Verdict(True, layer, cause, fix)
        done = [r.phase for r in self.results if r.ok]
        return Verdict(
            True,
            None,
            f"every phase passed ({', '.join(done)})" if done else "nothing to check",
            "nothing to fix",
        )


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
