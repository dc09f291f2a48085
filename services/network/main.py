"""`flotilla-network`: one network service replica (run as many as you like on one database)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from services.network.config import NetworkConfig
from services.network.service import NetworkServer
from services.service_main import ServiceCommand

COMMAND = ServiceCommand(
    prog="flotilla-network",
    summary=(
        "Run a network service replica: consume the `network` queue (networks, ports, IPAM) "
        "with its catalog in SQL (SQLite, or PostgreSQL shared by replicas)."
    ),
    settings=NetworkConfig,
    start=lambda config: NetworkServer(config).start(),
    database=True,
)


def build_parser() -> argparse.ArgumentParser:
    return COMMAND.parser()


def main(argv: Sequence[str] | None = None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
