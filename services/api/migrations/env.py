"""Alembic's entry point for the registry's migrations (services.db.run_env does the work)."""

from services.api.tables import REGISTRY
from services.db import run_env

run_env(REGISTRY)
