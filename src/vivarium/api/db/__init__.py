"""The control plane's SQL state: teams, API keys and the sandbox catalog.

SQLite in the state directory by default, PostgreSQL by URL; the schema changes only through
Alembic migrations (`migrations/versions`), applied on start.
"""
