"""PostgreSQL awareness: a sans-I/O wire codec (``codec``), the startup relay (``startup``),
and pgproxy (``proxy``: one client connection relayed to a database over verified TLS, with an
allow-list, cancel forwarding and one audit event per connection)."""

from burrow.pg.policy import PgPolicy
from burrow.pg.proxy import serve_pg
from burrow.pg.upstream import PgUpstream

__all__ = ["PgPolicy", "PgUpstream", "serve_pg"]
