"""Configuration, read from the environment (and a ``.env`` file) with pydantic-settings.

Every field can be set by an environment variable named ``AGENTS_SESSIONS_<FIELD>``;
the database URL also answers to the conventional ``DATABASE_URL``. Explicit
constructor arguments win over the environment, which wins over ``.env``.

Which database URL wins: an explicit argument, then the process environment, then
``.env``; within each, ``AGENTS_SESSIONS_DATABASE_URL`` over ``DATABASE_URL``.

With no database URL anywhere, the package uses an embedded SQLite file (see
:attr:`Settings.sqlite_path`), so a first run needs no server; it says so once, as a
WARNING. ``require_database_url`` (``AGENTS_SESSIONS_REQUIRE_DATABASE_URL=true``)
forbids that fallback, for production.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def default_sqlite_path() -> Path:
    """Where the embedded SQLite database lives when nothing else is configured.

    ``$XDG_DATA_HOME/agents_sessions/sessions.sqlite3`` (``~/.local/share`` when unset):
    a per-user location that survives restarts and does not depend on the working
    directory the app was started from.
    """
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "agents_sessions" / "sessions.sqlite3"


class Settings(BaseSettings):
    """Settings for engines, migrations and sessions.

    The password inside :attr:`database_url` is kept as a secret: it never appears
    in ``repr()``, logs or error messages (use :meth:`safe_database_url` to show the
    URL to a person).
    """

    model_config = SettingsConfigDict(
        env_prefix="AGENTS_SESSIONS_",
        env_file=".env",
        env_file_encoding="utf-8",
        # `AGENTS_SESSIONS_DATABASE_URL=` must not hide a configured DATABASE_URL.
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AGENTS_SESSIONS_DATABASE_URL", "DATABASE_URL"),
        description=(
            "SQLAlchemy URL of the database, e.g. "
            "postgresql://user:pass@host:5432/db?pool_size=20&max_overflow=10. "
            "Pool options in the query string configure the pool; the rest reach the "
            "driver. When unset, the embedded SQLite file at sqlite_path is used."
        ),
    )
    migration_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AGENTS_SESSIONS_MIGRATION_URL", "DATABASE_MIGRATION_URL"),
        description=(
            "A direct URL to the same database as database_url, used for migrations "
            "(the CLI, alembic, auto-migration). Set it when database_url goes through a "
            "transaction-pooling proxy such as PgBouncer, or when migrations run as a "
            "different (owner) role. Defaults to database_url."
        ),
    )
    replica_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AGENTS_SESSIONS_REPLICA_URL", "DATABASE_REPLICA_URL"),
        description=(
            "URL of a read replica (a hot standby of the primary). Read-only work that "
            "tolerates replication lag -- analytics, listings, exports, stats -- goes "
            "there; if it cannot be reached it falls back to the primary (logged). "
            "Conversation history stays on the primary unless history_reads_from_replica."
        ),
    )
    history_reads_from_replica: bool = Field(
        default=False,
        description=(
            "Send the sessions' get_items() to the replica too. A turn writes its items "
            "and the next turn reads them back: with replication lag that read can miss "
            "the newest items, so enable this only where a stale history is acceptable."
        ),
    )
    replica_retry_after_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "After the replica failed to connect, how long replica-routed reads go "
            "straight to the primary before the replica is tried again."
        ),
    )
    require_database_url: bool = Field(
        default=False,
        description=(
            "Forbid the embedded SQLite fallback: with no database_url configured, "
            "resolving the database URL raises ConfigurationError instead of using "
            "sqlite_path. Set it in production, where a missing or misspelt DATABASE_URL "
            "must not send conversations to a local file."
        ),
    )
    auto_migrate: bool = Field(
        default=True,
        description=(
            "On the first operation per engine, upgrade a missing or outdated schema to "
            "head (under a lock). When False, a database behind head raises "
            "SchemaNotAtHeadError asking for `alembic upgrade head`."
        ),
    )
    echo: bool = Field(default=False, description="Log every SQL statement (SQLAlchemy echo).")
    sqlite_path: Path = Field(
        default_factory=default_sqlite_path,
        description="File of the embedded SQLite database used when no database_url is set.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        description=(
            "How long a SQLite connection waits for another process's write lock before "
            "failing with 'database is locked'."
        ),
    )
    max_item_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description=(
            "Largest item a session stores, measured as its JSON document in UTF-8 bytes. "
            "A larger item fails add_items with ItemTooLargeError before anything is written."
        ),
    )
    ttl: timedelta | None = Field(
        default=None,
        description=(
            "Default time-to-live of the conversations sessions write, e.g. 30d, 12h, "
            "90m, 45s, 2w (or seconds). Each write extends it; an expired conversation "
            "reads as empty and the next write starts it afresh. None: no expiry."
        ),
    )
    max_run_state_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description=(
            "Largest paused run (the SDK's RunState as JSON, UTF-8 bytes) that "
            "save_run_state stores; a larger one raises InvalidRunStateError."
        ),
    )
    statement_timeout_ms: int | None = Field(
        default=None,
        ge=1,
        description=(
            "PostgreSQL statement_timeout for this package's connections, in milliseconds "
            "(None: the server's setting). A cancelled statement raises "
            "StatementTimeoutError and writes nothing. Sent as a connection startup "
            "option; behind PgBouncer set it on the role instead (ALTER ROLE ... SET)."
        ),
    )
    lock_timeout_ms: int | None = Field(
        default=None,
        ge=1,
        description=(
            "PostgreSQL lock_timeout, in milliseconds: how long a statement waits for a "
            "row or table lock before failing with StatementTimeoutError (None: the "
            "server's setting). Same delivery as statement_timeout_ms."
        ),
    )
    retry_attempts: int = Field(
        default=3,
        ge=0,
        le=20,
        description=(
            "How many times an operation that is safe to repeat is retried after a lost "
            "connection or a failed connect (reads, exactly-once appends, clears), with "
            "exponential backoff from 50 ms. 0 disables retries."
        ),
    )
    migration_lock_id: int = Field(
        default=0x6167_656E_7473,  # "agents" in ASCII: an arbitrary, recognisable key
        description=(
            "Key of the PostgreSQL advisory lock that serialises schema migrations "
            "across processes and servers."
        ),
    )

    @field_validator("ttl", mode="before")
    @classmethod
    def _duration_with_unit(cls, value: object) -> object:
        # `30d`, `12h`: the spelling of the CLI's durations (pydantic reads seconds
        # and ISO 8601 itself). Blank means unset.
        if isinstance(value, str):
            text = value.strip().lower()
            if not text:
                return None
            if text[-1:] in _DURATION_UNITS and text[:-1].isdigit():
                return timedelta(seconds=int(text[:-1]) * _DURATION_UNITS[text[-1]])
        return value

    @field_validator("ttl")
    @classmethod
    def _positive_ttl(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(seconds=1):
            raise ValueError("must be at least one second")
        return value

    @field_validator("database_url", "migration_url", "replica_url", mode="before")
    @classmethod
    def _blank_url_means_unset(cls, value: object) -> object:
        # `DATABASE_URL=` in a .env file or a CI matrix means "not configured".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def resolved_database_url(self) -> str:
        """The URL to connect to: the configured one, or the embedded SQLite file.

        Raises:
            ConfigurationError: no URL is configured and :attr:`require_database_url`
                forbids the embedded file.
        """
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if self.require_database_url:
            raise ConfigurationError(
                "no database URL is configured and AGENTS_SESSIONS_REQUIRE_DATABASE_URL "
                "forbids the embedded SQLite file: set DATABASE_URL (or "
                "AGENTS_SESSIONS_DATABASE_URL, or --database-url) to "
                "postgresql://user:password@host:5432/dbname"
            )
        # Built, not formatted: a '?' or '%' in the path would otherwise be read as
        # the URL's query or an escape, and the database written somewhere else.
        path = str(self.sqlite_path)
        url = URL.create("sqlite", database=path).render_as_string()
        if make_url(url).database != path:
            # SQLAlchemy before 2.1 neither quotes nor unquotes a SQLite path in a URL.
            raise ConfigurationError(
                f"AGENTS_SESSIONS_SQLITE_PATH {path!r} holds '?', '%' or '#', which this "
                "SQLAlchemy cannot carry in a database URL (the file would be written "
                "elsewhere): choose another path, or use SQLAlchemy 2.1 or newer"
            )
        return url

    def resolved_migration_url(self) -> str:
        """The URL migrations run on: :attr:`migration_url`, else the database URL."""
        if self.migration_url is not None:
            return self.migration_url.get_secret_value()
        return self.resolved_database_url()

    def resolved_replica_url(self) -> str | None:
        """The replica's URL, or ``None`` when no replica is configured."""
        return None if self.replica_url is None else self.replica_url.get_secret_value()

    def safe_database_url(self) -> str:
        """The resolved URL with its password masked, fit for logs and messages."""
        from .db.engine import mask_url  # local import: engine depends on this module

        if self.database_url is None and self.require_database_url:
            return "<no database URL configured>"
        return mask_url(self.resolved_database_url())

    @property
    def uses_embedded_default(self) -> bool:
        """True when no URL is configured and the embedded SQLite file is in use."""
        return self.database_url is None


