"""docs/scaling.md stays true to the package it describes.

Section 2 of the guide reports what was run on a Citus cluster (``make test-citus``
runs it again); these tests check, without Citus, what the text itself claims:

* every constraint and index name it cites exists in the models;
* it names public behaviour only: no private (``_underscored``) names;
* every ``agents-sessions`` command line it shows is a command with those options;
* its reference-style links all resolve;
* its SQL for preparing the new keys on a large table is what migration 0004 adopts,
  on a real PostgreSQL database, after which every key includes the distribution
  column and the history read uses the new key.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from agents_sessions.cli.main import cli
from agents_sessions.db.migrate import alembic_config
from agents_sessions.db.models import Base
from agents_sessions.db.statements import POSTGRES_VIEW_LATEST
from agents_sessions.ops.citus import DISTRIBUTION_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "scaling.md"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKDOWN = GUIDE.read_text(encoding="utf-8")
PROSE = FENCE.sub("", MARKDOWN)
BLOCKS = FENCE.findall(MARKDOWN)
PREPARE_BLOCK = next(body for language, body in BLOCKS if "CONCURRENTLY" in body)


def statements(block: str) -> list[str]:
    """The SQL statements of a block, comments removed."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in block.splitlines())
    return [part.strip() for part in without_comments.split(";") if part.strip()]


def test_every_constraint_and_index_name_the_guide_cites_exists_in_the_models() -> None:
    cited = set(re.findall(r"`((?:pk|ix|uq|fk|ck)_[a-z_]+)`", PROSE))
    assert {"pk_messages", "uq_messages_conversation_id_append_key"} <= cited
    known: set[str] = set()
    for table in Base.metadata.tables.values():
        known |= {str(index.name) for index in table.indexes}
        known |= {str(constraint.name) for constraint in table.constraints}
    assert not cited - known, f"not in the models: {sorted(cited - known)}"


def test_the_guide_names_no_private_function_or_module() -> None:
    private = re.findall(r"`([\w.]*\b_[A-Za-z]\w*)[(`]", PROSE)
    assert private == [], private
    assert not re.search(r"`\w+\.py`", PROSE.replace("tests/citus/test_operations.py", ""))


def _command_lines() -> list[list[str]]:
    lines = []
    for language, body in BLOCKS:
        if language != "bash":
            continue
        for line in body.splitlines():
            code = line.split("  #", 1)[0].strip()
            if code.startswith("agents-sessions "):
                lines.append(shlex.split(code)[1:])
    return lines


@pytest.mark.parametrize("arguments", _command_lines(), ids=" ".join)
def test_every_command_line_in_the_guide_exists(arguments: list[str]) -> None:
    group: click.Command = cli
    words = list(arguments)
    while isinstance(group, click.Group) and words and words[0] in group.commands:
        group = group.commands[words.pop(0)]
    assert not isinstance(group, click.Group), f"incomplete command: {arguments}"
    known = {option for param in group.params for option in getattr(param, "opts", [])}
    for word in words:
        if word.startswith("-"):
            assert word in known, f"{arguments}: no option {word}"


def test_every_reference_link_is_defined_and_every_definition_used() -> None:
    used = set(re.findall(r"\]\[([a-z0-9-]+)\]", MARKDOWN))
    defined = set(re.findall(r"^\[([a-z0-9-]+)\]: https://\S+$", MARKDOWN, re.MULTILINE))
    assert used, "the guide cites its sources with reference links"
    assert used == defined, {"undefined": used - defined, "unused": defined - used}


def test_the_distribution_the_guide_describes_is_the_one_the_command_does() -> None:
    assert DISTRIBUTION_COLUMNS == {
        "conversations": "id",
        "messages": "conversation_id",
        "usage_logs": "conversation_id",
        "conversation_branches": "conversation_id",
        "append_keys": "conversation_id",
        "run_states": "conversation_id",
    }
    for table, column in DISTRIBUTION_COLUMNS.items():
        assert f"`{table}`" in PROSE and f"`{column}`" in PROSE


@pytest.mark.postgres_only
@pytest.mark.not_on_citus("starts from revision 0003 on an empty database")
def test_the_prepared_key_indexes_are_adopted_and_every_key_then_distributes(
    postgres_server: Any,
) -> None:
    url: str = postgres_server.create_database()
    config = alembic_config(database_url=url)
    command.upgrade(config, "0003")
    engine = create_engine(
        url.replace("postgresql://", "postgresql+psycopg2://", 1), isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as connection:
            for statement in statements(PREPARE_BLOCK):
                connection.execute(text(statement))
        command.upgrade(config, "head")
        inspector = inspect(engine)
        for table, column in DISTRIBUTION_COLUMNS.items():
            assert column in inspector.get_pk_constraint(table)["constrained_columns"]
            for index in inspector.get_indexes(table):
                if index["unique"]:
                    assert column in index["column_names"], (table, index["name"])
        names = {index["name"] for index in inspector.get_indexes("messages")}
        assert "pk_messages_next" not in names and "ix_messages_conversation_id_id" not in names
        with engine.connect() as connection:
            connection.execute(text("SET enable_seqscan = off"))
            plan = connection.exec_driver_sql(
                "EXPLAIN " + str(POSTGRES_VIEW_LATEST.compile(dialect=engine.dialect)),
                {"conversation_id": "conv-x", "limit": 10},
            ).scalars()
            # The history is read through an index that starts with the key's column.
            assert "ix_messages_conversation_id_branch_id_id" in "\n".join(plan)
    finally:
        engine.dispose()
