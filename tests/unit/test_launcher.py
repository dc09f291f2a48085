"""The stack's fork server (services/launcher.py): a real server process forking real
children, each checked from inside (what it was given and inherited) and from outside (its
exit status as the server reports it)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.launcher import Launcher, LauncherError, Request

CHILD = "tests.unit.launcher_child"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    server = Launcher(dict(os.environ), tmp_path / "launcher.log", preload=[CHILD])
    try:
        yield server
    finally:
        server.close()


def _status(launcher: Launcher, pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (status := launcher.status(pid)) is None:
        assert time.monotonic() < deadline, f"no exit report for {pid}"
        time.sleep(0.02)
    return status


def _report(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_a_child_runs_main_with_its_argv_env_cwd_log_and_session(
    launcher: Launcher, tmp_path: Path
) -> None:
    report, log = tmp_path / "report.json", tmp_path / "child.log"
    env = {"ONLY": "this", "PATH": os.environ.get("PATH", "/usr/bin")}
    pid = launcher.spawn(
        CHILD, [str(report), "return", "7"], env, log, cwd=str(tmp_path), name="flotilla-test"
    )
    assert _status(launcher, pid) == 7
    got = _report(report)
    assert got["pid"] == pid
    assert got["argv"] == got["sys_argv"] == [str(report), "return", "7"]
    assert got["env"] == env  # exactly what it was given, nothing of the server's
    assert got["cwd"] == str(tmp_path)
    assert got["sid"] == pid  # a session of its own: a terminal's Ctrl-C is not for it
    assert got["stdin"] == "/dev/null"
    assert got["comm"] == "flotilla-test"
    assert got["sigterm_default"]
    assert got["sigint_python"]  # not the server's SIG_IGN: as `python -m` would have it
    # 0-2, and the one fd listing /proc/self/fd: none of the server's pipes or epoll.
    assert len(got["fds"]) == 4, got["fds"]
    assert got["fds"][:3] == [0, 1, 2]
    assert log.read_text().splitlines() == ["to stdout", "to stderr"]


def test_exit_statuses_as_the_server_reports_them(launcher: Launcher, tmp_path: Path) -> None:
    pids = {
        action: launcher.spawn(
            CHILD, [str(tmp_path / f"{action}.json"), action, "3"], {}, tmp_path / "x.log"
        )
        for action in ("exit", "raise", "sleep")
    }
    _report(tmp_path / "sleep.json")
    os.kill(pids["sleep"], signal.SIGTERM)
    assert _status(launcher, pids["exit"]) == 3
    assert _status(launcher, pids["raise"]) == 1
    assert _status(launcher, pids["sleep"]) == -signal.SIGTERM
    assert "the child's own error" in (tmp_path / "x.log").read_text()


def test_a_child_ends_as_an_interpreter_does_its_threads_first(
    launcher: Launcher, tmp_path: Path
) -> None:
    pid = launcher.spawn(CHILD, [str(tmp_path / "r.json"), "thread", "5"], {}, tmp_path / "x.log")
    assert _status(launcher, pid) == 5
    assert (tmp_path / "late").read_text() == "done"


def test_what_an_import_prints_does_not_break_the_answers(tmp_path: Path) -> None:
    server = Launcher(
        dict(os.environ), tmp_path / "launcher.log", preload=["tests.unit.launcher_noisy", CHILD]
    )
    try:
        pid = server.spawn(CHILD, [str(tmp_path / "r.json"), "return"], {}, tmp_path / "x.log")
        assert _status(server, pid) == 0
    finally:
        server.close()
    assert "a word on stdout at import" in (tmp_path / "launcher.log").read_text()


def test_a_bad_request_is_refused_and_the_server_serves_on(
    launcher: Launcher, tmp_path: Path
) -> None:
    with pytest.raises(LauncherError, match="No module named"):
        launcher.spawn("no_such_module_here", [], {}, tmp_path / "x.log")
    pid = launcher.spawn(CHILD, [str(tmp_path / "r.json"), "return"], {}, tmp_path / "y.log")
    assert _status(launcher, pid) == 0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "JSON object"),
        ({"argv": [], "log": "/x"}, "module"),
        ({"module": "m", "argv": "a b", "log": "/x"}, "argv"),
        ({"module": "m", "env": {"A": 1}, "log": "/x"}, "env"),
        ({"module": "m"}, "log"),
        ({"module": "m", "log": "/x", "name": ""}, "name"),
    ],
)
def test_requests_are_checked_field_by_field(raw: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Request.parse(raw)


def test_children_outlive_a_closed_server(launcher: Launcher, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    pid = launcher.spawn(CHILD, [str(report), "sleep"], {}, tmp_path / "x.log")
    _report(report)
    launcher.close()
    try:
        os.kill(pid, 0)  # still there: `flotilla up` ends its services by pid, in order
    finally:
        os.kill(pid, signal.SIGKILL)
