"""The heap's tuning: a burst of ends releases free memory once, after the burst; start-up
objects are kept out of the collector's generations."""

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


def test_a_burrow_process_keeps_start_up_objects_out_of_the_collectors_sight() -> None:
    """``run`` freezes what start-up made, so full collections stop walking the modules."""
    import gc

    from burrow.cli.common import run

    class StartUp:  # made before the loop runs, like a role's modules and classes
        pass

    made = StartUp()

    async def entry() -> tuple[int, bool]:
        return gc.get_freeze_count(), gc.is_tracked(made)

    gc.unfreeze()
    try:
        frozen, tracked = run(entry)
        assert frozen > 0
        assert tracked  # frozen objects stay alive and tracked, just not scanned
        assert made not in gc.get_objects()  # the collector's generations no longer hold it
    finally:
        gc.unfreeze()
