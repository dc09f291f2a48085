"""A service process for the graceful-stop test.

`python -m tests.integration.service_proc URL QUEUE`. Its GetDomainInfo handler sleeps 1.5 s,
so a SIGTERM arrives while it works."""

from __future__ import annotations

import sys
import time

from protos.commands import GetDomainInfo
from protos.domain import PowerState
from protos.replies import DomainInfo
from services import log
from services.bus import Bus, Context, Service, ServiceRunner, handles


class Slow(Service):
    name = "slow"

    @handles(GetDomainInfo)
    def info(self, cmd: GetDomainInfo, ctx: Context) -> DomainInfo:
        print("handling", flush=True)
        time.sleep(1.5)
        return DomainInfo(
            domain_id=cmd.domain_id,
            name="slow",
            host="h",
            state=PowerState.RUNNING,
            vcpus=1,
            memory_mib=64,
            seq=1,
        )


def main() -> None:
    log.configure(json=True)
    url, queue = sys.argv[1], sys.argv[2]
    with Bus(url, source="slow") as bus:
        runner = ServiceRunner(bus, Slow(), queue=queue).start()
        print("ready", flush=True)
        runner.run_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
