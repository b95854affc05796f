"""How the CLI shows events: JSON lines (``--json``), short human lines, or a live status table
(rich, imported only when stdout is a terminal)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

_HUMAN: dict[str, str] = {
    "relay_ready": "relay listening on {control} (tls: {tls}) fingerprint {fingerprint}",
    "session_opened": "agent connected from {peer}",
    "session_closed": "agent {peer} disconnected: {reason}",
    "session_refused": "refused {peer}: {reason}",
    "tunnel_opened": "tunnel {kind} port {port} opened for {peer}",
    "tunnel_closed": "tunnel {kind} port {port} closed",
    "tunnel_refused": "refused a tunnel for {peer}: {message}",
    "lease_expired": "lease on port {port} expired",
    "connected": "connected to relay {relay} (tls: {tls})",
    "tunnel_ready": "forwarding {public} -> {local}",
    "session_lost": "lost the relay {relay}: {reason}",
    "reconnecting": "reconnecting to {relay} in {delay}s (attempt {attempt}): {reason}",
    "warning": "warning: {message}",
    "inspector_ready": "inspector at {url}",
    "http_ready": "HTTP tunnels at {example}",
    "stream_refused": "refused a stream from {peer} to {service}: {reason}",
    "tokens_required": "no --secret: agents need a token ({hint}); key {key}",
    "connection_refused": "{service}: connection refused by the relay: {reason} ({count} so far)",
    "tunnel_removed": "closed {kind} tunnel {name}",
    "reloaded": "reloaded {config}: added {added}, removed {removed}, changed {changed}",
    "emulator_ready": "serverless relay emulator: agents --to {ws}, visitors at {http}; "
    "mint tokens with `burrow token issue --state-dir {state_dir}`",
    "cluster_joined": "node {node} joined the cluster as {advertise} (nodes: {nodes}; "
    "{leases} leases)",
    "node_link_up": "linked to node {node} at {address}",
    "node_link_down": "link to node {node} lost: {reason}",
    "registry_unavailable": "warning: the registry is unreachable ({reason}): serving the "
    "tunnels held, refusing new ones until it is back",
    "registry_available": "the registry is reachable again",
    "peer_port_open": "listening on port {port} for a tunnel held by node {node}",
}
_TUNNEL_READY: dict[str, str] = {
    "tcp": "forwarding {public} -> {local}",
    "http": "forwarding {url} -> {local}",
    "private": "private service {name} -> {local} (reach it with `burrow connect {name}`)",
    "exit": "exit {name} dials {allow}",
    "connect": "{name} reachable at {local}",
    "socks": "SOCKS5 proxy at {local}",
    "http-connect": "HTTP CONNECT proxy at {local}",
}


def format_pg_event(record: dict[str, Any]) -> str | None:
    """The human line for pgproxy's events (None: not one of them)."""
    event = record.get("event")
    if event == "pgproxy_ready":
        return (
            "pgproxy listening on {listen} -> {upstream} (tls: {tls}, name {server_name})".format(
                **record
            )
        )
    if event == "pg_connection":
        if record.get("kind") == "cancel":
            who = f"cancel from {record.get('peer') or '-'} for pid {record.get('backend_pid')}"
        else:
            who = "{} user={} database={}".format(
                record.get("peer") or "-", record.get("user"), record.get("database")
            )
        line = (
            f"pg {who} identity={record.get('identity') or '-'} "
            f"{record.get('duration', 0):.3f}s in={record.get('bytes_from_client')} "
            f"out={record.get('bytes_from_server')} ended={record.get('ended')}"
        )
        if record.get("sqlstate"):
            line += f" sqlstate={record['sqlstate']}"
        if record.get("message"):
            line += f": {record['message']}"
        return line
    if event == "warning":
        return f"warning: {record.get('message')}"
    return None


#: Events whose human line takes more than a template.
_FORMATTERS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "pgproxy_ready": format_pg_event,
    "pg_connection": format_pg_event,
}


