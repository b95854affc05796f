"""The layers hold: no module imports one of a higher layer (shared/DESIGN.md's order).

Every import counts, lazy ones inside functions included, since a lazy upward import is still
an upward dependency. ``check_tree`` takes any source tree, so the same rules can be run
against an older checkout to see what they would have caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "burrow"

#: Lowest first. A module may import its own layer and the ones before it; ``core`` modules
#: may import only the layers up to ``wire`` and each other.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("burrow.errors", "burrow.version", "burrow.compiled")),
    ("wire", ("burrow.wire",)),
    (
        "core",
        (
            "burrow.tokens",
            "burrow.allowlist",
            "burrow.config",
            "burrow.events",
            "burrow.statefiles",
            "burrow.addresses",
        ),
    ),
    ("net", ("burrow.net",)),
    ("roles", ("burrow.roles",)),
    ("protocols", ("burrow.http", "burrow.pg", "burrow.doctor")),
    ("aws", ("burrow.aws",)),
    ("faces", ("burrow.cli", "burrow.cli_output", "burrow.api", "burrow.node", "burrow.kinds")),
]
#: The package root (``import burrow``, ``burrow.__version__``) is the public API: a face.
ROOT_LAYER = "faces"


def layer_of(module: str) -> str | None:
    if module == "burrow":
        return ROOT_LAYER
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def _rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base == "burrow":  # from burrow import x: x may be a module or the root's
                for alias in node.names:
                    target = f"burrow.{alias.name}"
                    found.append((node.lineno, target if layer_of(target) else "burrow"))
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "burrow" or name.startswith("burrow.")]


def check_tree(src: Path) -> list[str]:
    """Every upward import under ``src`` (the ``burrow`` package directory), as lines."""
    problems: list[str] = []
    for path in sorted(src.rglob("*.py")):
        module = _module_name(path, src)
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module}: belongs to no layer; add it to LAYERS")
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            theirs = layer_of(target)
            if theirs is None:
                continue  # reported where that module is defined
            if _rank(theirs) > _rank(mine):
                problems.append(
                    f"{module}:{line} ({mine}) imports {target} ({theirs}), a higher layer"
                )
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    assert check_tree(SRC) == []


@pytest.mark.parametrize(
    ("module", "source", "wrong"),
    [
        ("burrow.roles.agent", "from burrow.http.proxy import serve_http", True),
        ("burrow.roles.relay", "from burrow.http.frontend import HttpFrontend", True),
        ("burrow.net.proxy_server", "from burrow.roles.connector import Connector", True),
        ("burrow.roles.client", "from burrow import __version__", True),
        ("burrow.aws.layer", "import burrow", True),
        ("burrow.wire.session", "from burrow.tokens import TokenVerifier", True),
        ("burrow.tokens", "from burrow.net.tls import TrustPolicy", True),
        ("burrow.roles.agent", "from burrow.net.bridge import StreamBridge", False),
        ("burrow.http.service", "from burrow.roles.services import IncomingStream", False),
        ("burrow.cli.agent", "from burrow.kinds import tcp_service", False),
        ("burrow.net.channel", "from burrow.errors import ConnectError", False),
    ],
)
def test_the_rules_catch_upward_imports(
    tmp_path: Path, module: str, source: str, wrong: bool
) -> None:
    """The six upward imports the code had before the seams, and some allowed ones."""
    src = tmp_path / "burrow"
    *packages, leaf = module.split(".")[1:]
    folder = src.joinpath(*packages)
    folder.mkdir(parents=True)
    for directory in [src, *[src.joinpath(*packages[: i + 1]) for i in range(len(packages))]]:
        (directory / "__init__.py").touch()
    (folder / f"{leaf}.py").write_text(source + "\n")
    problems = [p for p in check_tree(src) if p.startswith(module + ":")]
    assert bool(problems) is wrong, problems
