"""`flotilla-scheduler`: one scheduler replica (run as many as you like)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from services.scheduler.config import SchedulerConfig
from services.scheduler.service import Scheduler
from services.service_main import Flag, ServiceCommand

COMMAND = ServiceCommand(
    prog="flotilla-scheduler",
    summary=(
        "Run a scheduler replica: consume the `scheduler` queue (ScheduleDomain), keep host "
        "state from heartbeats, place domains on compute nodes."
    ),
    settings=SchedulerConfig,
    start=lambda config: Scheduler(config).start(),
    flags=(
        Flag("--weigher", "RAM spread or pack", choices=("spread", "pack")),
        Flag("--top-n", "pick at random among the best N hosts", type=int),
        Flag("--max-attempts", "ceiling on hosts tried per domain", type=int),
    ),
    workers_help="requests handled at once",
)


def build_parser() -> argparse.ArgumentParser:
    return COMMAND.parser()


def main(argv: Sequence[str] | None = None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
