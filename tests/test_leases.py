"""Port leases: who may take a port, and for how long a lease outlives its agent's session.

``LeaseTable`` has no clock: every rule is exercised with explicit ``now`` values.
"""

from __future__ import annotations

import pytest

from burrow.errors import TunnelError
from burrow.roles.leases import Lease, LeaseTable

PORT = 5432
GRACE = 30.0


def refused(table: LeaseTable, port: int, owner: str, now: float) -> TunnelError:
    with pytest.raises(TunnelError) as info:
        table.check_free(port, owner, now)
    assert info.value.code == "port_in_use"
    return info.value


def test_free_port_is_free_for_anyone() -> None:
    table = LeaseTable(GRACE)
    table.check_free(PORT, "alice", 0.0)
    assert table.get(PORT) is None
    assert len(table) == 0


def test_take_records_a_connected_lease() -> None:
    table = LeaseTable(GRACE)
    lease = table.take(PORT, "alice", "db")
    assert lease == Lease(PORT, "alice", "db", connected=True)
    assert table.get(PORT) is lease
    assert len(table) == 1


def test_connected_lease_refuses_others_whatever_the_time() -> None:
    table = LeaseTable(GRACE)
    table.take(PORT, "alice", "db")
    for now in (0.0, GRACE, 1e9):
        error = refused(table, PORT, "bob", now)
        assert f"port {PORT} is in use" in str(error)
        table.check_free(PORT, "alice", now)  # the owner may take it again
    assert table.expire(1e9) == []  # a connected lease never expires
    assert table.get(PORT) is not None


def test_released_lease_is_reserved_for_its_owner_during_the_grace() -> None:
    table = LeaseTable(GRACE)
    table.take(PORT, "alice", "db")
    table.release(PORT, 100.0)
    lease = table.get(PORT)
    assert lease is not None and not lease.connected and lease.expires == 100.0 + GRACE
    for now in (100.0, 110.0, 100.0 + GRACE - 0.001):
        error = refused(table, PORT, "bob", now)
        assert "reserved for another agent" in str(error)
        table.check_free(PORT, "alice", now)
    assert "for 20 s more" in str(refused(table, PORT, "bob", 110.0))


def test_released_lease_is_free_for_anyone_after_the_grace() -> None:
    table = LeaseTable(GRACE)
    table.take(PORT, "alice", "db")
    table.release(PORT, 100.0)
    table.check_free(PORT, "bob", 100.0 + GRACE)  # the boundary: expired
    table.check_free(PORT, "bob", 1e6)
    # Another agent takes it over; the old owner is now the one refused.
    table.take(PORT, "bob", "web")
    refused(table, PORT, "alice", 1e6)
    assert table.find("alice", "db", 1e6) is None
    assert table.find("bob", "web", 1e6) is table.get(PORT)


def test_owner_reconnecting_within_the_grace_gets_a_live_lease_again() -> None:
    table = LeaseTable(GRACE)
    table.take(PORT, "alice", "db")
    table.release(PORT, 100.0)
    lease = table.find("alice", "db", 110.0)
    assert lease is not None and lease.port == PORT
    again = table.take(PORT, "alice", "db")
    assert again.connected
    assert table.expire(1e9) == []
    refused(table, PORT, "bob", 1e9)


def test_find_by_owner_and_key() -> None:
    table = LeaseTable(GRACE)
    a = table.take(5000, "alice", "db")
    b = table.take(5001, "alice", "web")
    c = table.take(5002, "bob", "db")
    assert table.find("alice", "db", 0.0) is a
    assert table.find("alice", "web", 0.0) is b
    assert table.find("bob", "db", 0.0) is c
    assert table.find("bob", "web", 0.0) is None
    assert table.find("carol", "db", 0.0) is None
    assert table.find("alice", "", 0.0) is None


def test_find_expires_stale_leases() -> None:
    table = LeaseTable(GRACE)
    table.take(5000, "alice", "db")
    table.take(5001, "bob", "db")
    table.release(5000, 0.0)
    assert table.find("alice", "db", GRACE - 1) is not None
    assert table.find("alice", "db", GRACE) is None
    assert table.get(5000) is None  # forgotten, not only hidden
    assert len(table) == 1


def test_expire_returns_the_ports_it_forgets() -> None:
    table = LeaseTable(GRACE)
    for port in (5000, 5001, 5002):
        table.take(port, f"agent-{port}", "k")
    table.release(5000, 0.0)
    table.release(5001, 10.0)
    assert table.expire(GRACE - 1) == []
    assert table.expire(GRACE) == [5000]
    assert table.expire(GRACE + 10) == [5001]
    assert table.expire(1e9) == []
    assert len(table) == 1 and table.get(5002) is not None


def test_drop_frees_at_once() -> None:
    table = LeaseTable(GRACE)
    table.take(PORT, "alice", "db")
    table.drop(PORT)
    assert table.get(PORT) is None
    table.check_free(PORT, "bob", 0.0)
    assert table.find("alice", "db", 0.0) is None
    table.take(PORT, "alice", "db")
    table.release(PORT, 0.0)
    table.drop(PORT)  # a released lease too
    table.check_free(PORT, "bob", 0.0)
    table.drop(PORT)  # and dropping nothing is fine
    assert len(table) == 0


@pytest.mark.parametrize("grace", [0.0, -1.0])
def test_no_grace_frees_at_release(grace: float) -> None:
    table = LeaseTable(grace)
    table.take(PORT, "alice", "db")
    refused(table, PORT, "bob", 0.0)
    table.release(PORT, 0.0)
    assert table.get(PORT) is None
    table.check_free(PORT, "bob", 0.0)
    assert table.find("alice", "db", 0.0) is None


def test_release_of_an_unknown_port_is_a_no_op() -> None:
    table = LeaseTable(GRACE)
    table.release(PORT, 0.0)
    assert len(table) == 0


def test_leases_are_per_port() -> None:
    table = LeaseTable(GRACE)
    table.take(5000, "alice", "db")
    table.check_free(5001, "bob", 0.0)
    table.take(5001, "bob", "db")
    refused(table, 5000, "bob", 0.0)
    refused(table, 5001, "alice", 0.0)
    table.release(5000, 0.0)
    table.check_free(5000, "bob", GRACE)
    refused(table, 5001, "alice", GRACE)
