"""Finding local references in functions' environments, and rewriting exactly those characters
(sans-I/O): the spellings developers use, and the ones that only look like them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.aws.envscan import Reference, rewrite, scan


def found(env: dict[str, str]) -> list[tuple[str, str, int]]:
    return [(r.key, r.host, r.port) for r in scan(env).references]


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("postgres://app:pw@localhost:5432/app", "localhost", 5432),
        ("postgresql://app:pw@127.0.0.1:5432/app?sslmode=disable", "127.0.0.1", 5432),
        ("postgres://app:pw@[::1]:5433/app", "[::1]", 5433),
        ("postgres://app:pw@host.docker.internal:5432/app", "host.docker.internal", 5432),
        ("postgresql+psycopg://app:pw@localhost/app", "localhost", 5432),  # scheme's port
        ("jdbc:postgresql://localhost/app?user=app", "localhost", 5432),
        ("mysql://root@127.0.0.1/app", "127.0.0.1", 3306),
        ("mysql://root:pw@localhost:3307/app", "localhost", 3307),
        ("app:pw@tcp(localhost:3306)/app?parseTime=true", "localhost", 3306),  # Go's DSN
        ("redis://localhost:6379/0", "localhost", 6379),
        ("rediss://:secret@127.0.0.1/1", "127.0.0.1", 6379),
        ("mongodb://localhost:27017/app?replicaSet=rs0", "localhost", 27017),
        ("amqp://guest:guest@localhost//", "localhost", 5672),
        ("http://localhost:8000", "localhost", 8000),
        ("http://127.0.0.1:4566/", "127.0.0.1", 4566),
        ("localhost:5432", "localhost", 5432),  # no scheme at all
        ("127.0.0.1:11211", "127.0.0.1", 11211),
        ("host=localhost port=5433 dbname=app user=app", "localhost", 5433),  # libpq
        ("host=127.0.0.1 dbname=app", "127.0.0.1", 5432),  # libpq's default port
        ("dbname=app host='localhost' port='5434'", "localhost", 5434),
        ("Host=localhost;Port=5435;Database=app;Username=app", "localhost", 5435),  # Npgsql
        ("Server=localhost,1433;Database=app;User Id=sa;Password=pw;", "localhost", 1433),
        ("Data Source=tcp:127.0.0.1,1434;Initial Catalog=app", "127.0.0.1", 1434),
        ("Server=localhost;Port=3306;Database=app;Uid=root", "localhost", 3306),  # MySQL .NET
    ],
)
def test_one_reference(value: str, host: str, port: int) -> None:
    refs = scan({"X": value}).references
    assert [(r.host, r.port) for r in refs] == [(host, port)]
    ref = refs[0]
    assert value[ref.host_span[0] : ref.host_span[1]] == host
    if ref.port_span is not None:
        assert value[ref.port_span[0] : ref.port_span[1]] == str(port)


@pytest.mark.parametrize(
    "value",
    [
        "NO_PROXY=localhost,127.0.0.1",  # a host without a port is not a resource
        "localhost,127.0.0.1,.internal",
        "https://api.example.com/v1",
        "postgres://app@db.example.com:5432/app",
        "postgres://app@mylocalhost:5432/app",
        "postgres://app@localhost.example.com:5432/app",
        "postgres://app@127.0.0.10:5432/app",
        "postgres://app@1127.0.0.1:5432/app",
        "http://host.docker.internal.evil.com:80",
        "arn:aws:dynamodb:eu-west-1:123456789012:table/orders",
        "orders",
        "",
        "localhost",  # a bare host: only a *_HOST variable with a port says which resource
        "x" * 100,
    ],
)
def test_not_a_reference(value: str) -> None:
    assert scan({"X": value}).references == []


def test_seed_functions() -> None:
    """The environments of the functions in the users' documents (Node.js 20 with pg, a
    stacktape stack, DynamoDB local)."""
    env = {
        "DATABASE_URL": "postgres://app:pw@localhost:5432/app",
        "STP_POSTGRES_DB_CONNECTION_STRING": "postgresql://postgres:pw@localhost:5432/postgres",
        "STP_REDIS_CONNECTION_STRING": "redis://localhost:6379",
        "AWS_ENDPOINT_URL_DYNAMODB": "http://localhost:8000",
        "STP_MY_TABLE_ENDPOINT": "http://localhost:8000",
        "API_KEY": "abc",
        "NODE_OPTIONS": "--enable-source-maps",
        "NO_PROXY": "localhost,127.0.0.1",
    }
    assert sorted(found(env)) == [
        ("AWS_ENDPOINT_URL_DYNAMODB", "localhost", 8000),
        ("DATABASE_URL", "localhost", 5432),
        ("STP_MY_TABLE_ENDPOINT", "localhost", 8000),
        ("STP_POSTGRES_DB_CONNECTION_STRING", "localhost", 5432),
        ("STP_REDIS_CONNECTION_STRING", "localhost", 6379),
    ]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DB_HOST": "localhost", "DB_PORT": "5432"}, ("DB_HOST", "DB_PORT", 5432)),
        ({"PGHOST": "127.0.0.1", "PGPORT": "5433"}, ("PGHOST", "PGPORT", 5433)),
        (
            {"REDIS_HOST": "host.docker.internal", "REDIS_PORT": " 6380 "},
            ("REDIS_HOST", "REDIS_PORT", 6380),
        ),
        ({"MYSQL_HOSTNAME": "::1", "MYSQL_PORT": "3306"}, ("MYSQL_HOSTNAME", "MYSQL_PORT", 3306)),
        (
            {"CACHE_SERVER": "localhost", "CACHE_PORT": "11211"},
            ("CACHE_SERVER", "CACHE_PORT", 11211),
        ),
        ({"db_host": "localhost", "db_port": "5432"}, ("db_host", "db_port", 5432)),
        ({"PGHOST": "localhost"}, ("PGHOST", "PGPORT", 5432)),  # the prefix says PostgreSQL
        ({"REDIS_HOST": "localhost"}, ("REDIS_HOST", "REDIS_PORT", 6379)),
    ],
)
def test_host_and_port_in_two_variables(
    env: dict[str, str], expected: tuple[str, str, int]
) -> None:
    refs = scan(env).references
    assert [(r.key, r.port_key, r.port) for r in refs] == [expected]
    assert refs[0].form == "pair"


def test_pairs_that_cannot_be_told() -> None:
    result = scan({"APP_HOST": "localhost", "DB_HOST": "localhost", "DB_PORT": "abc"})
    assert result.references == []
    assert {note.key for note in result.notes} == {"APP_HOST", "DB_PORT"}
    assert scan({"DB_HOST": "db.internal", "DB_PORT": "5432"}).references == []
    assert scan({"DB_HOST": "localhost:5432"}).references[0].form == "url"  # counted once


def test_invalid_port_is_a_note() -> None:
    result = scan({"URL": "postgres://localhost:99999/app"})
    assert result.references == []
    assert "not a valid port" in result.notes[0].message


def test_several_references_in_one_value() -> None:
    env = {"MONGO": "mongodb://localhost:27017,localhost:27018,127.0.0.1/app?replicaSet=rs"}
    assert [(r.host, r.port) for r in scan(env).references] == [
        ("localhost", 27017),
        ("localhost", 27018),
        ("127.0.0.1", 27017),
    ]


def test_oversized_values_are_not_scanned() -> None:
    result = scan({"BIG": "postgres://localhost:5432/" + "x" * 20000})
    assert result.references == []
    assert "not scanned" in result.notes[0].message


# --- rewriting -----------------------------------------------------------------------------


def test_rewrite_changes_only_host_and_port() -> None:
    env = {
        "DATABASE_URL": "postgres://app:p%40ss@host.docker.internal:5432/app?sslmode=disable",
        "DSN": "host=localhost port=5432 dbname=app password='a b'",
        "DB_HOST": "localhost",
        "DB_PORT": "5432",
        "REDIS_URL": "redis://localhost/0",
        "OTHER": "keep me",
    }
    refs = scan(env).references
    out = rewrite(env, refs, lambda ref: ("relay.example.com", 20001))
    assert out == {
        "DATABASE_URL": "postgres://app:p%40ss@relay.example.com:20001/app?sslmode=disable",
        "DSN": "host=relay.example.com port=20001 dbname=app password='a b'",
        "DB_HOST": "relay.example.com",
        "DB_PORT": "20001",
        "REDIS_URL": "redis://relay.example.com:20001/0",  # the implied port written out
        "OTHER": "keep me",
    }


def test_rewrite_adds_the_port_variable_a_pair_lacked() -> None:
    env = {"PGHOST": "localhost", "PGDATABASE": "app"}
    out = rewrite(env, scan(env).references, lambda ref: ("relay", 20002))
    assert out == {"PGHOST": "relay", "PGPORT": "20002", "PGDATABASE": "app"}


def test_rewrite_identity_is_byte_equal() -> None:
    env = {"A": "postgres://localhost:5432/x", "B": "Server=localhost,1433;Database=y"}
    refs = scan(env).references
    assert rewrite(env, refs, lambda ref: (ref.host, ref.port)) == env
    assert rewrite(env, refs, lambda ref: None) == env


def test_rewrite_host_only() -> None:
    env = {"A": "http://host.docker.internal:8000/x", "B": "http://localhost:8000"}

    def mapper(ref: Reference) -> tuple[str, int]:
        return ("127.0.0.1" if ref.host == "host.docker.internal" else ref.host), ref.port

    assert rewrite(env, scan(env).references, mapper) == {
        "A": "http://127.0.0.1:8000/x",
        "B": "http://localhost:8000",
    }


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z_]{0,12}", fullmatch=True), _text, max_size=6))
def test_scan_never_fails_and_identity_rewrite_keeps_every_value(env: dict[str, str]) -> None:
    result = scan(env)
    assert rewrite(env, result.references, lambda ref: (ref.host, ref.port)) == env
    for ref in result.references:
        assert env[ref.key][ref.host_span[0] : ref.host_span[1]] == ref.host


@given(
    st.sampled_from(["localhost", "127.0.0.1", "[::1]", "host.docker.internal"]),
    st.integers(1, 65535),
    st.sampled_from(["postgres://u:p@{}/db", "{}", "x={} y", "http://{}/path?q=1"]),
)
def test_every_spelling_with_a_port_is_found(host: str, port: int, template: str) -> None:
    value = template.format(f"{host}:{port}")
    refs = scan({"V": value}).references
    assert [(r.host, r.port) for r in refs] == [(host, port)]
