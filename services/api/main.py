"""`flotilla-api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from services import log
from services.api.app import create_app
from services.api.config import ApiConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla-api",
        description=(
            "Serve Flotilla's HTTP API (domains, hosts, events). Settings come from --config "
            "(TOML, or YAML by suffix; an [api] table: tokens, quotas, database_url, …), then "
            "FLOTILLA_API_LISTEN_HOST, FLOTILLA_API_LISTEN_PORT, FLOTILLA_API_DATABASE_URL, "
            "FLOTILLA_AMQP_URL, FLOTILLA_API_RPC_TIMEOUT_S, FLOTILLA_API_SCHEDULE_TIMEOUT_S, "
            "then flags. See docs/api.md."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML or YAML file")
    parser.add_argument("--listen-host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--listen-port", type=int, help="port (default 8780; 0 picks one)")
    parser.add_argument(
        "--database-url", help="sqlite:////path/registry.db or postgresql://user@host/db"
    )
    parser.add_argument("--amqp-url", help="broker URL, or one per cluster node, comma-separated")
    parser.add_argument("--log-level", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    config = ApiConfig.load(
        args.config,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        database_url=args.database_url,
        amqp_url=args.amqp_url,
    )
    uvicorn.run(
        create_app(config),
        host=config.listen_host,
        port=config.listen_port,
        log_level=(args.log_level or "info").lower(),
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
