"""Settings: where the database URL and the other options come from, and what bad ones do.

The autouse fixture in conftest clears ``DATABASE_URL``/``AGENTS_SESSIONS_*``, points
``XDG_DATA_HOME`` at ``tmp_path/xdg`` and makes ``tmp_path`` the working directory,
so a ``.env`` written to ``tmp_path`` is the one the settings read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from agents_sessions import (
    ConfigurationError,
    PostgreSQLSession,
    Settings,
    dispose_all,
    get_store,
    load_settings,
)
from agents_sessions.db import engine as engine_module

PASSWORD = "hunter2"
PG_URL = f"postgresql://u:{PASSWORD}@h/db"
ENV_URL = "postgresql://env@h/from_env"
PREFIXED_URL = "postgresql://prefixed@h/from_prefixed_env"
DOTENV_URL = "postgresql://dotenv@h/from_dotenv"
EXPLICIT_URL = "postgresql://explicit@h/explicit"


@pytest.fixture(autouse=True)
def _fresh_engine_cache() -> Iterator[None]:
    dispose_all()
    yield
    dispose_all()


def write_dotenv(directory: Path, **values: str) -> None:
    lines = [f"{name}={value}" for name, value in values.items()]
    (directory / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")


def configured_url(settings: Settings) -> str | None:
    return None if settings.database_url is None else settings.database_url.get_secret_value()


# ------------------------------------------------------------------ database URL


def test_database_url_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", ENV_URL)

    settings = load_settings()

    assert configured_url(settings) == ENV_URL
    assert settings.resolved_database_url() == ENV_URL
    assert not settings.uses_embedded_default
    # And it is what a store (and so a session) uses when given no URL.
    assert get_store().target.url.database == "from_env"
    assert PostgreSQLSession("c").store.target.url.database == "from_env"


def test_agents_sessions_database_url_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_DATABASE_URL", PREFIXED_URL)

    assert configured_url(load_settings()) == PREFIXED_URL


def test_prefixed_agents_sessions_database_url_wins_over_database_url_when_both_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The AliasChoices order in settings.py: AGENTS_SESSIONS_DATABASE_URL, then DATABASE_URL.
    monkeypatch.setenv("DATABASE_URL", ENV_URL)
    monkeypatch.setenv("AGENTS_SESSIONS_DATABASE_URL", PREFIXED_URL)

    assert configured_url(load_settings()) == PREFIXED_URL


@pytest.mark.parametrize("variable", ["DATABASE_URL", "AGENTS_SESSIONS_DATABASE_URL"])
def test_dotenv_file_in_the_working_directory_is_read(tmp_path: Path, variable: str) -> None:
    write_dotenv(tmp_path, **{variable: DOTENV_URL, "AGENTS_SESSIONS_ECHO": "true"})

    settings = load_settings()

    assert configured_url(settings) == DOTENV_URL
    assert settings.echo is True
    assert get_store().target.url.database == "from_dotenv"


@pytest.mark.parametrize(
    ("dotenv_variable", "env_variable"),
    [
        ("DATABASE_URL", "DATABASE_URL"),
        ("AGENTS_SESSIONS_DATABASE_URL", "DATABASE_URL"),
        ("DATABASE_URL", "AGENTS_SESSIONS_DATABASE_URL"),
    ],
)
def test_environment_wins_over_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dotenv_variable: str, env_variable: str
) -> None:
    write_dotenv(tmp_path, **{dotenv_variable: DOTENV_URL})
    monkeypatch.setenv(env_variable, ENV_URL)

    assert configured_url(load_settings()) == ENV_URL


def test_explicit_overrides_win_over_environment_and_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dotenv(tmp_path, DATABASE_URL=DOTENV_URL, AGENTS_SESSIONS_AUTO_MIGRATE="false")
    monkeypatch.setenv("DATABASE_URL", ENV_URL)
    monkeypatch.setenv("AGENTS_SESSIONS_DATABASE_URL", PREFIXED_URL)
    monkeypatch.setenv("AGENTS_SESSIONS_SQLITE_BUSY_TIMEOUT_MS", "5")

    settings = load_settings(
        database_url=EXPLICIT_URL, auto_migrate=True, sqlite_busy_timeout_ms=77
    )

    assert configured_url(settings) == EXPLICIT_URL
    assert settings.auto_migrate is True
    assert settings.sqlite_busy_timeout_ms == 77
    assert configured_url(Settings(database_url=SecretStr(EXPLICIT_URL))) == EXPLICIT_URL
    # An explicit URL given to a session or store beats every setting too.
    assert PostgreSQLSession("c", database_url=EXPLICIT_URL).store.target.url.database == (
        "explicit"
    )


def test_none_overrides_are_ignored_and_leave_the_environment_in_charge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", ENV_URL)
    monkeypatch.setenv("AGENTS_SESSIONS_ECHO", "1")

    settings = load_settings(database_url=None, echo=None)

    assert configured_url(settings) == ENV_URL
    assert settings.echo is True


@pytest.mark.parametrize("blank", ["", "   "])
@pytest.mark.parametrize("source", ["env", "dotenv", "override"])
def test_blank_database_url_means_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank: str, source: str
) -> None:
    if source == "env":
        monkeypatch.setenv("DATABASE_URL", blank)
        settings = load_settings()
    elif source == "dotenv":
        write_dotenv(tmp_path, DATABASE_URL=blank)
        settings = load_settings()
    else:
        settings = load_settings(database_url=blank)

    expected = tmp_path / "xdg" / "agents_sessions" / "sessions.sqlite3"
    assert settings.database_url is None
    assert settings.uses_embedded_default
    assert settings.sqlite_path == expected
    assert settings.resolved_database_url() == f"sqlite:///{expected}"


def test_blank_prefixed_database_url_does_not_hide_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_DATABASE_URL", "")
    monkeypatch.setenv("DATABASE_URL", ENV_URL)

    assert configured_url(load_settings()) == ENV_URL


def test_sqlite_path_defaults_to_home_local_share_without_xdg_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    expected = tmp_path / "home" / ".local" / "share" / "agents_sessions" / "sessions.sqlite3"
    assert load_settings().sqlite_path == expected


def test_sqlite_path_env_var_moves_the_embedded_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_SQLITE_PATH", str(tmp_path / "elsewhere.db"))

    settings = load_settings()

    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert get_store().target.url.database == str(tmp_path / "elsewhere.db")


# --------------------------------------------------------------- other settings


def test_defaults_with_nothing_configured() -> None:
    settings = load_settings()

    assert settings.database_url is None
    assert settings.auto_migrate is True
    assert settings.echo is False
    assert settings.sqlite_busy_timeout_ms == 10_000


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "False"])
def test_auto_migrate_env_var_false_disables_auto_migration(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_AUTO_MIGRATE", value)

    assert load_settings().auto_migrate is False


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_echo_env_var_true_enables_echo(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_ECHO", value)

    assert load_settings().echo is True


def test_busy_timeout_and_migration_lock_id_env_vars_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_SQLITE_BUSY_TIMEOUT_MS", "250")
    monkeypatch.setenv("AGENTS_SESSIONS_MIGRATION_LOCK_ID", "42")

    settings = load_settings()

    assert settings.sqlite_busy_timeout_ms == 250
    assert settings.migration_lock_id == 42


INVALID_ENV = [
    ("AGENTS_SESSIONS_SQLITE_BUSY_TIMEOUT_MS", "-5", "sqlite_busy_timeout_ms"),
    ("AGENTS_SESSIONS_SQLITE_BUSY_TIMEOUT_MS", "abc", "sqlite_busy_timeout_ms"),
    ("AGENTS_SESSIONS_AUTO_MIGRATE", "maybe", "auto_migrate"),
    ("AGENTS_SESSIONS_ECHO", "sometimes", "echo"),
    ("AGENTS_SESSIONS_MIGRATION_LOCK_ID", "lock", "migration_lock_id"),
]


@pytest.mark.parametrize(("variable", "value", "field"), INVALID_ENV)
def test_invalid_env_value_raises_configuration_error_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as info:
        load_settings()

    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    # Everything that reads the settings fails the same way, before any I/O.
    with pytest.raises(ConfigurationError, match=field):
        get_store()
    with pytest.raises(ConfigurationError, match=field):
        PostgreSQLSession("c")


def test_invalid_override_raises_configuration_error_naming_the_field() -> None:
    with pytest.raises(ConfigurationError, match="sqlite_busy_timeout_ms"):
        load_settings(sqlite_busy_timeout_ms=-1)


@pytest.mark.parametrize(("variable", "value", "field"), INVALID_ENV)
def test_validation_errors_never_contain_the_database_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", PG_URL)
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert field in str(info.value)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)
    # pydantic's own error (which quotes inputs) is not chained for display.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__

    with pytest.raises(ValidationError) as raw:
        Settings()
    assert PASSWORD not in str(raw.value)


def test_invalid_database_url_type_error_does_not_echo_the_value() -> None:
    with pytest.raises(ConfigurationError, match="database_url") as info:
        load_settings(database_url=["postgresql://u:hunter2@h/db"])

    assert PASSWORD not in str(info.value)


# ---------------------------------------------------------- the embedded default


@pytest.fixture
def fresh_default_location_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Logged once" is per process; give this test a process-fresh flag.
    monkeypatch.setattr(engine_module, "_logged_default_locations", set())


def test_with_nothing_configured_a_session_works_on_the_embedded_sqlite_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_default_location_log: None
) -> None:
    caplog.set_level(logging.INFO, logger="agents_sessions")
    path = tmp_path / "xdg" / "agents_sessions" / "sessions.sqlite3"

    first, second, third = (PostgreSQLSession(f"c{i}") for i in range(3))

    assert not path.parent.exists(), "constructing sessions must do no I/O"
    assert first.store.engine is second.store.engine is third.store.engine
    assert first.store.dialect == "sqlite"
    assert first.store.target.url.database == str(path)

    items = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

    async def scenario() -> tuple[list[object], list[object], list[object]]:
        await first.add_items(items)
        await third.add_items(items[:1])
        return await first.get_items(), await second.get_items(), await third.get_items()

    assert asyncio.run(scenario()) == (items, [], items[:1])
    assert path.is_file()

    # A new session (same process, new engine) reads what the first one wrote.
    dispose_all()
    assert asyncio.run(PostgreSQLSession("c0").get_items()) == items

    mentions = [
        record
        for record in caplog.records
        if record.name == "agents_sessions" and str(path) in record.getMessage()
    ]
    assert len(mentions) == 1, [record.getMessage() for record in caplog.records]
    # A WARNING: an app meant for PostgreSQL must notice it is writing to a local file.
    assert mentions[0].levelno == logging.WARNING
    assert "DATABASE_URL=postgresql://" in mentions[0].getMessage()
    assert "AGENTS_SESSIONS_REQUIRE_DATABASE_URL" in mentions[0].getMessage()


def test_a_session_with_no_url_is_a_configuration_error_when_the_fallback_is_forbidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTS_SESSIONS_REQUIRE_DATABASE_URL", "true")
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        PostgreSQLSession("c1")
    assert not (tmp_path / "xdg").exists()
    # A configured URL is all it takes.
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'configured.sqlite3'}")
    assert PostgreSQLSession("c1").store.dialect == "sqlite"


def test_a_bad_setting_names_the_environment_variable_that_sets_it() -> None:
    with pytest.raises(ConfigurationError, match="AGENTS_SESSIONS_MAX_ITEM_BYTES"):
        load_settings(max_item_bytes=0)


def test_configured_database_url_logs_nothing_about_the_embedded_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_default_location_log: None,
) -> None:
    caplog.set_level(logging.INFO, logger="agents_sessions")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'configured.sqlite3'}")

    session = PostgreSQLSession("c")
    asyncio.run(session.add_items([{"role": "user", "content": "Hi"}]))

    assert (tmp_path / "configured.sqlite3").is_file()
    assert not (tmp_path / "xdg").exists()
    assert not [record for record in caplog.records if "embedded" in record.getMessage()]
