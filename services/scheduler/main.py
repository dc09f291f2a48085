"""`flotilla-scheduler`: one scheduler replica (run as many as you like)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services import log
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import Scheduler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla-scheduler",
        description=(
            "Run a scheduler replica: consume the `scheduler` queue (ScheduleDomain), keep host "
            "state from heartbeats, place domains on compute nodes. Settings come from --config "
            "(TOML, [scheduler] table), then environment (FLOTILLA_AMQP_URL, "
            "FLOTILLA_SCHEDULER_WEIGHER, _TOP_N, _MAX_ATTEMPTS, _RAM_WEIGHT_MULTIPLIER, "
            "_CPU_WEIGHT_MULTIPLIER, _DOWN_AFTER_INTERVALS, _COMPUTE_TIMEOUT_S, "
            "_CLAIM_SYNC_TIMEOUT_S, _WORKERS, _FILTERS, _REPLICA), then flags."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file")
    parser.add_argument("--amqp-url", help="broker URL, or one per cluster node, comma-separated")
    parser.add_argument("--replica", help="this replica's name (default <host>-<pid>)")
    parser.add_argument("--weigher", choices=["spread", "pack"], help="RAM spread or pack")
    parser.add_argument("--top-n", type=int, help="pick at random among the best N hosts")
    parser.add_argument("--max-attempts", type=int, help="ceiling on hosts tried per domain")
    parser.add_argument("--workers", type=int, help="requests handled at once")
    parser.add_argument("--log-level", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    config = SchedulerConfig.load(
        args.config,
        amqp_url=args.amqp_url,
        replica=args.replica,
        weigher=args.weigher,
        top_n=args.top_n,
        max_attempts=args.max_attempts,
        workers=args.workers,
    )
    scheduler = Scheduler(config).start()
    try:
        scheduler.runner.run_forever()
    finally:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
