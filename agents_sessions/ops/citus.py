"""Sharding the store across a Citus cluster: distribute the tables, report the cluster.

Citus (an extension of PostgreSQL) splits a *distributed* table into shards placed
on worker nodes; clients connect to the coordinator. The store distributes its three
tables by conversation id, **co-located**: a conversation's row, its messages and
its usage rows live in the same shard group on the same worker. Every session call
(append, latest N, pop, clear) names one conversation, so Citus routes it whole to
that one worker; listings, statistics and erasure of a user fan out to all shards.

Preconditions :func:`distribution_plan` checks (and :func:`distribute` refuses
without, raising :class:`~agents_sessions.errors.CitusError`):

* the Citus extension in this database, and the connection is to the coordinator;
* at least one active worker node;
* the schema at a revision whose keys include ``conversation_id`` (migration 0004):
  Citus requires every key and unique constraint to include the distribution column;
* row-level security not enabled: the policies of ``messages`` and ``usage_logs``
  look the conversation up in a subquery, which Citus does not allow on distributed
  tables. Those two (inert) policies are dropped when their tables are distributed;
  tenant isolation on a cluster is the application's job (``rls enable`` refuses).

Distributing copies existing rows into the shards (a table is locked against writes
while it is copied); on an empty or small store it takes seconds. Each table is
distributed in its own transaction, and a repeated run skips what is done.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from ..errors import CitusError

#: table -> its distribution column. ``conversations`` first: the others co-locate with it.
DISTRIBUTION_COLUMNS = {
    "conversations": "id",
    "messages": "conversation_id",
    "usage_logs": "conversation_id",
    "conversation_branches": "conversation_id",
    "append_keys": "conversation_id",
    "run_states": "conversation_id",
}
#: Tenant policies (migrations 0003, 0005-0007) Citus cannot distribute: they use a subquery.
SUBQUERY_POLICIES = {
    "messages": "messages_tenant_isolation",
    "usage_logs": "usage_logs_tenant_isolation",
    "conversation_branches": "conversation_branches_tenant_isolation",
    "append_keys": "append_keys_tenant_isolation",
    "run_states": "run_states_tenant_isolation",
}


def citus_version(connection: Connection) -> str | None:
    """The Citus extension's version in this database, or ``None`` without it (or on SQLite)."""
    if connection.dialect.name != "postgresql":
        return None
    version = connection.execute(
        text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
    ).scalar_one_or_none()
    return None if version is None else str(version)


def distributed_tables(connection: Connection) -> dict[str, str]:
    """The store's tables that are distributed, each with its distribution column."""
    if citus_version(connection) is None:
        return {}
    rows = connection.execute(
        text(
            "SELECT c.relname, column_to_column_name(p.logicalrelid, p.partkey) "
            "FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid "
            "WHERE c.relname = ANY(:tables) AND c.relnamespace = current_schema()::regnamespace "
            "AND p.partmethod = 'h'"
        ),
        {"tables": list(DISTRIBUTION_COLUMNS)},
    )
    return {str(name): str(column) for name, column in rows}


def is_distributed(connection: Connection) -> bool:
    """Whether the store's ``conversations`` table is distributed (a sharded store)."""
    return "conversations" in distributed_tables(connection)


