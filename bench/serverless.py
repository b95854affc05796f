#!/usr/bin/env python3
"""The serverless relay's figures, through the emulator (issue 11): added latency P50/P95
against the same request sent straight to the local service, requests per second with 100
agents, WebSocket messages (and 32 KB billing units) and DynamoDB operations per request,
Lambda invocations per request, and the handlers' import time on a cold interpreter.

    .venv/bin/python bench/serverless.py [--requests 300] [--agents 100] [--per-agent 10]
                                         [--json bench/results/serverless.json]

The emulator has no network: the latency added here is what the handlers, the emulated API
Gateway and the agent cost on this machine, not AWS's hops. Everything runs in this process
(the emulator on its own thread), so the CPU figures include both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from serverless_support import (  # noqa: E402
    EmulatorProcess,
    local_app,
    running_agent,
    visit,
)

DOMAIN = "bench.test"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def latency(emulator: Any, port: int, requests: int) -> dict[str, Any]:
    direct: list[float] = []
    tunneled: list[float] = []
    async with running_agent(emulator, port, "lat"):
        await visit(emulator.http_url, "GET", "/echo", host=f"lat.{DOMAIN}")  # warm a container
        start_stats = emulator.stats()
        for _ in range(requests):
            started = time.perf_counter()
            await visit(f"http://127.0.0.1:{port}", "GET", "/echo")
            direct.append(time.perf_counter() - started)
            started = time.perf_counter()
            answer = await visit(emulator.http_url, "GET", "/echo", host=f"lat.{DOMAIN}")
            tunneled.append(time.perf_counter() - started)
            assert answer.status == 200
        after = emulator.stats()

    def per(key: str) -> float:
        return (after.get(key, 0) - start_stats.get(key, 0)) / requests

    dynamodb = (
        sum(after.get(k, 0) - start_stats.get(k, 0) for k in after if k.startswith("dynamodb."))
        / requests
    )
    added = [t - d for t, d in zip(tunneled, direct, strict=True)]
    return {
        "requests": requests,
        "direct_p50_ms": percentile(direct, 0.5) * 1000,
        "direct_p95_ms": percentile(direct, 0.95) * 1000,
        "tunnel_p50_ms": percentile(tunneled, 0.5) * 1000,
        "tunnel_p95_ms": percentile(tunneled, 0.95) * 1000,
        "added_p50_ms": percentile(added, 0.5) * 1000,
        "added_p95_ms": percentile(added, 0.95) * 1000,
        "ws_messages_per_request": per("ws.in_messages") + per("ws.out_messages"),
        "ws_billed_units_per_request": per("ws.in") + per("ws.out"),
        "dynamodb_ops_per_request": dynamodb,
        "lambda_invocations_per_request": sum(
            after[k] - start_stats.get(k, 0)
            for k in after
            if k.startswith("lambda.") and not k.endswith(".cold")
        )
        / requests,
        "management_calls_per_request": per("manage.POST") + per("manage.GET"),
    }


async def crowd(
    emulator: Any, port: int, agents: int, per_agent: int, rounds: int
) -> dict[str, Any]:
    import contextlib

    names = [f"c{i}" for i in range(agents)]
    async with contextlib.AsyncExitStack() as stack:
        started = time.perf_counter()
        for name in names:
            await stack.enter_async_context(running_agent(emulator, port, name))
        connect_s = time.perf_counter() - started

        async def one(name: str, i: int) -> float:
            t = time.perf_counter()
            answer = await visit(
                emulator.http_url, "GET", f"/echo?i={i}", host=f"{name}.{DOMAIN}", timeout=120
            )
            assert answer.status == 200 and answer.json()["path"] == f"/echo?i={i}"
            return time.perf_counter() - t

        await asyncio.gather(*(one(n, 0) for n in names))  # warm the containers
        cpu = time.process_time()
        emulator_cpu = _cpu(emulator.proc.pid)
        started = time.perf_counter()
        times: list[float] = []
        for _ in range(rounds):
            times += await asyncio.gather(*(one(n, i) for n in names for i in range(per_agent)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        emulator_cpu = _cpu(emulator.proc.pid) - emulator_cpu
    total = len(times)
    return {
        "agents": agents,
        "concurrent_per_agent": per_agent,
        "requests": total,
        "requests_per_s": total / elapsed,
        "p50_ms": statistics.median(times) * 1000,
        "p95_ms": percentile(times, 0.95) * 1000,
        "agent_side_cpu_ms_per_request": cpu / total * 1000,
        "emulator_cpu_ms_per_request": emulator_cpu / total * 1000,
        "agents_connect_s": connect_s,
    }


async def big(emulator: Any, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with running_agent(emulator, port, "big"):
        for label, query in (("text_5mb_inline", "kind=text"), ("binary_5mb_s3", "kind=bin")):
            before = emulator.stats()
            started = time.perf_counter()
            answer = await visit(
                emulator.http_url,
                "GET",
                f"/bytes?n={5 * 1024 * 1024}&{query}",
                host=f"big.{DOMAIN}",
            )
            if answer.status == 307:
                from serverless_support import follow

                answer = await follow(answer)
            elapsed = time.perf_counter() - started
            after = emulator.stats()
            out[label] = {
                "seconds": elapsed,
                "ws_messages": (
                    after.get("ws.in_messages", 0)
                    - before.get("ws.in_messages", 0)
                    + after.get("ws.out_messages", 0)
                    - before.get("ws.out_messages", 0)
                ),
                "ws_billed_units": (
                    after.get("ws.in", 0)
                    - before.get("ws.in", 0)
                    + after.get("ws.out", 0)
                    - before.get("ws.out", 0)
                ),
                "bytes": len(answer.body),
            }
    return out


def import_time() -> dict[str, Any]:
    from burrow.aws.serverless.package import package_bytes

    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "p.zip"
        zip_path.write_bytes(package_bytes())
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)
        samples = []
        boto = []
        for _ in range(5):
            result = subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-X",
                    "importtime",
                    "-c",
                    f"import sys; sys.path.insert(0, {tmp!r}); "
                    "import burrow.aws.serverless.handlers",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            line = [
                x
                for x in result.stderr.splitlines()
                if x.rstrip().endswith("burrow.aws.serverless.handlers")
            ][-1]
            samples.append(int(line.split("|")[1]) / 1000)
            result = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", "import boto3"],
                capture_output=True,
                text=True,
                check=True,
            )
            line = [x for x in result.stderr.splitlines() if x.rstrip().endswith(" boto3")][-1]
            boto.append(int(line.split("|")[1]) / 1000)
        cold = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    f"import sys; sys.path.insert(0, {tmp!r}); "
                    "import burrow.aws.serverless.handlers, boto3; "
                    "boto3.session.Session().client('apigatewaymanagementapi', "
                    "region_name='us-east-1', endpoint_url='https://x/y')",
                ],
                check=True,
            )
            cold.append(time.perf_counter() - started)
        return {
            "handlers_import_ms": statistics.median(samples),
            "boto3_import_ms": statistics.median(boto),
            "interpreter_plus_handlers_plus_boto3_client_ms": statistics.median(cold) * 1000,
            "package_bytes": zip_path.stat().st_size,
        }


async def first_request(tmp: Path, port: int) -> float:
    with EmulatorProcess(tmp / "cold", "--domain", DOMAIN) as emulator:
        async with running_agent(emulator, port, "cold"):
            started = time.perf_counter()
            answer = await visit(emulator.http_url, "GET", "/echo", host=f"cold.{DOMAIN}")
            assert answer.status == 200
            return (time.perf_counter() - started) * 1000


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as tmp, local_app() as port:
        results["cold_first_request_ms"] = await first_request(Path(tmp), port)
        with EmulatorProcess(
            Path(tmp) / "emu", "--domain", DOMAIN, "--concurrency", str(args.concurrency)
        ) as emulator:
            print("latency...", file=sys.stderr)
            results["latency"] = await latency(emulator, port, args.requests)
            print("large answers...", file=sys.stderr)
            results["large"] = await big(emulator, port)
            print(f"{args.agents} agents...", file=sys.stderr)
            results["crowd"] = await crowd(emulator, port, args.agents, args.per_agent, args.rounds)
    results["import"] = import_time()
    return results


def report(results: dict[str, Any]) -> str:
    lat, crowd_, imp = results["latency"], results["crowd"], results["import"]
    lines = [
        "serverless relay through the emulator (this machine, no network)",
        f"  direct           p50 {lat['direct_p50_ms']:.1f} ms  p95 {lat['direct_p95_ms']:.1f} ms",
        f"  through relay    p50 {lat['tunnel_p50_ms']:.1f} ms  p95 {lat['tunnel_p95_ms']:.1f} ms",
        f"  added            p50 {lat['added_p50_ms']:.1f} ms  p95 {lat['added_p95_ms']:.1f} ms"
        "  (goal: P95 < 500 ms)",
        f"  per request: {lat['ws_messages_per_request']:.2f} WebSocket messages "
        f"({lat['ws_billed_units_per_request']:.2f} billed 32 KB units), "
        f"{lat['dynamodb_ops_per_request']:.2f} DynamoDB operations, "
        f"{lat['lambda_invocations_per_request']:.2f} Lambda invocations, "
        f"{lat['management_calls_per_request']:.2f} @connections calls",
        f"  {crowd_['agents']} agents x {crowd_['concurrent_per_agent']} concurrent: "
        f"{crowd_['requests_per_s']:.0f} requests/s over {crowd_['requests']} requests "
        f"(p50 {crowd_['p50_ms']:.0f} ms, p95 {crowd_['p95_ms']:.0f} ms, "
        f"CPU/request: {crowd_['agent_side_cpu_ms_per_request']:.1f} ms agents+visitors+app, "
        f"{crowd_['emulator_cpu_ms_per_request']:.1f} ms emulator+handlers+moto); "
        f"agents connected in {crowd_['agents_connect_s']:.1f} s",
        f"  first request on a cold emulator (gateway connects): "
        f"{results['cold_first_request_ms']:.0f} ms",
    ]
    for label, item in results["large"].items():
        lines.append(
            f"  {label}: {item['seconds']:.2f} s, {item['ws_messages']} messages, "
            f"{item['ws_billed_units']} billed units"
        )
    lines.append(
        f"  handlers import (cold interpreter, -X importtime): {imp['handlers_import_ms']:.1f} ms;"
        f" boto3 import {imp['boto3_import_ms']:.0f} ms; interpreter + handlers + boto3 client "
        f"{imp['interpreter_plus_handlers_plus_boto3_client_ms']:.0f} ms; package "
        f"{imp['package_bytes']} bytes"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--per-agent", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/serverless.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
