"""A FakeDriver compute node in a process of its own whose starts hold while
`<state dir>/hold` exists (each writes `<state dir>/spawning` first), so a test can kill it
(-9) in the middle of a start at a moment it knows.

`python -m tests.integration.held_compute --host H --state-dir D --amqp-url URL`
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from compute_node.boot_sources import BootFiles
from compute_node.config import ComputeConfig
from compute_node.driver import NicTap, RuntimeInfo
from compute_node.fake import FakeDriver
from compute_node.main import build_parser
from compute_node.node import ComputeNode
from protos.domain import DomainSpec
from services import log


class HeldStart(FakeDriver):
    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = state_dir

    def spawn(
        self,
        spec: DomainSpec,
        files: BootFiles,
        *,
        paused: bool = False,
        nics: Sequence[NicTap] = (),
    ) -> RuntimeInfo:
        (self.state_dir / "spawning").write_text(str(spec.uuid))
        while (self.state_dir / "hold").exists():
            time.sleep(0.02)
        return super().spawn(spec, files, paused=paused, nics=nics)


def main() -> int:
    args = build_parser().parse_args(sys.argv[1:])
    log.configure(args.log_level)
    config = ComputeConfig.load(
        None, host=args.host, state_dir=args.state_dir, amqp_url=args.amqp_url, driver="fake"
    )
    node = ComputeNode(config, HeldStart(config.state_dir)).start()
    try:
        node.runner.run_forever()
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
