"""The command line and run loop of the replicated services: `flotilla-network`,
`flotilla-storage` and `flotilla-scheduler` are each one `ServiceCommand`.

Each takes --config FILE (TOML, or YAML by its suffix; the service's table in it),
--amqp-url, --replica, --workers, --log-level, --database-url when it keeps a catalog, and
flags of its own. Every flag but --config and --log-level sets the setting of its name
(dashes as underscores) over the file and the environment (services/settings.py); --help
names every environment variable the settings read. `main` starts the replica, serves
until SIGTERM or SIGINT, then stops it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from services import log
from services.settings import ReplicaConfig

C = TypeVar("C", bound=ReplicaConfig)
# Flags that are not settings.
NOT_SETTINGS = ("config", "log_level")


class Runner(Protocol):
    def run_forever(self) -> None: ...


class Replica(Protocol):
    """A started service replica (NetworkServer, StorageServer, Scheduler)."""

    @property
    def runner(self) -> Runner: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Flag:
    """A service's own flag: `--top-n` sets the setting `top_n`."""

    name: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ServiceCommand(Generic[C]):
    """One service's program: its name, what it does (one or two sentences), its settings
    model, how a replica is made and started from them, and its own flags."""

    prog: str
    summary: str
    settings: type[C]
    start: Callable[[C], Replica]
    flags: Sequence[Flag] = ()
    database: bool = False  # takes --database-url (it keeps a catalog)
    workers_help: str = "commands handled at once"

    def parser(self) -> argparse.ArgumentParser:
        variables = ", ".join(dict.fromkeys(self.settings.environment().values()))
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=(
                f"{self.summary} Settings come from --config (TOML, or YAML by its suffix; "
                f"[{self.settings.TABLE}] table), then environment ({variables}), then flags."
            ),
        )
        parser.add_argument("--config", type=Path, help="TOML file")
        parser.add_argument(
            "--amqp-url", help="broker URL, or one per cluster node, comma-separated"
        )
        if self.database:
            parser.add_argument("--database-url", help="sqlite:////path.db or postgresql://…")
        parser.add_argument("--replica", help="this replica's name (default <host>-<pid>)")
        for flag in self.flags:
            own: dict[str, Any] = {"help": flag.help}
            if flag.type is not None:
                own["type"] = flag.type
            if flag.choices is not None:
                own["choices"] = flag.choices
            parser.add_argument(flag.name, **own)
        parser.add_argument("--workers", type=int, help=self.workers_help)
        parser.add_argument("--log-level", default=None, help="debug, info, warning (info)")
        return parser

    def load(self, args: argparse.Namespace) -> C:
        """The settings: file, environment, then the flags given."""
        flags = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
        return self.settings.load(args.config, **flags)

    def main(self, argv: Sequence[str] | None = None) -> int:
        args = self.parser().parse_args(sys.argv[1:] if argv is None else argv)
        log.configure(args.log_level)
        replica = self.start(self.load(args))
        try:
            replica.runner.run_forever()
        finally:
            replica.stop()
        return 0
