"""The README's Guarantees table names tests that exist: a promise without its proof fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _test_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names.update(
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        )
    return names


def test_every_test_file_the_readme_cites_exists() -> None:
    cited = set(re.findall(r"`(tests/[\w/]+\.py)`", README))
    assert len(cited) >= 15
    missing = sorted(path for path in cited if not (ROOT / path).is_file())
    assert missing == []


def test_every_test_function_the_readme_cites_exists() -> None:
    names = _test_names()
    cited = {
        name
        for name in re.findall(r"`(test_\w+)`", README)
        if not name.endswith("…")  # "test_x_…" abbreviates a family of tests
    }
    assert len(cited) >= 8
    missing = sorted(name for name in cited if name not in names)
    assert missing == []
