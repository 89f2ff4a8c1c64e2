"""examples/03_branches_and_compaction.py runs offline and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "03_branches_and_compaction.py"


def test_branches_example_rewinds_branches_and_compacts(
    fresh_database_url: object, tmp_path: Path
) -> None:
    url = fresh_database_url()  # type: ignore[operator]
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env={**env, "DATABASE_URL": url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "Branches (items): {'main': 4, 'porto': 4}; current for every server: porto" in out
    assert "'user_turn_number': 2, 'requests': 1, 'input_tokens': 70" in out
    assert "'total_tokens': 200, 'total_turns': 3}" in out
    assert "{'role': 'assistant', 'content': 'Summary: Ada plans a week in Porto.'}" in out
    assert "main still holds 4 items" in out
