"""docs/scaling.md stays true to the code it describes.

The scaling guide is written on paper (Citus is not installable here), so these tests
check what can be checked without Citus:

* every private name, module attribute and constraint/index name the guide cites
  exists in the package;
* its reference-style links all resolve;
* its Citus block distributes existing tables by existing columns, referenced tables
  first, and drops exactly the policies migration 0003 created on the child tables;
* its key-migration block runs on a real PostgreSQL database at head, after which
  every primary key and unique index contains the column the Citus block distributes
  that table by, no remaining policy on those tables has a subquery, the history
  query still uses an index, and the session's statements behave as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from agents_sessions import UsageEntry, get_store
from agents_sessions.db.models import Base
from agents_sessions.db.statements import SELECT_LATEST as _SELECT_LATEST

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "scaling.md"
PACKAGE = ROOT / "agents_sessions"
MIGRATION_0003 = ROOT / "migrations" / "versions" / "0003_tenant_row_security.py"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
DISTRIBUTE = re.compile(
    r"create_distributed_table\('(\w+)',\s*'(\w+)'(?:,\s*colocate_with\s*=>\s*'(\w+)')?\)"
)
TRUNCATE_LOCAL = re.compile(r"truncate_local_data_after_distributing_table\('(\w+)'\)")
DROP_POLICY = re.compile(r"DROP POLICY IF EXISTS (\w+) ON (\w+)")

MARKDOWN = GUIDE.read_text(encoding="utf-8")
PROSE = FENCE.sub("", MARKDOWN)
SQL_BLOCKS = [body for language, body in FENCE.findall(MARKDOWN) if language == "sql"]
KEY_BLOCK = next(block for block in SQL_BLOCKS if "PRIMARY KEY USING INDEX" in block)
CITUS_BLOCK = next(block for block in SQL_BLOCKS if "create_distributed_table" in block)


def statements(block: str) -> list[str]:
    """The SQL statements of a block, comments removed."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in block.splitlines())
    return [part.strip() for part in without_comments.split(";") if part.strip()]


def package_source() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py"))


def defines(source: str, name: str) -> bool:
    """Whether ``source`` defines ``name`` (function, class, or assignment)."""
    pattern = rf"^\s*(?:def |class )?{re.escape(name)}\b\s*(?:[(:=]|\[)"
    return re.search(pattern, source, re.MULTILINE) is not None


def distributed_by() -> dict[str, str]:
    return {table: column for table, column, _ in DISTRIBUTE.findall(CITUS_BLOCK)}


# ------------------------------------------------------------------ names and links


def test_every_constraint_and_index_name_the_guide_cites_exists_in_the_models() -> None:
    cited = set(re.findall(r"`((?:pk|ix|uq|fk|ck)_[a-z_]+)`", PROSE))
    assert {"pk_messages", "uq_messages_conversation_id_append_key"} <= cited
    known: set[str] = set()
    for table in Base.metadata.tables.values():
        known |= {str(index.name) for index in table.indexes}
        known |= {str(constraint.name) for constraint in table.constraints}
    assert not cited - known, f"not in the models: {sorted(cited - known)}"


def test_every_reference_link_is_defined_and_every_definition_used() -> None:
    used = set(re.findall(r"\]\[([a-z0-9-]+)\]", MARKDOWN))
    defined = set(re.findall(r"^\[([a-z0-9-]+)\]: https://\S+$", MARKDOWN, re.MULTILINE))
    assert used, "the guide cites its sources with reference links"
    assert used == defined, {"undefined": used - defined, "unused": defined - used}


# ------------------------------------------------------------------ the Citus block


def test_the_citus_block_distributes_existing_columns_referenced_tables_first() -> None:
    order = DISTRIBUTE.findall(CITUS_BLOCK)
    tables = Base.metadata.tables
    assert {table for table, _, _ in order} == set(tables)
    position = {table: index for index, (table, _, _) in enumerate(order)}
    for table, column, colocate_with in order:
        assert column in tables[table].c, f"{table} has no column {column}"
        if colocate_with:
            # Co-location needs the same distribution column type, and the group's
            # first table must already be distributed.
            assert position[colocate_with] < position[table]
            group_column = distributed_by()[colocate_with]
            assert str(tables[table].c[column].type) == str(
                tables[colocate_with].c[group_column].type
            )
        for key in tables[table].foreign_keys:
            referenced = key.column.table.name
            assert position[referenced] < position[table], f"{referenced} before {table}"
            # A foreign key between co-located tables must join distribution columns.
            assert key.parent.name == column
            assert key.column.name == distributed_by()[referenced]
    truncated = TRUNCATE_LOCAL.findall(CITUS_BLOCK)
    assert set(truncated) == set(tables)
    for table in tables.values():
        for key in table.foreign_keys:
            # Children's local copies go before the rows they reference.
            assert truncated.index(table.name) < truncated.index(key.column.table.name)


