"""The CLI's presentation: JSON lines, human lines, and the HTTP statistics line."""

from __future__ import annotations

import io
import json

from burrow.cli_output import Reporter, http_stats
from burrow.http.record import Exchange


def _exchange(started: float, duration: float | None) -> Exchange:
    exchange = Exchange("t", "GET", "/", "1.1", [], "127.0.0.1:1", started=started)
    exchange.duration = duration
    return exchange


def test_http_stats_counts_rate_and_percentiles() -> None:
    now = 1000.0
    exchanges = [_exchange(now - 10, i / 100) for i in range(10)]
    exchanges.append(_exchange(now - 120, None))  # old and unfinished: counted, not timed
    line = http_stats(exchanges, now=now)
    assert line.startswith("requests 11 ")
    assert "rate(1m) 0.17/s" in line
    assert "p50 50 ms" in line
    assert "p90 90 ms" in line


def test_http_stats_without_timings() -> None:
    assert http_stats([], now=0.0) == "requests 0  rate(1m) 0.00/s  p50 -  p90 -"


def test_json_reporter_prints_one_object_per_line() -> None:
    out = io.StringIO()
    reporter = Reporter(as_json=True, stream=out)
    reporter.event({"event": "tunnel_ready", "kind": "tcp", "public": "h:1", "local": "l:2"})
    reporter.event({"event": "warning", "message": "x"})
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["tunnel_ready", "warning"]


def test_human_reporter_prints_short_lines() -> None:
    out = io.StringIO()
    reporter = Reporter(as_json=False, stream=out)
    reporter.event(
        {
            "event": "tunnel_ready",
            "kind": "http",
            "url": "http://a.localhost:1",
            "local": "localhost:3000",
            "name": "a",
        }
    )
    reporter.event(
        {"event": "tunnel_ready", "kind": "tcp", "public": "h:1", "local": "l:2", "name": "n"}
    )
    assert out.getvalue().splitlines() == [
        "forwarding http://a.localhost:1 -> localhost:3000",
        "forwarding h:1 -> l:2",
    ]
