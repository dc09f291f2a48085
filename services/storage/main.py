"""`flotilla-storage`: one storage service replica (run as many as share a catalog)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services import log
from services.storage.config import StorageConfig
from services.storage.server import StorageServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla-storage",
        description=(
            "Run a storage service replica: consume the `storage` queue (pools, volumes), keep "
            "the catalog in SQL (SQLite, or PostgreSQL for several replicas), have host-local "
            "file work done by each host's storage agent and serve shared pools itself. "
            "Settings come from --config (TOML, [storage] table), then environment "
            "(FLOTILLA_AMQP_URL, FLOTILLA_STORAGE_DATABASE_URL, _SHARED_POOLS, _AGENT_HOSTS, "
            "_DEFAULT_POOL, _WORKERS, _REPLICA, _LEASE_S, _RECONCILE_INTERVAL_S), then flags."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file")
    parser.add_argument("--amqp-url", help="broker URL, or one per cluster node, comma-separated")
    parser.add_argument("--database-url", help="sqlite:////path.db or postgresql://…")
    parser.add_argument("--replica", help="this replica's name (default <host>-<pid>)")
    parser.add_argument("--shared-pools", help="name=/path,… shared pools served here")
    parser.add_argument("--agent-hosts", help="host,… whose agents' pools to learn at start")
    parser.add_argument("--default-pool", help="the pool of a volume created without one")
    parser.add_argument("--workers", type=int, help="commands handled at once")
    parser.add_argument("--log-level", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    config = StorageConfig.load(
        args.config,
        amqp_url=args.amqp_url,
        database_url=args.database_url,
        replica=args.replica,
        shared_pools=args.shared_pools,
        agent_hosts=args.agent_hosts,
        default_pool=args.default_pool,
        workers=args.workers,
    )
    server = StorageServer(config).start()
    try:
        server.runner.run_forever()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