def test_the_citus_block_drops_exactly_the_policies_with_subqueries() -> None:
    spec = importlib.util.spec_from_file_location("migration_0003", MIGRATION_0003)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    with_subqueries = {
        (f"{table}_tenant_isolation", table)
        for table, condition in migration.POLICIES.items()
        if "SELECT" in condition.upper()
    }
    assert with_subqueries  # migration 0003 has them: the guide's point
    # Revision 0006's paused runs are policed through their conversation the same way.
    with_subqueries.add(("run_states_tenant_isolation", "run_states"))
    assert set(DROP_POLICY.findall(CITUS_BLOCK)) == with_subqueries


# ------------------------------------------------------------------ on PostgreSQL


@pytest.fixture
def keyed_database(postgres_server: Any) -> str:
    """A database at head with the guide's key block and policy drops applied."""
    url: str = postgres_server.create_database()
    get_store(url).ensure_schema()  # migrate to head (0003)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.begin() as connection:
            for statement in statements(KEY_BLOCK):
                connection.execute(text(statement))
            for statement in statements(CITUS_BLOCK):
                if statement.upper().startswith("DROP POLICY"):
                    connection.execute(text(statement))
    finally:
        engine.dispose()
    return url


def test_after_the_key_block_every_key_contains_the_distribution_column(
    keyed_database: str,
) -> None:
    engine = create_engine(keyed_database.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        inspector = inspect(engine)
        for table, column in distributed_by().items():
            primary_key = inspector.get_pk_constraint(table)
            assert primary_key["name"] == f"pk_{table}"
            assert column in primary_key["constrained_columns"], table
            for index in inspector.get_indexes(table):
                if index["unique"]:
                    assert column in index["column_names"], (table, index["name"])
        assert inspector.get_pk_constraint("messages")["constrained_columns"] == [
            "conversation_id",
            "id",
        ]
        names = {index["name"] for index in inspector.get_indexes("messages")}
        assert "ix_messages_conversation_id_id" not in names
        with engine.connect() as connection:
            policies = connection.execute(
                text(
                    "SELECT tablename, coalesce(qual, '') || coalesce(with_check, '') "
                    "FROM pg_policies WHERE tablename = ANY(:tables)"
                ),
                {"tables": list(distributed_by())},
            ).all()
            assert [table for table, _ in policies] == ["conversations"]
            assert all("select" not in condition.lower() for _, condition in policies)
            # Dropping the old history index loses nothing: the new primary key
            # serves "latest N of a conversation".
            connection.execute(text("SET enable_seqscan = off"))
            statement = str(_SELECT_LATEST.compile(dialect=engine.dialect))
            plan = connection.exec_driver_sql(
                "EXPLAIN " + statement, {"conversation_id": "conv-x", "limit": 10}
            ).scalars()
            assert "pk_messages" in "\n".join(plan)
    finally:
        engine.dispose()


def _item(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_after_the_key_block_the_session_statements_behave_as_before(
    keyed_database: str,
) -> None:
    store = get_store(keyed_database)
    conversation = f"conv-{uuid.uuid4()}"
    key = uuid.uuid4().hex
    with store.single_statement(write=True) as repos:
        assert repos.messages.append(conversation, [_item("a"), _item("b")]) == 2
    with store.single_statement(write=True) as repos:
        assert repos.messages.append(conversation, [_item("c")], idempotency_key=key) == 1
    with store.single_statement(write=True) as repos:
        # The partial unique index and the key check are untouched by the block.
        assert repos.messages.append(conversation, [_item("c")], idempotency_key=key) == 0
    with store.read() as repos:
        assert repos.messages.latest(conversation, 2) == [_item("b"), _item("c")]
        assert repos.messages.all(conversation) == [_item("a"), _item("b"), _item("c")]
    with store.single_statement(write=True) as repos:
        assert repos.messages.pop_latest(conversation) == _item("c")
    with store.transaction() as repos:
        assert repos.messages.clear(conversation) == 2
        repos.messages.append(conversation, [_item("d")])
        usage = [UsageEntry(model="m", prompt_tokens=3, completion_tokens=4)] * 2
        assert repos.usage.record(conversation, usage) == 2
    with store.read() as repos:
        assert repos.messages.all(conversation) == [_item("d")]
        assert repos.usage.totals_for_conversation(conversation).total_tokens == 14
    with store.transaction() as repos:
        # The cascade still reaches both re-keyed tables.
        assert repos.conversations.delete(conversation)
        assert repos.messages.count(conversation) == 0
        assert repos.usage.totals_for_conversation(conversation).requests == 0
