"""TLS to PostgreSQL: sessions and stores over encrypted, verified connections.

Everything runs against a throwaway server (the ``tls_cluster`` fixture) whose
``pg_hba.conf`` rejects unencrypted TCP connections, with a certificate for
``localhost`` and ``127.0.0.1`` signed by a throwaway CA. ``sslmode`` and
``sslrootcert`` are libpq parameters: they ride in the database URL's query string
and reach the driver unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agents_sessions import DatabaseError, PoolTimeoutError, PostgreSQLSession, get_store
from tests.support.pgcluster import CertificateAuthority, Cluster

pytestmark = pytest.mark.postgres_only

PASSWORD = "tls-test-secret-pw"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


@pytest.fixture
def database(tls_cluster: Cluster) -> Iterator[str]:
    """A fresh database on the TLS server (its name)."""
    url = tls_cluster.create_database()
    name = url.rsplit("/", 1)[1]
    yield name
    tls_cluster.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ca_path(cluster: Cluster) -> str:
    assert cluster.ca is not None
    return str(cluster.ca.cert)


def connection_is_encrypted(url: str) -> bool:
    """Ask the server whether this store's connection is TLS (``pg_stat_ssl``)."""
    with get_store(url).read() as repos:
        return bool(
            repos.connection.exec_driver_sql(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).scalar_one()
        )


async def exercise_session(url: str, conversation_id: str) -> None:
    """A session's whole protocol over ``url``, checked item by item."""
    session = PostgreSQLSession(conversation_id, database_url=url, user_id="tls-user")
    await session.add_items([user("one"), user("two")])
    await session.add_items([user("three")])
    assert await session.get_items() == [user("one"), user("two"), user("three")]
    assert await session.get_items(limit=1) == [user("three")]
    assert await session.pop_item() == user("three")
    await session.clear_session()
    assert await session.get_items() == []


async def test_sessions_and_the_store_work_with_sslmode_require(
    tls_cluster: Cluster, database: str, conversation_id: str
) -> None:
    url = tls_cluster.url(database, sslmode="require")

    await exercise_session(url, conversation_id)
    with get_store(url).transaction() as repos:
        repos.conversations.upsert(f"{conversation_id}-2", user_id="tls-user")
        repos.messages.append(f"{conversation_id}-2", [user("via the repository API")])
    with get_store(url).read() as repos:
        assert repos.messages.all(f"{conversation_id}-2") == [user("via the repository API")]
        assert repos.conversations.get(conversation_id) is not None  # migrated over TLS too
    assert connection_is_encrypted(url)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_sessions_work_with_verify_full_against_the_servers_ca(
    tls_cluster: Cluster, database: str, conversation_id: str, host: str
) -> None:
    # verify-full checks the chain against sslrootcert *and* the host name against
    # the certificate's subjectAltName (DNS:localhost, IP:127.0.0.1).
    url = tls_cluster.url(
        database, host=host, sslmode="verify-full", sslrootcert=ca_path(tls_cluster)
    )

    await exercise_session(url, conversation_id)
    assert connection_is_encrypted(url)


async def test_verify_full_against_a_wrong_ca_fails_clearly_without_the_password(
    tls_cluster: Cluster, database: str, conversation_id: str, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.create(tmp_path / "other-ca", name="some other CA")
    url = tls_cluster.url(
        database,
        password=PASSWORD,
        sslmode="verify-full",
        sslrootcert=str(stranger.cert),
        connect_timeout=10,
    )
    session = PostgreSQLSession(conversation_id, database_url=url)

    with pytest.raises(DatabaseError) as info:
        await session.add_items([user("must not be stored")])

    error = info.value
    assert not isinstance(error, PoolTimeoutError)
    assert "certificate verify failed" in str(error)
    for text in (str(error), repr(error), str(error.__cause__), repr(session)):
        assert PASSWORD not in text
    # Nothing was written: the right CA sees an empty conversation.
    trusted = tls_cluster.url(database, sslmode="verify-full", sslrootcert=ca_path(tls_cluster))
    assert await PostgreSQLSession(conversation_id, database_url=trusted).get_items() == []


async def test_verify_full_refuses_a_host_name_the_certificate_does_not_name(
    tls_cluster: Cluster, database: str, conversation_id: str
) -> None:
    # libpq connects to hostaddr but checks the certificate against host: the right
    # server, the right CA, the wrong name.
    url = tls_cluster.url(
        database,
        host="db.example.invalid",
        hostaddr="127.0.0.1",
        sslmode="verify-full",
        sslrootcert=ca_path(tls_cluster),
    )

    with pytest.raises(DatabaseError) as info:
        await PostgreSQLSession(conversation_id, database_url=url).get_items()

    assert "db.example.invalid" in str(info.value)
    assert "does not match host name" in str(info.value)


async def test_an_unencrypted_connection_is_refused_by_a_tls_only_server(
    tls_cluster: Cluster, database: str, conversation_id: str
) -> None:
    url = tls_cluster.url(database, password=PASSWORD, sslmode="disable")

    with pytest.raises(DatabaseError) as info:
        await PostgreSQLSession(conversation_id, database_url=url).add_items([user("plain")])

    # pg_hba.conf's `hostnossl ... reject` line answered, not a network problem.
    assert "pg_hba.conf rejects connection" in str(info.value)
    assert "no encryption" in str(info.value)
    assert PASSWORD not in str(info.value)
