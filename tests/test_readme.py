"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    lines = [line.split("#")[0].strip() for line in first.group(1).splitlines() if line.strip()]
    assert lines == ["bash scripts/burrow tcp 5432", "bash scripts/test"]


@pytest.mark.timeout(60)
def test_webhook_example_runs() -> None:
    [block] = [b for b in _python_blocks() if "def test_webhook_reaches_the_app" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    test = namespace["test_webhook_reaches_the_app"]
    assert callable(test)
    test()
