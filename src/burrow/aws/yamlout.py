"""A small YAML writer for the CloudFormation templates burrow prints, so printing YAML needs
no YAML library at run time. Strings are double-quoted with YAML's escapes, except multi-line
text, which becomes a literal block (``|``) so user data and unit files stay readable. Only
dicts, lists, strings, integers, booleans and None.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_:.-]*\Z")
#: Words YAML 1.1 readers take for booleans or null: such keys are quoted.
_SPECIAL = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_MAX_DEPTH = 64


def to_yaml(data: Any) -> str:
    """``data`` as a YAML document that ``yaml.safe_load`` reads back equal."""
    return "\n".join(_block(data, 0, 0)) + "\n"


def quote(text: str) -> str:
    """A YAML double-quoted scalar: printable characters as they are, the rest escaped
    (``\\uXXXX``, or ``\\UXXXXXXXX`` beyond the BMP, which JSON would split in two)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch != "\ufeff":
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"YAML keys here are strings, not {type(key).__name__}")
    if _PLAIN_KEY.match(key) and key.lower() not in _SPECIAL:
        return key
    return quote(key)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list) or not value


def _literal_ok(text: str) -> bool:
    """Whether ``text`` reads back exactly from a literal block (``|`` or ``|-``)."""
    if "\n" not in text.rstrip("\n"):
        return False
    if text.endswith("\n\n") or text.startswith((" ", "\n")):
        return False
    return all(ch == "\n" or ch == "\t" or (ch.isprintable() and ch != "\ufeff") for ch in text)


def _scalar(prefix: str, value: Any, indent: int) -> list[str]:
    """``prefix`` (``key:`` or ``-``) followed by a scalar value."""
    if isinstance(value, str) and _literal_ok(value):
        style = "|" if value.endswith("\n") else "|-"
        body = " " * (indent + 2)
        return [f"{prefix} {style}"] + [body + line if line else "" for line in value.splitlines()]
    if value is None:
        return [f"{prefix} null"]
    if isinstance(value, str):
        return [f"{prefix} {quote(value)}"]
    if isinstance(value, bool | int):  # no floats: YAML 1.1 reads 1e+100 as a string
        return [f"{prefix} {json.dumps(value)}"]
    if isinstance(value, dict | list) and not value:
        return [f"{prefix} {json.dumps(value)}"]
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _block(value: Any, indent: int, depth: int) -> list[str]:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply for a template")
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines: list[str] = []
        for key, item in value.items():
            if _is_scalar(item):
                lines += _scalar(pad + _key(key) + ":", item, indent)
            else:
                lines.append(pad + _key(key) + ":")
                lines += _block(item, indent + 2, depth + 1)
        return lines
    if isinstance(value, list) and value:
        lines = []
        for item in value:
            if _is_scalar(item):
                lines += _scalar(pad + "-", item, indent)
            else:
                inner = _block(item, indent + 2, depth + 1)
                lines.append(pad + "- " + inner[0][indent + 2 :])
                lines += inner[1:]
        return lines
    if isinstance(value, str) and _literal_ok(value):
        return [quote(value)]  # a document that is one text: quoted, never a bare block
    return [_scalar("", value, indent)[0].lstrip()]
