"""The relay's join of two sessions, on in-memory transports: what arrives from one session in
one record leaves on the other in one write (one TLS record, one syscall), not one per frame."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from burrow.net.connection import SessionConnection
from burrow.net.join import JoinHalf, join
from burrow.wire.session import DataReceived, Role, Session, StreamOpened
from test_wire import handshake

pytestmark = pytest.mark.timeout(10)


class RecordingTransport(asyncio.Transport):
    """Keeps every write apart, as the TLS layer would make each one a record."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append(b"".join(bytes(d) for d in list_of_data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def take(self) -> list[bytes]:
        writes, self.writes = self.writes, []
        return writes


def relay_end(**kwargs: Any) -> tuple[Session, SessionConnection, RecordingTransport]:
    """A peer's session and the relay's connection to it, past the handshake."""
    peer, relay = Session(Role.CLIENT), Session(Role.RELAY)
    handshake(peer, relay)
    conn = SessionConnection(relay, peer_label="peer", **kwargs)
    transport = RecordingTransport()
    conn.connection_made(transport)
    return peer, conn, transport


class Joined:
    """A relay joining each stream a connector opens to a new stream on an agent's session."""

    def __init__(self, *, failing: bool = False) -> None:
        self.agent, self.agent_conn, self.agent_transport = relay_end()
        self.far_ids: list[int] = []
        self.failing = failing
        self.connector, self.connector_conn, self.connector_transport = relay_end(
            on_stream=self.on_stream
        )

    def on_stream(self, conn: SessionConnection, stream_id: int, info: dict[str, Any]) -> None:
        near, far = JoinHalf(conn, stream_id), JoinHalf(self.agent_conn)
        far.open(info)
        join(near, far)
        self.far_ids.append(far.stream_id)
        if self.failing:
            raise RuntimeError("a bug in a handler")

    def from_connector(self) -> None:
        self.connector_conn.data_received(b"".join(self.connector.data_to_send()))


async def test_frames_of_one_record_cross_the_join_in_one_write() -> None:
    joined = Joined()
    agent, agent_transport = joined.agent, joined.agent_transport
    connector = joined.connector

    # Two streams opened in one record: the agent gets both OPENs in one write.
    first = connector.open_stream({"service": "db"})
    second = connector.open_stream({"service": "db"})
    joined.from_connector()
    writes = agent_transport.take()
    assert len(writes) == 1
    opened = [e for e in agent.receive_data(writes[0]) if isinstance(e, StreamOpened)]
    assert [e.info for e in opened] == [{"service": "db"}, {"service": "db"}]
    assert len(joined.far_ids) == 2

    # DATA for both streams in one record: one write to the agent, both payloads, in order.
    connector.send_data(first, b"select 1")
    connector.send_data(second, b"select 2")
    joined.from_connector()
    writes = agent_transport.take()
    assert len(writes) == 1
    data = [e for e in agent.receive_data(writes[0]) if isinstance(e, DataReceived)]
    assert [(e.stream_id, bytes(e.data)) for e in data] == [
        (opened[0].stream_id, b"select 1"),
        (opened[1].stream_id, b"select 2"),
    ]

    # The answers come back the same way, in one write to the connector.
    for event in opened:
        agent.accept_stream(event.stream_id)
        agent.send_data(event.stream_id, b"row")
    joined.agent_conn.data_received(b"".join(agent.data_to_send()))
    writes = joined.connector_transport.take()
    assert len(writes) == 1
    back = [e for e in connector.receive_data(writes[0]) if isinstance(e, DataReceived)]
    assert [(e.stream_id, bytes(e.data)) for e in back] == [(first, b"row"), (second, b"row")]

    # Outside any dispatch a send leaves at once.
    assert joined.agent_conn.send(opened[0].stream_id, b"late") == 4
    assert len(agent_transport.take()) == 1


async def test_a_failing_handler_does_not_leave_the_other_session_unflushed() -> None:
    joined = Joined(failing=True)
    joined.connector.open_stream({"service": "db"})
    with pytest.raises(RuntimeError):
        joined.from_connector()
    # The OPEN queued for the agent before the failure still went out ...
    writes = joined.agent_transport.take()
    assert len(writes) == 1
    assert [type(e) for e in joined.agent.receive_data(writes[0])] == [StreamOpened]
    # ... and later sends are not held back by a flush that never comes.
    assert joined.agent_conn.send(joined.far_ids[0], b"next") == 4
    assert len(joined.agent_transport.take()) == 1
