"""Who may use a PostgreSQL service: allow-lists of users and databases, checked on the
StartupMessage before the database is dialled, so a refused client costs the database nothing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from burrow.pg.codec import StartupMessage
from burrow.pg.errors import PolicyRefused

__all__ = ["REPLICATION_DATABASE", "PgPolicy"]

REPLICATION_DATABASE = "replication"
"""The name a physical replication connection is checked under (pg_hba.conf's keyword)."""

_MAX_NAME = 1024


@dataclass(frozen=True, slots=True)
class PgPolicy:
    """Empty sets allow every name. Names are compared exactly, as the server does."""

    allow_users: frozenset[str] = frozenset()
    allow_databases: frozenset[str] = frozenset()

    @classmethod
    def create(cls, users: Iterable[str] = (), databases: Iterable[str] = ()) -> PgPolicy:
        return cls(frozenset(users), frozenset(databases))

    def check(self, startup: StartupMessage) -> None:
        """Raise ``PolicyRefused`` (SQLSTATE 28000) when this client may not connect."""
        user = startup.user
        if not user:
            raise PolicyRefused("no PostgreSQL user name specified in startup packet")
        database = database_of(startup)
        if self.allow_users and user not in self.allow_users:
            raise PolicyRefused(
                f'burrow: user "{_shown(user)}" is not allowed on this service',
                hint="the service's --allow-user list does not name this user",
            )
        if self.allow_databases and database not in self.allow_databases:
            raise PolicyRefused(
                f'burrow: database "{_shown(database)}" is not allowed on this service',
                hint="the service's --allow-database list does not name this database",
            )


def database_of(startup: StartupMessage) -> str:
    """The database a connection opens, as the allow-list sees it: a physical replication
    connection (``replication=true``) opens none and is checked as ``replication``."""
    replication = (startup.replication or "").lower()
    if replication in ("true", "on", "yes", "1"):
        return REPLICATION_DATABASE
    return startup.database


def _shown(name: str) -> str:
    return name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "..."