class Reporter:
    """Prints events for one CLI process."""

    def __init__(self, *, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self._live: Any = None
        self._agent: Any = None
        self._embedded = False
        self._started = time.monotonic()
        self._inspector: str | None = None

    def event(self, record: dict[str, Any]) -> None:
        if record["event"] == "error":
            self._fatal(record)
            return
        if self.as_json:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()
            return
        if record["event"] == "inspector_ready":
            self._inspector = str(record.get("url"))
        if self._live is not None:
            self._refresh()
            if record["event"] not in ("warning", "session_lost", "reconnecting"):
                return
        formatter = _FORMATTERS.get(record["event"])
        if formatter is not None:
            found = formatter(record)
            if found is None:
                return
            line = found
        else:
            if record["event"] == "tunnel_ready":
                template = _TUNNEL_READY.get(str(record.get("kind")))
            else:
                template = _HUMAN.get(record["event"])
            if template is None:
                return
            try:
                line = template.format(**record)
            except KeyError:
                line = " ".join(f"{k}={v}" for k, v in record.items())
        if self._live is not None:
            self._live.console.print(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def embedded_relay_event(self, record: dict[str, Any]) -> None:
        """The in-process relay's events: only problems are worth showing."""
        if record["event"] in ("session_refused", "tunnel_refused"):
            self.event(record)

    def error(self, message: str) -> None:
        """A fatal error: its one line on stderr in every mode (and an event with --json)."""
        self.event({"event": "error", "message": message})

    def _fatal(self, record: dict[str, Any]) -> None:
        if self._live is not None:
            self.detach()
        if self.as_json:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()
        sys.stderr.write(f"burrow: error: {record.get('message', '')}\n")
        sys.stderr.flush()

    # --- live table ----------------------------------------------------------------------

    def attach_agent(self, agent: Any, *, embedded: bool) -> None:
        self._agent = agent
        self._embedded = embedded
        if self.as_json or not self.stream.isatty():
            return
        from rich.live import Live

        self._live = Live(self._table(), refresh_per_second=2, get_renderable=self._table)
        self._live.start()

    def detach(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def _table(self) -> Any:
        from rich.table import Table

        agent = self._agent
        conn = agent.conn if agent is not None else None
        online = conn is not None and conn.is_open
        relay = "embedded (loopback)" if self._embedded else (agent.relay_label if agent else "")
        rtt = f"{conn.rtt * 1000:.1f} ms" if conn is not None and conn.rtt is not None else "-"
        title = f"burrow {'online' if online else 'connecting'} · relay {relay} · rtt {rtt}"
        if self._inspector:
            title += f" · inspector {self._inspector}"
        table = Table(title=title, title_justify="left", expand=False)
        for column in ("tunnel", "public", "local", "conns", "open"):
            table.add_column(column)
        for service, local in getattr(agent, "listeners", {}).items():
            table.add_row(service, "(private)", local, "-", "-")
        recorders = [
            t.spec.recorder
            for t in getattr(agent, "tunnels", [])
            if getattr(t.spec, "recorder", None)
        ]
        if recorders:
            table.caption = http_stats(recorders[0].newest_first())
        for tunnel in getattr(agent, "tunnels", []):
            options = getattr(tunnel.spec, "options", None)
            local = getattr(tunnel.spec, "local", None) or getattr(options, "local", None)
            table.add_row(
                tunnel.name or tunnel.spec.key,
                tunnel.public or "-",
                "{}:{}".format(*local) if local else "(exit)",
                str(tunnel.connections),
                str(tunnel.open_connections),
            )
        return table


def http_stats(exchanges: list[Any], now: float | None = None) -> str:
    """ngrok's connection line for HTTP tunnels: requests, rate over the last minute, p50/p90."""
    now = time.time() if now is None else now
    recent = [e for e in exchanges if now - e.started <= 60]
    durations = sorted(e.duration for e in exchanges[:500] if e.duration is not None)

    def percentile(p: float) -> str:
        if not durations:
            return "-"
        value = durations[min(len(durations) - 1, int(p * len(durations)))]
        return f"{value * 1000:.0f} ms"

    return (
        f"requests {len(exchanges)}  rate(1m) {len(recent) / 60:.2f}/s  "
        f"p50 {percentile(0.5)}  p90 {percentile(0.9)}"
    )
