"""pytest plugin for the hwvirt tier: tests marked `hwvirt` need vmx/svm (docs/testing.md).

Inside the L1 (FLOTILLA_HWVIRT_L1=1) and on hosts with vmx/svm it does nothing: the tests run
as usual. Elsewhere every selected `hwvirt` item is replaced by a stand-in that reports the
outcome of the real test from the pytest run of its group in a nested L1 (tests/hwvirt/l1.py):
the Linux guests in one, the control plane (`hwvirt_stack`) in another (FLOTILLA_HWVIRT_L1S
at a time, two by default: side by side), started when the first item is reached: passed,
skipped (with the L1's reason), failed or errored (with the L1's failure text and captured
output).
`-m "not hwvirt"` deselects the tier and starts nothing.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hwvirt.l1 import (
    L1_CRASH_RETRIES,
    L1_SILENT_S,
    LEAN_PLUGINS,
    L1Error,
    L1Result,
    default_timeout,
    run_in_l1,
    runs_directly,
    terminate_as_interrupt,
)

MARKER = "hwvirt"
STACK_MARKER = "hwvirt_stack"
PARALLEL_ENV = "FLOTILLA_HWVIRT_L1S"
OUTPUT_TAIL_LINES = 60


@dataclass(frozen=True)
class Outcome:
    """One test's result as the L1's JUnit XML recorded it."""

    kind: str  # passed, skipped, xfailed, failed
    message: str
    text: str


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) pytest's junitxml writes for a node id (its mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_junit(xml_text: str) -> dict[tuple[str, str], Outcome]:
    """Outcomes by (classname, name); a test with a failure and an error is failed."""
    outcomes: dict[tuple[str, str], Outcome] = {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        captured = "".join(
            f"\n--- {el.tag} ---\n{el.text}" for el in case if el.tag.startswith("system-")
        )
        bad = [el for el in case if el.tag in ("failure", "error")]
        skipped = case.find("skipped")
        if bad:
            text = "\n".join(f"[{el.tag}] {el.text or el.get('message', '')}" for el in bad)
            outcome = Outcome("failed", bad[0].get("message", ""), text + captured)
        elif skipped is not None:
            kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            outcome = Outcome(kind, skipped.get("message", ""), captured)
        else:
            outcome = Outcome("passed", "", captured)
        outcomes[key] = outcome
    return outcomes


class L1Session:
    """One L1 run for a group of the session's hwvirt items."""

    def __init__(self, config: pytest.Config, nodeids: list[str], *, broker: bool) -> None:
        self.config = config
        self.nodeids = nodeids
        self.broker = broker  # a host broker forwarded into the L1 (FLOTILLA_AMQP_URL)
        self.result: L1Result | None = None
        self.error: str | None = None
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.report: list[str] = []  # lines for the terminal once the run ended

    def run(self, cancel: threading.Event | None = None) -> None:
        """The run, on whichever thread; what it has to say goes to `report`."""
        try:
            timeout = default_timeout()
            with tempfile.TemporaryDirectory(prefix="flotilla-hwvirt-") as tmp:
                run_dir = Path(tmp)
                junit = run_dir / "junit.xml"
                argv = [
                    sys.executable,
                    "-m",
                    "pytest",
                    *LEAN_PLUGINS,
                    f"--junitxml={junit}",
                    "-o",
                    "junit_logging=all",
                    "-v",  # each test named as it ends: a stuck one is the next
                    *self.nodeids,
                ]
                cwd = Path(str(self.config.rootpath))
                self.result = run_in_l1(
                    argv,
                    run_dir,
                    cwd=cwd,
                    timeout=timeout,
                    broker=self.broker,
                    retries=L1_CRASH_RETRIES,
                    cancel=cancel,
                )
                if junit.is_file():
                    self.outcomes = parse_junit(junit.read_text())
        except (L1Error, ET.ParseError) as exc:
            self.error = f"the hwvirt L1 could not run: {exc}"
            self.report.append(f"hwvirt: {self.error}")
            return
        except Exception as exc:  # a bug here must fail these tests, not hang the others
            self.error = f"the hwvirt L1 run failed: {exc!r}"
            self.report.append(f"hwvirt: {self.error}")
            return
        r = self.result
        label = f"{len(self.nodeids)} test(s)"
        for n, crash in enumerate(r.crashes, 1):
            self.report.append(f"hwvirt: {label}, run {n}: {crash}")
        self.report.append(
            f"hwvirt: {label}: L1 run {len(r.crashes) + 1} ended in {r.seconds:.0f} s, pytest "
            f"status {r.status}" + (" (timed out)" if r.timed_out else "") + f"; its pulse's "
            f"longest silence {r.longest_silence:.1f} s (the bound: {L1_SILENT_S:.0f} s)"
            + (f"; woken by a key press {r.woken} time(s)" if r.woken else "")
        )

    def outcome(self, nodeid: str) -> Outcome:
        if self.error is not None:
            return Outcome("failed", self.error, self.error)
        found = self.outcomes.get(junit_key(nodeid))
        if found is not None:
            return found
        r = self.result
        if r is None:
            return Outcome("failed", "the L1 run never ended", "the L1 run never ended")
        why = "timed out" if r.timed_out else f"ended with status {r.status}"
        output = "\n".join(r.output.splitlines()[-OUTPUT_TAIL_LINES:])
        text = (
            f"{nodeid} has no result from the L1 run, which {why} after {r.seconds:.0f} s.\n"
            f"--- pytest output in the L1 (tail) ---\n{output}\n"
            f"--- L1 console (tail) ---\n{r.console_tail()}"
        )
        return Outcome("failed", f"no result from the L1 ({why})", text)