@dataclass
class DistributionPlan:
    """What :func:`distribute` will do (or did), table by table.

    Attributes:
        citus_version: The extension's version.
        workers: Active worker nodes (``host:port``).
        shard_count: Shards per table for tables not yet distributed.
        steps: ``(table, action)``: ``"distribute"`` or ``"already distributed"``.
        notes: Things done on the way that an operator should know about.
    """

    citus_version: str
    workers: list[str]
    shard_count: int
    steps: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pending(self) -> list[str]:
        """Tables still to distribute."""
        return [table for table, action in self.steps if action == "distribute"]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able form (for ``--json``)."""
        data = asdict(self)
        data["steps"] = [{"table": table, "action": action} for table, action in self.steps]
        return data


def _require_citus(connection: Connection) -> str:
    version = citus_version(connection)
    if version is None:
        where = "SQLite" if connection.dialect.name != "postgresql" else "this database"
        raise CitusError(
            f"Citus is not available in {where}: install the Citus extension on every "
            "node (its own packages or images), set shared_preload_libraries = 'citus', "
            "run CREATE EXTENSION citus in the database, and point --database-url at "
            "the coordinator"
        )
    return version


def _check_keys(connection: Connection) -> None:
    for table, column in DISTRIBUTION_COLUMNS.items():
        if connection.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None:
            raise CitusError(
                f"table {table} does not exist: run `agents-sessions migrate upgrade` first"
            )
        rows = connection.execute(
            text(
                "SELECT i.indexrelid::regclass::text, array_agg(a.attname::text) "
                "FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = CAST(:t AS regclass) AND (i.indisunique OR i.indisprimary) "
                "GROUP BY i.indexrelid"
            ),
            {"t": table},
        )
        for index, columns in rows:
            if column not in columns:
                raise CitusError(
                    f"{index} on {table} does not include {column}, which every key of a "
                    "distributed table must: run `agents-sessions migrate upgrade` (the "
                    "migration that re-keys messages and usage_logs) first"
                )


def _check_row_security(connection: Connection) -> None:
    enabled = list(
        connection.execute(
            text(
                "SELECT relname FROM pg_class WHERE relname = ANY(:tables) AND relrowsecurity "
                "AND relnamespace = current_schema()::regnamespace ORDER BY relname"
            ),
            {"tables": list(DISTRIBUTION_COLUMNS)},
        ).scalars()
    )
    if enabled:
        raise CitusError(
            f"row-level security is enabled on {', '.join(enabled)}; its tenant policies "
            "cannot be distributed (Citus allows no subqueries in policies). Run "
            "`agents-sessions rls disable` first; on a cluster, scope tenants in the application"
        )


def distribution_plan(connection: Connection, *, shard_count: int = 32) -> DistributionPlan:
    """Check the preconditions and say what :func:`distribute` would do; changes nothing.

    Raises:
        CitusError: a precondition fails (the message says which, and what to do).
    """
    if not isinstance(shard_count, int) or isinstance(shard_count, bool) or shard_count < 1:
        raise CitusError("shard_count must be a positive int")
    version = _require_citus(connection)
    if not connection.execute(text("SELECT citus_is_coordinator()")).scalar():
        raise CitusError(
            "this is not the Citus coordinator: point --database-url at the coordinator "
            "(after `SELECT citus_set_coordinator_host(...)` there)"
        )
    workers = [
        f"{host}:{port}"
        for host, port in connection.execute(
            text(
                "SELECT nodename, nodeport FROM pg_dist_node "
                "WHERE isactive AND noderole = 'primary' AND groupid <> 0 ORDER BY nodeid"
            )
        )
    ]
    if not workers:
        raise CitusError(
            "the cluster has no active worker node: add them on the coordinator with "
            "SELECT citus_add_node('host', port)"
        )
    _check_keys(connection)
    _check_row_security(connection)
    done = distributed_tables(connection)
    plan = DistributionPlan(citus_version=version, workers=workers, shard_count=shard_count)
    for table, column in DISTRIBUTION_COLUMNS.items():
        if table not in done:
            plan.steps.append((table, "distribute"))
        elif done[table] != column:
            raise CitusError(
                f"{table} is distributed by {done[table]}, not {column}: undistribute it "
                f"(SELECT undistribute_table('{table}')) and run this again"
            )
        else:
            plan.steps.append((table, "already distributed"))
    return plan


def distribute(
    connection: Connection, *, shard_count: int = 32, dry_run: bool = False
) -> DistributionPlan:
    """Distribute the three tables by conversation id, co-located; idempotent.

    ``connection`` must be in autocommit mode (each table is distributed, and
    committed, by itself; a re-run resumes). ``shard_count`` applies to
    ``conversations``; the other two take its shards (co-location). With
    ``dry_run``, only :func:`distribution_plan` runs.

    Raises:
        CitusError: a precondition fails; nothing was changed.
    """
    plan = distribution_plan(connection, shard_count=shard_count)
    if dry_run:
        return plan
    for table in plan.pending:
        policy = SUBQUERY_POLICIES.get(table)
        if policy is not None:
            exists = connection.execute(
                text("SELECT 1 FROM pg_policies WHERE tablename = :t AND policyname = :p"),
                {"t": table, "p": policy},
            ).scalar()
            if exists:
                connection.execute(text(f"DROP POLICY {policy} ON {table}"))
                plan.notes.append(f"dropped the (inert) row-security policy {policy}")
        if table == "conversations":
            connection.execute(
                text("SELECT create_distributed_table(:t, :c, shard_count => :n)"),
                {"t": table, "c": DISTRIBUTION_COLUMNS[table], "n": shard_count},
            )
        else:
            connection.execute(
                text("SELECT create_distributed_table(:t, :c, colocate_with => 'conversations')"),
                {"t": table, "c": DISTRIBUTION_COLUMNS[table]},
            )
    return plan


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster as the coordinator sees it.

    Attributes:
        citus_version: The extension's version.
        nodes: ``{"node", "role", "active", "shards"}`` per node (``shards`` of the
            store's tables placed there).
        tables: ``{"table", "distributed_by", "shards", "size_bytes"}`` per table
            (``distributed_by`` is ``None`` for a table not distributed).
    """

    citus_version: str
    nodes: list[dict[str, Any]]
    tables: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able form (for ``--json``)."""
        return asdict(self)


def cluster_status(connection: Connection) -> ClusterStatus:
    """Nodes, shards per node and table sizes (sizes summed over every shard).

    Raises:
        CitusError: the database has no Citus extension.
    """
    version = _require_citus(connection)
    tables = list(DISTRIBUTION_COLUMNS)
    shards = {
        (str(host), int(port)): int(count)
        for host, port, count in connection.execute(
            text(
                "SELECT nodename, nodeport, count(*) FROM citus_shards "
                "WHERE table_name::text = ANY(:tables) GROUP BY nodename, nodeport"
            ),
            {"tables": tables},
        )
    }
    nodes = [
        {
            "node": f"{host}:{port}",
            "role": "coordinator" if group == 0 else "worker",
            "active": bool(active),
            "shards": shards.get((str(host), int(port)), 0),
        }
        for host, port, group, active in connection.execute(
            text(
                "SELECT nodename, nodeport, groupid, isactive FROM pg_dist_node "
                "WHERE noderole = 'primary' ORDER BY groupid, nodeid"
            )
        )
    ]
    distributed = distributed_tables(connection)
    table_rows = []
    for table in tables:
        if table in distributed:
            count, size = connection.execute(
                text(
                    "SELECT count(*), coalesce(sum(shard_size), 0) FROM citus_shards "
                    "WHERE table_name = CAST(:t AS regclass)"
                ),
                {"t": table},
            ).one()
        else:
            count = 0
            size = connection.execute(
                text("SELECT coalesce(pg_total_relation_size(to_regclass(:t)), 0)"), {"t": table}
            ).scalar_one()
        table_rows.append(
            {
                "table": table,
                "distributed_by": distributed.get(table),
                "shards": int(count),
                "size_bytes": int(size),
            }
        )
    return ClusterStatus(citus_version=version, nodes=nodes, tables=table_rows)


__all__ = [
    "DISTRIBUTION_COLUMNS",
    "ClusterStatus",
    "DistributionPlan",
    "citus_version",
    "cluster_status",
    "distribute",
    "distributed_tables",
    "distribution_plan",
    "is_distributed",
]
