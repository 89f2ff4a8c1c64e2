"""Operations on a store: analytics, retention, backup, doctor, tenancy, roles, transfer.

What operators and the ``agents-sessions`` CLI do to a database, as functions. These
modules import the core (:mod:`agents_sessions.store`, the repositories, the db
layer); the core never imports them.
"""
