"""pytest plugin for the hwvirt tier: tests marked `hwvirt` need vmx/svm (docs/testing.md).

Inside the L1 (FLOTILLA_HWVIRT_L1=1) and on hosts with vmx/svm it does nothing: the tests run
as usual. Elsewhere every selected `hwvirt` item is replaced by a stand-in that reports the
outcome of the real test from ONE pytest run in ONE nested L1 (tests/hwvirt/l1.py), started
when the first of them is reached: passed, skipped (with the L1's reason), failed or errored
(with the L1's failure text and captured output). `-m "not hwvirt"` deselects the tier and
starts nothing.
"""

from __future__ import annotations

import re
import sys
import tempfile
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
)

MARKER = "hwvirt"
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
    """The one L1 run for all of a session's hwvirt items, started on first use."""

    def __init__(self, config: pytest.Config, nodeids: list[str], *, broker: bool) -> None:
        self.config = config
        self.nodeids = nodeids
        self.broker = broker  # a host broker forwarded into the L1 (FLOTILLA_AMQP_URL)
        self.result: L1Result | None = None
        self.error: str | None = None
        self.outcomes: dict[tuple[str, str], Outcome] = {}

    def run(self) -> None:
        if self.result is not None or self.error is not None:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")

        def say(line: str) -> None:  # to the terminal, past the item's output capture
            if reporter is None or capture is None:
                print(line)
                return
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)

        say(f"\nhwvirt: running {len(self.nodeids)} test(s) in a nested L1 (QEMU TCG)")
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
                )
                if junit.is_file():
                    self.outcomes = parse_junit(junit.read_text())
        except (L1Error, ET.ParseError) as exc:
            self.error = f"the hwvirt L1 could not run: {exc}"
            say(f"hwvirt: {self.error}")
            return
        r = self.result
        for n, crash in enumerate(r.crashes, 1):
            say(f"hwvirt: run {n}: {crash}")
        say(
            f"hwvirt: L1 run {len(r.crashes) + 1} ended in {r.seconds:.0f} s, pytest status "
            f"{r.status}" + (" (timed out)" if r.timed_out else "") + f"; its pulse's longest "
            f"silence {r.longest_silence:.1f} s (the bound: {L1_SILENT_S:.0f} s)"
        )

    def outcome(self, nodeid: str) -> Outcome:
        self.run()
        if self.error is not None:
            return Outcome("failed", self.error, self.error)
        found = self.outcomes.get(junit_key(nodeid))
        if found is not None:
            return found
        r = self.result
        assert r is not None
        why = "timed out" if r.timed_out else f"ended with status {r.status}"
        output = "\n".join(r.output.splitlines()[-OUTPUT_TAIL_LINES:])
        text = (
            f"{nodeid} has no result from the L1 run, which {why} after {r.seconds:.0f} s.\n"
            f"--- pytest output in the L1 (tail) ---\n{output}\n"
            f"--- L1 console (tail) ---\n{r.console_tail()}"
        )
        return Outcome("failed", f"no result from the L1 ({why})", text)


class HwvirtFailure(Exception):
    """A test failed in the L1; the message is the L1's report of it."""


class L1Item(pytest.Item):
    """Stands in on the host for a hwvirt test and reports its outcome from the L1."""

    def __init__(self, *, original: pytest.Item, l1: L1Session, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.l1 = l1
        self.own_markers.extend(original.own_markers)
        # Only the first item waits for the L1; let it.
        self.add_marker(pytest.mark.timeout(default_timeout() + 120))

    def runtest(self) -> None:
        outcome = self.l1.outcome(self.original.nodeid)
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
    # Tests that need a broker (marked integration) get one on the host, forwarded.
    broker = any(item.get_closest_marker("integration") is not None for item in hwvirt)
    l1 = L1Session(config, [item.nodeid for item in hwvirt], broker=broker)
    for i, item in enumerate(items):
        if item.get_closest_marker(MARKER) is not None and item.parent is not None:
            items[i] = L1Item.from_parent(item.parent, name=item.name, original=item, l1=l1)
