"""Tenant isolation by row-level security: two tenants under a least-privilege app role."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agents_sessions import (
    AccessDeniedError,
    InvalidArgumentError,
    PostgreSQLSession,
    UnknownBranchError,
    get_store,
    load_settings,
    upgrade,
)
from agents_sessions.cli import cli
from agents_sessions.ops.tenancy import row_level_security_status
from tests.conftest import PostgresServer

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.not_on_citus(
        "row-level security is refused on a distributed store (tests/citus checks the refusal)"
    ),
]


def user(text_: str) -> dict[str, Any]:
    return {"role": "user", "content": text_}


@dataclass
class TenantDatabase:
    owner_url: str
    app_url: str


def _as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@pytest.fixture
def tenant_database(postgres_server: PostgresServer) -> Iterator[TenantDatabase]:
    """A database migrated by an owner role, used by an app role with DML only, RLS on."""
    admin_url = postgres_server.create_database()
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"rls_owner_{suffix}", f"rls_app_{suffix}"
    database = make_url(admin_url).database
    admin = create_engine(make_url(admin_url).set(drivername="postgresql+psycopg2"))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{owner}" LOGIN'))
        connection.execute(text(f'CREATE ROLE "{app}" LOGIN'))
        connection.execute(text(f'GRANT CREATE, USAGE ON SCHEMA public TO "{owner}"'))
        connection.execute(text(f'GRANT USAGE ON SCHEMA public TO "{app}"'))
        connection.execute(
            text(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public '
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{app}"'
            )
        )
    owner_url, app_url = _as_role(admin_url, owner), _as_role(admin_url, app)
    upgrade(owner_url)
    result = CliRunner().invoke(cli, ["--database-url", owner_url, "rls", "enable", "--yes"])
    assert result.exit_code == 0, result.output
    try:
        yield TenantDatabase(owner_url=owner_url, app_url=app_url)
    finally:
        from agents_sessions import dispose_all

        dispose_all()
        with admin.begin() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                )
            )
            for role in (owner, app):
                connection.execute(text(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER'))
                connection.execute(text(f'DROP OWNED BY "{role}"'))
                connection.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


def _app_settings() -> Any:
    # The app role cannot migrate; it must find the schema at head.
    return load_settings(auto_migrate=False)


async def test_a_tenant_cannot_read_or_change_another_tenants_conversation(
    tenant_database: TenantDatabase,
) -> None:
    url, settings = tenant_database.app_url, _app_settings()
    alice = PostgreSQLSession("shared-id-a", database_url=url, tenant_id="alice", settings=settings)
    bob_on_alices = PostgreSQLSession(
        "shared-id-a", database_url=url, tenant_id="bob", settings=settings
    )
    await alice.add_items([user("alice 1"), user("alice 2")])

    # Bob knows the conversation id, and still sees nothing of it...
    assert await bob_on_alices.get_items() == []
    assert await bob_on_alices.pop_item() is None
    await bob_on_alices.clear_session()
    # ...and cannot write into it (nor take it over).
    with pytest.raises(AccessDeniedError) as refused:
        await bob_on_alices.add_items([user("bob was here")])
    assert "row-level security" in str(refused.value)
    assert await alice.get_items() == [user("alice 1"), user("alice 2")]

    bob = PostgreSQLSession("bobs-own", database_url=url, tenant_id="bob", settings=settings)
    await bob.add_items([user("bob 1")])
    assert await bob.get_items() == [user("bob 1")]
    assert await alice.pop_item() == user("alice 2")

    store = get_store(url, settings=settings)
    with store.read(tenant_id="bob") as repos:
        assert repos.conversations.get("shared-id-a") is None
        assert repos.conversations.get("bobs-own") is not None
        assert repos.messages.count("shared-id-a") == 0
    # The app role acting for nobody sees nothing at all (fail closed).
    with store.read() as repos:
        assert repos.connection.execute(text("SELECT count(*) FROM messages")).scalar_one() == 0
    # The owner role is not subject to the policies: administration sees everything.
    with get_store(tenant_database.owner_url).read() as repos:
        assert repos.messages.all("shared-id-a") == [user("alice 1")]
        assert repos.messages.all("bobs-own") == [user("bob 1")]


async def test_usage_of_another_tenant_is_invisible_and_cannot_be_written(
    tenant_database: TenantDatabase,
) -> None:
    url, settings = tenant_database.app_url, _app_settings()
    model = ScriptedModel([ModelStep(output=[assistant_message("hi")])])
    agent = Agent(name="a", model=model)
    alice = PostgreSQLSession("a-usage", database_url=url, tenant_id="alice", settings=settings)
    result = await Runner.run(agent, "hello", session=alice)
    # Recorded automatically during the run (under alice's tenant); not counted again.
    assert await alice.record_usage(result, model="scripted") == 0

    store = get_store(url, settings=settings)
    with store.read(tenant_id="bob") as repos:
        assert repos.usage.totals_by_model() == []
    with store.read(tenant_id="alice") as repos:
        assert [totals.key for totals in repos.usage.totals_by_model()] == ["scripted"]
    bob = PostgreSQLSession("a-usage", database_url=url, tenant_id="bob", settings=settings)
    with pytest.raises(AccessDeniedError):
        await bob.add_items([{"role": "user", "content": "bob writes into alice's"}])
    # The run's usage is recorded already: bob's attempt writes nothing.
    assert await bob.record_usage(result, model="bobs-model") == 0
    with store.read(tenant_id="alice") as repos:
        assert [totals.key for totals in repos.usage.totals_by_model()] == ["scripted"]


async def test_the_runner_passes_the_run_context_to_resolve_the_tenant(
    tenant_database: TenantDatabase,
) -> None:
    @dataclass
    class RequestContext:
        user_id: str

    url, settings = tenant_database.app_url, _app_settings()
    session = PostgreSQLSession(
        "ctx-conv",
        database_url=url,
        settings=settings,
        tenant_id=lambda wrapper: wrapper.context.user_id,
    )
    model = ScriptedModel([ModelStep(output=[assistant_message("one")])])
    await Runner.run(
        Agent(name="a", model=model),
        "first",
        session=session,
        context=RequestContext(user_id="carol"),
    )
    with get_store(url, settings=settings).read(tenant_id="carol") as repos:
        record = repos.conversations.get("ctx-conv")
        assert record is not None and record.user_id == "carol"
        assert len(repos.messages.all("ctx-conv")) == 2
    with get_store(url, settings=settings).read(tenant_id="dave") as repos:
        assert repos.messages.all("ctx-conv") == []
    # Called directly, without the Runner's wrapper, it says what is missing.
    with pytest.raises(InvalidArgumentError, match="wrapper"):
        await session.get_items()


def test_rls_status_and_disable_from_the_command_line(tenant_database: TenantDatabase) -> None:
    runner = CliRunner()
    owner = ["--database-url", tenant_database.owner_url]
    shown = runner.invoke(cli, [*owner, "rls", "status", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"messages": true' in shown.output
    assert runner.invoke(cli, [*owner, "rls", "disable"]).exit_code == 0
    with get_store(tenant_database.owner_url).read() as repos:
        assert set(row_level_security_status(repos.connection).values()) == {False}


def test_user_id_and_tenant_id_must_agree() -> None:
    with pytest.raises(InvalidArgumentError, match="tenant_id"):
        PostgreSQLSession("c", database_url="sqlite:///x.db", user_id="alice", tenant_id="bob")


def test_the_repository_api_acting_for_a_tenant_owns_what_it_writes(
    tenant_database: TenantDatabase,
) -> None:
    store = get_store(tenant_database.app_url, settings=_app_settings())
    with store.transaction(tenant_id="erin") as repos:
        # No user_id given: the acting tenant owns the new conversation.
        repos.messages.append("erin-conv", [user("one")])
        repos.conversations.ensure("erin-other")
    with store.read(tenant_id="erin") as repos:
        record = repos.conversations.get("erin-conv")
        assert record is not None and record.user_id == "erin"
        assert repos.conversations.get("erin-other") is not None


def test_a_streamed_read_acting_for_a_tenant_returns_the_real_rows(
    tenant_database: TenantDatabase,
) -> None:
    store = get_store(tenant_database.app_url, settings=_app_settings())
    with store.transaction(tenant_id="frank") as repos:
        repos.messages.append("frank-conv", [user("m1"), user("m2")])
    with store.transaction(tenant_id="frank") as repos:
        # A server-side cursor (DECLARE ... CURSOR FOR): the tenant is set beside it.
        rows = repos.connection.execution_options(stream_results=True).execute(
            text("SELECT content FROM messages ORDER BY id")
        )
        assert [row.content for row in rows] == ["m1", "m2"]


async def test_branches_of_another_tenant_are_invisible_and_cannot_be_switched_to(
    tenant_database: TenantDatabase,
) -> None:
    url, settings = tenant_database.app_url, _app_settings()
    alice = PostgreSQLSession("a-branches", database_url=url, tenant_id="alice", settings=settings)
    for turn in range(1, 3):
        await alice.add_items([user(f"q{turn}"), {"role": "assistant", "content": f"a{turn}"}])
    assert await alice.create_branch_from_turn(2, "alices") == "alices"
    assert await alice.get_items() == [user("q1"), {"role": "assistant", "content": "a1"}]

    bob = PostgreSQLSession("a-branches", database_url=url, tenant_id="bob", settings=settings)
    assert await bob.list_branches() == []
    assert await bob.get_items(branch_id="alices") == []
    with pytest.raises(UnknownBranchError):
        await bob.switch_to_branch("alices")
    store = get_store(url, settings=settings)
    with store.read(tenant_id="bob") as repos:
        assert repos.branches.rows("a-branches") == {}
    assert [b["branch_id"] for b in await alice.list_branches()] == ["main", "alices"]


async def test_tenant_isolation_survives_a_downgrade_below_0003_and_the_upgrade_after_it(
    tenant_database: TenantDatabase,
) -> None:
    from agents_sessions import dispose_all

    url, settings = tenant_database.app_url, _app_settings()
    alice = PostgreSQLSession("alice-conv", database_url=url, tenant_id="alice", settings=settings)
    await alice.add_items([user("alice's secret")])
    owner = ["--database-url", tenant_database.owner_url]
    runner = CliRunner()

    declined = runner.invoke(cli, [*owner, "migrate", "downgrade", "0002"], input="n\n")
    assert declined.exit_code == 1
    assert "tenant isolation is enabled and stays enabled" in declined.output
    downgraded = runner.invoke(cli, [*owner, "migrate", "downgrade", "0002", "--yes"])
    assert downgraded.exit_code == 0, downgraded.output
    missing_line = next(line for line in downgraded.output.splitlines() if "are missing" in line)
    assert all(table in missing_line for table in ("conversations", "messages", "usage_logs"))
    # Meanwhile: still switched on, and without policies the app role sees nothing.
    status = runner.invoke(cli, [*owner, "rls", "status", "--json"])
    assert '"conversations": true' in status.output and "false" not in status.output
    doctor = runner.invoke(cli, [*owner, "doctor"])
    assert doctor.exit_code == 1 and "tenant_isolation" in doctor.output
    dispose_all()

    upgraded = runner.invoke(cli, [*owner, "migrate", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    dispose_all()
    bob_on_alices = PostgreSQLSession(
        "alice-conv", database_url=url, tenant_id="bob", settings=settings
    )
    assert await bob_on_alices.get_items() == []
    with pytest.raises(AccessDeniedError):
        await bob_on_alices.add_items([user("bob was here")])
    alice = PostgreSQLSession("alice-conv", database_url=url, tenant_id="alice", settings=settings)
    assert await alice.get_items() == [user("alice's secret")]
    healthy = runner.invoke(cli, [*owner, "doctor"])
    assert healthy.exit_code == 0, healthy.output
    assert "tenant isolation is enforced" in healthy.output


async def test_tenant_id_where_isolation_is_not_enforced_warns_once(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = postgres_server.create_database()  # row-level security never enabled
    session = PostgreSQLSession("c", database_url=url, tenant_id="alice")

    with caplog.at_level("WARNING", logger="agents_sessions"):
        await session.add_items([user("one")])
        await session.get_items()
        other = PostgreSQLSession("d", database_url=url, tenant_id="bob")
        await other.get_items()

    warnings = [r.getMessage() for r in caplog.records if "tenant_id is set" in r.getMessage()]
    assert len(warnings) == 1
    assert "row-level security is not enabled" in warnings[0]
    assert "rls enable" in warnings[0]


async def test_tenant_id_where_isolation_is_enforced_does_not_warn(
    tenant_database: TenantDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    session = PostgreSQLSession(
        "c", database_url=tenant_database.app_url, tenant_id="alice", settings=_app_settings()
    )
    with caplog.at_level("WARNING", logger="agents_sessions"):
        await session.add_items([user("one")])
    assert not [r for r in caplog.records if "tenant_id is set" in r.getMessage()]


async def test_conversation_ids_are_one_namespace_across_tenants(
    tenant_database: TenantDatabase,
) -> None:
    # Decision (README, Security): ids are global, not per tenant. A tenant who
    # takes an id first owns it; another tenant writing to that id gets a clear
    # AccessDeniedError and learns nothing of its contents. Give conversations
    # unguessable ids (uuid4) or ids prefixed with their tenant, and no tenant can
    # take another's next id.
    url, settings = tenant_database.app_url, _app_settings()
    squatter = PostgreSQLSession("conv-1", database_url=url, tenant_id="mallory", settings=settings)
    await squatter.add_items([user("planted")])

    victim = PostgreSQLSession("conv-1", database_url=url, tenant_id="alice", settings=settings)
    with pytest.raises(AccessDeniedError):
        await victim.add_items([user("alice's first message")])
    assert await victim.get_items() == []
    assert await squatter.get_items() == [user("planted")]  # alice's text went nowhere

    prefixed = PostgreSQLSession(
        f"alice:{uuid.uuid4()}", database_url=url, tenant_id="alice", settings=settings
    )
    await prefixed.add_items([user("safe")])
    assert await prefixed.get_items() == [user("safe")]
