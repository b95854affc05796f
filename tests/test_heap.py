"""The C heap's tuning: a burst of ends releases free memory once, after the burst."""

from __future__ import annotations

import asyncio

import pytest

from burrow.net import heap

pytestmark = pytest.mark.timeout(10)


def test_a_burst_of_ends_releases_the_heap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "release", lambda: calls.append(1))
    monkeypatch.setattr(heap, "RELEASE_DELAY", 0.05)

    async def main() -> None:
        for _ in range(100):
            heap.release_soon()
        assert calls == []
        await asyncio.sleep(0.2)
        assert calls == [1]
        heap.release_soon()
        await asyncio.sleep(0.2)
        assert calls == [1, 1]

    asyncio.run(main())


def test_tuning_and_releasing_are_safe_to_call_at_any_time() -> None:
    heap.tune()
    heap.release()
    heap.release_soon()  # no running loop: nothing scheduled, nothing raised
