"""The VMM process's console: the pipes the UART writes to and reads from, a bounded ring of
recent output and a size-capped log file. Standard library only."""

from __future__ import annotations

import fcntl
import os

CONSOLE_LOG_MAX = 8 * 1024 * 1024


class ConsoleBuffer:
    """Guest console output: the pipe the UART writes to, an in-memory ring and the log file."""

    def __init__(self, ring_bytes: int, log_path: str | None) -> None:
        # Non-blocking write end: the UART drops (and counts) rather than stall a vCPU.
        self.out_r, self.out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.in_r, self.in_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self.out_w, fcntl.F_SETPIPE_SZ, 1024 * 1024)
        except OSError:
            pass  # the default 64 KiB still works; we drain it promptly
        self.ring = bytearray()
        self.ring_bytes = ring_bytes
        self.ring_lost = False
        self.log_path = log_path
        self.log_fd = -1
        self.log_size = 0
        if log_path is not None:
            self._open_log()

    def _open_log(self) -> None:
        assert self.log_path is not None
        self.log_fd = os.open(
            self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
        )
        self.log_size = os.fstat(self.log_fd).st_size

    def read(self) -> bytes:
        chunks = []
        for _ in range(16):
            try:
                chunk = os.read(self.out_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        if data:
            self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        self.ring += data
        excess = len(self.ring) - self.ring_bytes
        if excess > 0:
            del self.ring[:excess]
            self.ring_lost = True
        if self.log_fd < 0:
            return
        try:
            if self.log_size + len(data) > CONSOLE_LOG_MAX:
                os.close(self.log_fd)
                assert self.log_path is not None
                os.replace(self.log_path, self.log_path + ".1")  # noqa: PTH105
                self._open_log()
            os.write(self.log_fd, data)
            self.log_size += len(data)
        except OSError:
            pass  # a full disk costs log lines, never the guest

    def snapshot(self, max_bytes: int) -> tuple[bytes, bool]:
        data = bytes(self.ring[-max_bytes:]) if max_bytes > 0 else b""
        return data, self.ring_lost or len(data) < len(self.ring)
