"""``burrow relay status --registry URL``: the nodes of a cluster (address, certificate, load,
last seen) and who holds what, read from the registry they share."""

from __future__ import annotations

import json
from typing import Any

import click

from burrow.cli.common import fail, json_option, option
from burrow.cli_output import Reporter
from burrow.errors import BurrowError, ConfigError, ConnectError


@click.command(name="status")
@option(
    "--registry",
    envvar="BURROW_REGISTRY",
    metavar="URL",
    required=True,
    help="The cluster's Redis (redis://HOST:PORT/DB), as the nodes were given it.",
)
@json_option
def status(registry: str, as_json: bool) -> None:
    """List a cluster's relay nodes and the tunnels they hold."""
    reporter = Reporter(as_json=as_json)
    try:
        report = read_cluster(registry)
    except BurrowError as exc:
        fail(reporter, exc)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(render(report))


def read_cluster(url: str) -> dict[str, Any]:
    """Nodes and leases as the registry holds them now (one consistent read of each)."""
    from burrow.roles import redis_leases as rl
    from burrow.roles.redis_registry import OP_TIMEOUT, check_url, shown_url

    check_url(url)
    try:
        from redis import Redis
        from redis.exceptions import RedisError
    except ImportError:
        raise ConfigError(
            "reading a registry needs redis-py: pip install 'burrow[cluster]'"
        ) from None
    client = Redis.from_url(url, socket_connect_timeout=OP_TIMEOUT, socket_timeout=OP_TIMEOUT)
    try:
        snapshot = client.register_script(rl.SNAPSHOT)
        nodes_reply = snapshot(keys=[rl.REV_KEY], args=[0, rl.CHANNEL, rl.NODE_PREFIX + "*"])
        leases_reply = snapshot(keys=[rl.REV_KEY], args=[0, rl.CHANNEL, rl.LEASE_PREFIX + "*"])
    except (RedisError, OSError) as exc:
        raise ConnectError(f"cannot read the registry {shown_url(url)}: {exc}") from None
    finally:
        client.close()
    now = rl.number(nodes_reply[0])
    nodes = []
    items = nodes_reply[2]
    for i in range(0, len(items) - 1, 2):
        try:
            node = rl.parse_node(rl.pairs(items[i + 1]))
        except ValueError:
            continue
        nodes.append(
            {
                "id": node.id,
                "address": node.address,
                "fingerprint": node.fingerprint,
                "sessions": node.sessions,
                "tunnels": node.tunnels,
                "streams": node.streams,
                "seen_ago": round(max(0.0, now - node.seen), 1),
                "up_for": round(max(0.0, now - node.started), 1) if node.started else None,
                "version": node.version,
            }
        )
    leases = []
    items = leases_reply[2]
    lease_now = rl.number(leases_reply[0])
    for i in range(0, len(items) - 1, 2):
        name = rl.text(items[i]).removeprefix(rl.LEASE_PREFIX)
        key = rl.parse_key_text(name)
        if key is None:
            continue
        try:
            record = rl.Record.parse(key, rl.pairs(items[i + 1]))
        except ValueError:
            continue
        held = record.connected and record.expires > lease_now
        leases.append(
            {
                "key": name,
                "kind": record.kind,
                "node": record.node,
                "owner": record.owner,
                "tunnel": record.tunnel,
                "state": "held" if held else "waiting",
                "free_in": None if held else round(max(0.0, record.lapses() - lease_now), 1),
            }
        )
    nodes.sort(key=lambda n: str(n["id"]))
    leases.sort(key=lambda x: (str(x["node"]), str(x["key"])))
    return {"registry": shown_url(url), "nodes": nodes, "leases": leases}


def render(report: dict[str, Any]) -> str:
    """The report as aligned columns."""
    lines = [f"registry {report['registry']}", "", f"nodes ({len(report['nodes'])}):"]
    rows = [
        [
            str(n["id"]),
            str(n["address"]),
            str(n["fingerprint"] or "plaintext")[:23],
            f"sessions {n['sessions']}",
            f"tunnels {n['tunnels']}",
            f"streams {n['streams']}",
            f"seen {n['seen_ago']} s ago",
        ]
        for n in report["nodes"]
    ]
    lines += _columns(rows) or ["  (none: no node is running)"]
    lines += ["", f"leases ({len(report['leases'])}):"]
    rows = [
        [
            str(x["key"]),
            str(x["kind"]),
            f"node {x['node']}",
            "held" if x["state"] == "held" else f"agent away, free in {x['free_in']} s",
            f"owner {str(x['owner'])[:12]}",
            f"tunnel {x['tunnel']}",
        ]
        for x in report["leases"]
    ]
    lines += _columns(rows) or ["  (none)"]
    return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
