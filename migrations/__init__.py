"""Alembic migrations of agents_sessions.

Shipped in the wheel as the ``agents_sessions.migrations`` package.
"""
