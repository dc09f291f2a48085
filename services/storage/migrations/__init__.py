"""The storage catalog's Alembic migrations (env.py, versions/); see docs/database.md."""
