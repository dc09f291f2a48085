"""Alembic's entry point for the storage catalog's migrations (services.db.run_env)."""

from services.db import run_env
from services.storage.tables import CATALOG

run_env(CATALOG)
