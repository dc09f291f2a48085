"""`flotilla-storage`: one storage service replica (run as many as share a catalog)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from services.service_main import Flag, ServiceCommand
from services.storage.config import StorageConfig
from services.storage.server import StorageServer

COMMAND = ServiceCommand(
    prog="flotilla-storage",
    summary=(
        "Run a storage service replica: consume the `storage` queue (pools, volumes), keep "
        "the catalog in SQL (SQLite, or PostgreSQL for several replicas), have host-local "
        "file work done by each host's storage agent and serve shared pools itself."
    ),
    settings=StorageConfig,
    start=lambda config: StorageServer(config).start(),
    flags=(
        Flag("--shared-pools", "name=/path,… shared pools served here"),
        Flag("--agent-hosts", "host,… whose agents' pools to learn at start"),
        Flag("--default-pool", "the pool of a volume created without one"),
    ),
    database=True,
)


def build_parser() -> argparse.ArgumentParser:
    return COMMAND.parser()


def main(argv: Sequence[str] | None = None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
