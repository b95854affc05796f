"""How long ``burrow doctor postgres://...`` takes against a healthy local PostgreSQL (payload
ladder included): as a command (what a user waits for) and in-process (the doctor's own work).

    .venv/bin/python bench/doctor.py [--runs 10] [--url postgres://postgres@127.0.0.1:5432/test]

Prints the median, best and worst wall time and the per-phase medians. Goal: under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from burrow.doctor import Options, diagnose, parse_target, parse_via


def _command(url: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "burrow.cli", "doctor", url, "--json"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"the doctor failed: {proc.stdout.decode()[-400:]}")
    return times


async def _in_process(url: str, runs: int) -> tuple[list[float], dict[str, list[float]]]:
    times: list[float] = []
    per_phase: dict[str, list[float]] = {}
    for _ in range(runs):
        start = time.perf_counter()
        checklist = await diagnose(parse_target(url), parse_via(None), Options())
        times.append(time.perf_counter() - start)
        if not checklist.passed:
            raise SystemExit(f"the doctor failed: {checklist.verdict()}")
        for result in checklist.results:
            per_phase.setdefault(result.phase, []).append(result.ms)
    return times, per_phase


def _line(label: str, times: list[float]) -> str:
    return (
        f"{label:<12} median {statistics.median(times) * 1000:7.1f} ms   "
        f"best {min(times) * 1000:7.1f} ms   worst {max(times) * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--url", default="postgres://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(_line("command", _command(args.url, args.runs)))
    times, per_phase = asyncio.run(_in_process(args.url, args.runs))
    print(_line("in-process", times))
    print(
        "phases (median ms): "
        + ", ".join(f"{phase} {statistics.median(ms):.1f}" for phase, ms in per_phase.items())
    )


if __name__ == "__main__":
    main()