_DefaultsKey = tuple[str, float | None, tuple[tuple[str, str], ...]]
_defaults: dict[_DefaultsKey, Settings] = {}
_defaults_lock = threading.Lock()


def _renew_lock_in_forked_child() -> None:
    # A lock held by a parent thread at fork time would stay held in the child.
    global _defaults_lock
    _defaults_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock_in_forked_child)


def _environment_fingerprint() -> _DefaultsKey:
    cwd = os.getcwd()
    try:
        env_file_mtime: float | None = os.stat(os.path.join(cwd, ".env")).st_mtime
    except OSError:
        env_file_mtime = None
    relevant = tuple(
        sorted(
            (name, value)
            for name, value in os.environ.items()
            if name.startswith(("AGENTS_SESSIONS_", "DATABASE_"))
            or name in ("DATABASE_URL", "XDG_DATA_HOME")
        )
    )
    return cwd, env_file_mtime, relevant


def default_settings() -> Settings:
    """The settings from the environment, parsed once per distinct environment.

    Session objects are created per request; parsing the environment and ``.env``
    each time would cost more than a database round trip. The cache is keyed by the
    relevant environment variables, the working directory and ``.env``'s mtime, so
    a changed environment is still seen.
    """
    key = _environment_fingerprint()
    settings = _defaults.get(key)
    if settings is None:
        settings = load_settings()
        with _defaults_lock:
            if len(_defaults) > 64:  # environments churn only in tests; stay bounded
                _defaults.clear()
            _defaults[key] = settings
    return settings


def environment_variables_of(field: str) -> tuple[str, ...]:
    """The environment variables that set ``field`` (``DATABASE_URL`` first where it exists)."""
    info = Settings.model_fields.get(field)
    alias = None if info is None else info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices]
        return tuple(sorted(names, key=lambda name: name.startswith("AGENTS_SESSIONS_")))
    return (f"AGENTS_SESSIONS_{field.upper()}",)


def _setting_name(location: tuple[int | str, ...]) -> str:
    """``AGENTS_SESSIONS_MAX_ITEM_BYTES (max_item_bytes)``: what a reader can set."""
    if not location:
        return "settings"
    field = str(location[0])
    if field not in Settings.model_fields:  # an alias: already an environment variable
        return field
    return f"{' / '.join(environment_variables_of(field))} ({field})"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit ``overrides`` on top.

    Validation problems surface as :class:`~agents_sessions.errors.ConfigurationError`
    naming the field (the secret URL's value is never included).
    """
    from pydantic import ValidationError

    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{_setting_name(error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        # `from None` on purpose: pydantic's own message quotes the input values,
        # which for database_url would include the password.
        raise ConfigurationError(f"invalid agents_sessions settings: {problems}") from None
