"""Console capture and booted-machine handles for the KVM tests."""

from __future__ import annotations

import os
import re
import select
import threading
import time

import pytest

import native


class Console:
    """Collects a guest's COM1 output from a pipe on a thread; lets tests wait for lines."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        in_r, in_w = os.pipe()
        self.input_fd, self._input_w = in_r, in_w
        self._buf = bytearray()
        self._empty_checks = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                readable, _, _ = select.select([self.read_fd], [], [], 0.02)
                if not readable:
                    # Everything written so far has been appended: count it for drain().
                    with self._cond:
                        self._empty_checks += 1
                        self._cond.notify_all()
                    continue
                chunk = os.read(self.read_fd, 65536)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()

    def drain(self, timeout: float = 5.0) -> str:
        """The whole output written so far. A machine event can overtake the reader thread
        (the guest's last bytes may still sit in the pipe): this waits for the reader to find
        the pipe empty after the call began."""
        with self._cond:
            start = self._empty_checks
            self._cond.wait_for(lambda: self._empty_checks > start, timeout)
            return self._buf.decode(errors="replace")

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def send(self, data: bytes) -> None:
        os.write(self._input_w, data)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Waits for a regex to match the output; fails the test with the output if not."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern!r} within {timeout}s; console:\n{self.text}")
                self._cond.wait(left)

    def close(self) -> None:
        for fd in (self.write_fd, self.input_fd, self._input_w):
            os.close(fd)
        self._thread.join(timeout=5)
        os.close(self.read_fd)


class Booted:
    def __init__(self, machine: native.Machine, console: Console) -> None:
        self.machine = machine
        self.console = console

    def wait_end(self, kind: native.EventKind, timeout: float = 10.0) -> native.Event:
        """The machine's next event, which must be `kind`; the console is complete after it."""
        event = self.machine.wait_event(timeout)
        text = self.console.drain()
        assert event is not None, f"no event within {timeout}s; console:\n{text}"
        assert event.kind is kind, f"{event}; console:\n{text}"
        return event
