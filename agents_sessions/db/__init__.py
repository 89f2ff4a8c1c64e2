"""The database layer: engine and pool, the schema (ORM models), the driver hot path, migrations.

Everything here knows SQL and drivers; nothing here knows the Agents SDK. The
repositories (:mod:`agents_sessions.repositories`) and the store
(:mod:`agents_sessions.store`) are built on it.
"""
