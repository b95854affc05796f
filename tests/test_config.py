"""burrow.toml loading and the address syntax: every mistake is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from burrow.config import (
    DEFAULT_RELAY_PORT,
    MAX_CONFIG_BYTES,
    AgentFile,
    TunnelSpec,
    load_agent_config,
    parse_hostport,
    parse_local,
)
from burrow.errors import ConfigError

# --- parse_local ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("5432", ("127.0.0.1", 5432)),
        ("1", ("127.0.0.1", 1)),
        ("65535", ("127.0.0.1", 65535)),
        ("db.internal:5432", ("db.internal", 5432)),
        ("localhost:80", ("localhost", 80)),
        ("10.0.0.7:6379", ("10.0.0.7", 6379)),
        ("[::1]:5432", ("::1", 5432)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("my_host-1.example.:22", ("my_host-1.example.", 22)),
    ],
)
def test_parse_local_ok(spec: str, expected: tuple[str, int]) -> None:
    assert parse_local(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "x",
        "",
        ":5432",
        "db:",
        "db:port",
        "db:54x",
        "::1:5432",
        "[::1]",
        "[::1]5432",
        "[::1:5432",
        "[fe80::1%eth0]:22",
        "[1.2.3.4]:22",
        "db host:5432",
        "db/x:5432",
        "-db:5432",
        "10.1:5432",
        "999.1.1.1:22",
        "db:+80",
        "db:1_0",
        "a" * 400,
    ],
)
def test_parse_local_bad(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_local(spec)
    assert str(info.value).startswith("invalid local address ")
    assert "\n" not in str(info.value)


def test_parse_local_exact_message() -> None:
    with pytest.raises(
        ConfigError, match=r"^invalid local address 'x': expected PORT or HOST:PORT$"
    ):
        parse_local("x")


@pytest.mark.parametrize("spec", ["0", "65536", "db:0", "db:99999", "[::1]:70000"])
def test_parse_local_port_range(spec: str) -> None:
    with pytest.raises(ConfigError, match="port must be from 1 to 65535"):
        parse_local(spec)


def test_long_input_is_cut_short_in_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_local("a" * 400)
    assert len(str(info.value)) < 150


# --- parse_hostport ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("relay.example", ("relay.example", 7835)),
        ("h:1", ("h", 1)),
        ("[::1]:2", ("::1", 2)),
        ("[::1]", ("::1", 7835)),
        ("127.0.0.1", ("127.0.0.1", 7835)),
        ("relay.example.com:443", ("relay.example.com", 443)),
    ],
)
def test_parse_hostport_ok(spec: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(spec, 7835) == expected


@pytest.mark.parametrize(
    "spec", ["", "h:", "h:0", "h:65536", "h:x", "a b", "7835", "1.2.3", "[::1", "h:1:2", "é.com"]
)
def test_parse_hostport_bad(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid address "):
        parse_hostport(spec, 7835)


def test_parse_hostport_bare_ipv6_hint() -> None:
    with pytest.raises(ConfigError, match=r"in brackets"):
        parse_hostport("::1", 7835)


# --- load_agent_config ---------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "burrow.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "burrow.toml") + ": ")
    return message.split(": ", 1)[1]


FULL = """\
relay = "relay.example.com:7835"
secret = "s3cret"
fingerprint = "sha256:abcd"
insecure = false

[[tunnel]]
name = "db"
kind = "tcp"
local = "5432"
port = 15432
proxy_protocol = "v2"

