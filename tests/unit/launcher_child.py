"""A `main(argv)` for tests/unit/test_launcher.py to fork: reports what it was given and what
it inherited to the file named by its first argument, then does what the second says."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    report, action = Path(argv[0]), argv[1]
    report.write_text(
        json.dumps(
            {
                "argv": argv,
                "sys_argv": sys.argv[1:],
                "env": dict(os.environ),
                "cwd": str(Path.cwd()),
                "pid": os.getpid(),
                "sid": os.getsid(0),
                "fds": sorted(int(fd.name) for fd in Path("/proc/self/fd").iterdir()),
                "stdin": str(Path("/proc/self/fd/0").readlink()),
                "comm": Path("/proc/self/comm").read_text().strip(),
                "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "sigint_python": signal.getsignal(signal.SIGINT) == signal.default_int_handler,
            }
        )
    )
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if action == "sleep":
        time.sleep(60)
    if action == "thread":
        # A non-daemon thread still working when main returns: the exit waits for it.
        def late() -> None:
            time.sleep(0.3)
            (report.parent / "late").write_text("done")

        threading.Thread(target=late).start()
    if action == "raise":
        raise RuntimeError("the child's own error")
    if action == "exit":
        sys.exit(int(argv[2]))
    return int(argv[2]) if len(argv) > 2 else 0
