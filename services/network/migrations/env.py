"""Alembic's entry point for the network catalog's migrations (services.db.run_env)."""

from services.db import run_env
from services.network.tables import CATALOG

run_env(CATALOG)
