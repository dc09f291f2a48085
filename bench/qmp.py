"""Just enough QMP for the benchmarks that drive QEMU as their anchor: commands in order,
events skipped, an error reply ends the benchmark with QEMU's message."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path


class Qmp:
    def __init__(self, path: Path, *, who: str, timeout: float) -> None:
        self._who = who
        deadline = time.monotonic() + timeout
        self._sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self._file = self._sock.makefile("rwb")
        self._file.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> dict[str, object]:
        self._file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise SystemExit(f"{self._who}: QMP {name}: {reply['error']}")
            result: dict[str, object] = reply.get("return", {})
            return result

    def close(self) -> None:
        self._file.close()
        self._sock.close()
