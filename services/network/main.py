"""`flotilla-network`: one network service replica (run as many as you like on one database)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services import log
from services.network.config import NetworkConfig
from services.network.service import NetworkServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla-network",
        description=(
            "Run a network service replica: consume the `network` queue (networks, ports, "
            "IPAM) with its catalog in SQL (SQLite, or PostgreSQL shared by replicas). "
            "Settings come from --config (TOML, [network] table), then environment "
            "(FLOTILLA_AMQP_URL, FLOTILLA_NETWORK_DATABASE_URL, _REPLICA, _UNDERLAY_MTU, "
            "_QUARANTINE_S, _WORKERS), then flags."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file")
    parser.add_argument("--amqp-url", help="broker URL, or one per cluster node, comma-separated")
    parser.add_argument("--database-url", help="sqlite:////path.db or postgresql://…")
    parser.add_argument("--replica", help="this replica's name (default <host>-<pid>)")
    parser.add_argument("--workers", type=int, help="commands handled at once")
    parser.add_argument("--log-level", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    config = NetworkConfig.load(
        args.config,
        amqp_url=args.amqp_url,
        database_url=args.database_url,
        replica=args.replica,
        workers=args.workers,
    )
    server = NetworkServer(config).start()
    try:
        server.runner.run_forever()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