def l1_groups(items: list[pytest.Item]) -> list[list[pytest.Item]]:
    """The hwvirt items in the L1 runs they share: the control plane (`hwvirt_stack`, most
    of its time spent starting services on the L1's one vCPU) apart from the Linux guests,
    so the two can run side by side; each group in collection order."""
    stack = [item for item in items if item.get_closest_marker(STACK_MARKER) is not None]
    guests = [item for item in items if item.get_closest_marker(STACK_MARKER) is None]
    return [group for group in (guests, stack) if group]


def parallel_l1s() -> int:
    """How many L1s run at once: two by default, the groups side by side (3.4-5.7 minutes
    on the 2-core host), FLOTILLA_HWVIRT_L1S=1 one after the other (7-8). In December the
    Linux guests' fleet stood still in two of three clean-clone CI runs side by side (its
    4-vCPU guest silent, every vCPU halted: docs/testing.md) and the default was one; in the
    seven runs side by side since, a clean-clone CI among them, none did, and a fleet that
    stands still now reports its guests' vCPUs and devices (tests/hwvirt/stall.py)."""
    raw = os.environ.get(PARALLEL_ENV, "2")
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{PARALLEL_ENV} must be a positive integer, not {raw!r}")
    return int(raw)


class L1Tier:
    """The session's L1 runs, started together when the first hwvirt item runs: each on a
    thread of its own, at most `parallel_l1s()` at a time. A Ctrl-C or SIGTERM cancels them
    all, and returns once every QEMU, virtiofsd and broker they started has ended."""

    def __init__(self, config: pytest.Config, sessions: list[L1Session]) -> None:
        self.config = config
        self.sessions = sessions
        self.done = False

    def _say(self, line: str) -> None:  # to the terminal, past the item's output capture
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        width = min(parallel_l1s(), len(self.sessions))
        tests = sum(len(s.nodeids) for s in self.sessions)
        self._say(
            f"\nhwvirt: running {tests} test(s) in {len(self.sessions)} nested L1 run(s) "
            f"(QEMU TCG), {width} at a time"
        )
        cancel = threading.Event()
        slots = threading.Semaphore(width)
        # Each run's own "ended", not Thread.join: a join that a KeyboardInterrupt (a
        # SIGTERM, here) cuts short may mark a live thread stopped (CPython 3.11's
        # _wait_for_tstate_lock releases the lock the thread holds), and every later join
        # then returns at once, while its L1 still runs.
        runs: list[tuple[threading.Thread, threading.Event]] = []

        def one(session: L1Session, done: threading.Event) -> None:
            try:
                with slots:
                    if not cancel.is_set():
                        session.run(cancel)
            finally:
                done.set()

        for n, session in enumerate(self.sessions):
            done = threading.Event()
            thread = threading.Thread(
                target=one, args=(session, done), name=f"hwvirt-l1-{n}", daemon=True
            )
            runs.append((thread, done))
        with terminate_as_interrupt():
            try:
                for thread, _ in runs:
                    thread.start()
                for _, done in runs:
                    while not done.wait(0.5):
                        pass
            except BaseException:
                cancel.set()
                # A second Ctrl-C must not leave an L1 running: wait for them all.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    for thread, done in runs:
                        # Not yet in `one` (never started, or only now starting): the
                        # cancel keeps it off its L1.
                        while not done.wait(0.5) and thread.is_alive():
                            pass
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
                raise
        for session in self.sessions:
            for line in session.report:
                self._say(line)

    def outcome(self, session: L1Session, nodeid: str) -> Outcome:
        self.run()
        return session.outcome(nodeid)


class HwvirtFailure(Exception):
    """A test failed in the L1; the message is the L1's report of it."""


class L1Item(pytest.Item):
    """Stands in on the host for a hwvirt test and reports its outcome from the L1."""

    def __init__(
        self, *, original: pytest.Item, tier: L1Tier, l1: L1Session, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.tier = tier
        self.l1 = l1
        self.own_markers.extend(original.own_markers)
        # Only the first item waits for the L1; let it.
        self.add_marker(pytest.mark.timeout(default_timeout() + 120))

    def runtest(self) -> None:
        outcome = self.tier.outcome(self.l1, self.original.nodeid)
        if outcome.kind == "skipped":
            pytest.skip(f"in the L1: {outcome.message}")
        if outcome.kind == "xfailed":
            pytest.xfail(f"in the L1: {outcome.message}")
        if outcome.kind == "failed":
            raise HwvirtFailure(outcome.text)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        if isinstance(excinfo.value, HwvirtFailure):
            return f"failed in the hwvirt L1:\n{excinfo.value}"
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if runs_directly() or config.option.collectonly:
        return
    hwvirt = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if not hwvirt:
        return
    session_of: dict[str, L1Session] = {}
    sessions = []
    for group in l1_groups(hwvirt):
        # Tests that need a broker (marked integration) get one on the host, forwarded.
        broker = any(item.get_closest_marker("integration") is not None for item in group)
        session = L1Session(config, [item.nodeid for item in group], broker=broker)
        sessions.append(session)
        session_of.update((item.nodeid, session) for item in group)
    tier = L1Tier(config, sessions)
    for i, item in enumerate(items):
        if item.get_closest_marker(MARKER) is not None and item.parent is not None:
            items[i] = L1Item.from_parent(
                item.parent, name=item.name, original=item, tier=tier, l1=session_of[item.nodeid]
            )