[[tunnel]]
local = "cache.internal:6379"
"""


def test_load_full(tmp_path: Path) -> None:
    conf = load_agent_config(write(tmp_path, FULL))
    assert isinstance(conf, AgentFile)
    assert conf.relay == "relay.example.com:7835"
    assert conf.relay_addr == ("relay.example.com", DEFAULT_RELAY_PORT)
    assert conf.secret == "s3cret"
    assert conf.fingerprint == "sha256:abcd"
    assert conf.ca is None and conf.insecure is False
    db, cache = conf.tunnels
    assert db == TunnelSpec(name="db", kind="tcp", local="5432", port=15432, proxy_protocol="v2")
    assert db.local_addr == ("127.0.0.1", 5432)
    assert cache.name == "tcp-cache.internal:6379"
    assert cache.port is None and cache.proxy_protocol is None
    assert cache.local_addr == ("cache.internal", 6379)


def test_minimal_means_embedded_relay(tmp_path: Path) -> None:
    conf = load_agent_config(write(tmp_path, '[[tunnel]]\nlocal = "8080"\n'))
    assert conf.relay is None and conf.relay_addr is None
    assert conf.tunnels[0].name == "tcp-8080" and conf.tunnels[0].kind == "tcp"


def test_ca_is_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    conf = load_agent_config(write(tmp_path, 'ca = "ca.pem"\n[[tunnel]]\nlocal = "1"\n'))
    assert conf.ca == str(tmp_path / "ca.pem")


def test_ca_missing(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'ca = "nope.pem"\n[[tunnel]]\nlocal = "1"\n')
    assert msg.startswith("ca: no such file ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no [[tunnel]] entries; add one"),
        ('relay = "r"\n', "no [[tunnel]] entries; add one"),
        (
            '[[tunnel]]\nlocal = "1"\n[[tunnel]]\nlocal = "2"\nport = 0\n',
            "tunnel[1].port: expected an integer from 1 to 65535",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nport = 70000\n',
            "tunnel[0].port: expected an integer from 1 to 65535",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nport = "80"\n',
            "tunnel[0].port: expected an integer from 1 to 65535",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nport = true\n',
            "tunnel[0].port: expected an integer from 1 to 65535",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nkind = "udp"\n',
            'tunnel[0].kind: expected "tcp", "private", "http", "exit" or "pg"',
        ),
        (
            '[[tunnel]]\nlocal = "1"\nproxy_protocol = "v3"\n',
            'tunnel[0].proxy_protocol: expected "v1" or "v2"',
        ),
        (
            "[[tunnel]]\nlocal = 5432\n",
            'tunnel[0].local: expected a string such as "5432" or "db.internal:5432" (quote it)',
        ),
        (
            '[[tunnel]]\nlocal = "x"\n',
            "tunnel[0].local: invalid local address 'x': expected PORT or HOST:PORT",
        ),
        ("[[tunnel]]\nport = 1\n", "tunnel[0].local: missing; this key is required"),
        (
            '[[tunnel]]\nlocal = "1"\nlcoal = "2"\n',
            "tunnel[0].lcoal: unknown key; check its spelling",
        ),
        ('rely = "x"\n[[tunnel]]\nlocal = "1"\n', "rely: unknown key; check its spelling"),
        (
            '[tunnel]\nlocal = "1"\n',
            "tunnel: expected [[tunnel]] tables (write [[tunnel]], not [tunnel])",
        ),
        ('insecure = "yes"\n[[tunnel]]\nlocal = "1"\n', "insecure: expected true or false"),
        (
            'relay = "a b"\n[[tunnel]]\nlocal = "1"\n',
            "relay: invalid address 'a b': expected HOST or HOST:PORT",
        ),
        (
            'relay = 7835\n[[tunnel]]\nlocal = "1"\n',
            'relay: expected a string such as "relay.example.com:7835"',
        ),
        (
            'secret = ""\n[[tunnel]]\nlocal = "1"\n',
            "secret: is empty; remove the key to connect without a secret",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nname = "my db"\n',
            "tunnel[0].name: 'my db' must be 1 to 255 printable characters without spaces",
        ),
        (
            '[[tunnel]]\nname = "db"\nlocal = "1"\n[[tunnel]]\nname = "db"\nlocal = "2"\n',
            "tunnel[1].name: 'db' is already used by tunnel[0]; give each tunnel its own name",
        ),
        (
            '[[tunnel]]\nlocal = "5432"\n[[tunnel]]\nlocal = "5432"\n',
            "tunnel[1].name: 'tcp-5432' is already used by tunnel[0]; give each tunnel its own "
            "name",
        ),
        (
            '[[tunnel]]\nlocal = "1"\nport = 9\n[[tunnel]]\nlocal = "2"\nport = 9\n',
            "tunnel[1].port: 9 is already requested by tunnel[0]; give each tunnel its own port",
        ),
    ],
)
def test_load_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text) == expected


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'relay = "r"\n\nsecret = \n')
    assert msg.startswith("line 3: invalid TOML: ")


def test_duplicate_toml_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'relay = "a"\nrelay = "b"\n')
    assert msg.startswith("line 2: invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"burrow\.toml: no such file"):
        load_agent_config(tmp_path / "burrow.toml")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_agent_config(tmp_path)


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "burrow.toml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_agent_config(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "burrow.toml"
    path.write_bytes(b'relay = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent_config(path)


def test_message_uses_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("burrow.toml").write_text('[[tunnel]]\nlocal = "1"\nport = 0\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(Path("burrow.toml"))
    assert str(info.value) == "burrow.toml: tunnel[0].port: expected an integer from 1 to 65535"
    assert info.value.exit_code == 2


def test_every_kind_loads(tmp_path: Path) -> None:
    path = tmp_path / "burrow.toml"
    path.write_text(
        'relay = "relay.example:7835"\ntoken = "bt1.x.y"\n'
        '[[tunnel]]\nkind = "private"\nname = "pg"\nlocal = "5432"\n'
        '[[tunnel]]\nkind = "http"\nname = "web"\nlocal = "3000"\nbasic_auth = ["u:p"]\n'
        '[[tunnel]]\nkind = "exit"\nname = "vpc"\nallow = ["10.0.0.0/8:5432"]\n'
    )
    loaded = load_agent_config(path)
    assert [t.kind for t in loaded.tunnels] == ["private", "http", "exit"]
    assert loaded.token == "bt1.x.y"
    assert loaded.tunnels[1].basic_auth == ["u:p"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[tunnel]]\nkind = "private"\nlocal = "5432"\n', "needs the name"),
        ('[[tunnel]]\nkind = "exit"\nname = "vpc"\n', "allow"),
        ('[[tunnel]]\nkind = "http"\nlocal = "3000"\nport = 80\n', "no public port"),
    ],
)
def test_kind_rules(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "burrow.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_agent_config(path)
