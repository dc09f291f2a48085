"""The hwvirt harness's host-side pieces (tests/hwvirt/): no L1, no KVM."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pika
import pytest

from tests.hwvirt.__main__ import parse
from tests.hwvirt.l1 import (
    CPUS_ENV,
    HOST_ALIAS,
    INSIDE_ENV,
    RELAY,
    L1Error,
    L1Result,
    default_cpus,
    default_timeout,
    host_has_hardware_virtualization,
    l1_amqp_url,
    l1_environment,
    qemu_argv,
    run_script,
)
from tests.hwvirt.plugin import PARALLEL_ENV, junit_key, l1_groups, parallel_l1s, parse_junit

SAMPLE = """
import pytest

def test_passes():
    pass

def test_fails():
    print("said before failing")
    assert 1 == 2, "one is not two"

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1

class TestGroup:
    def test_skips(self):
        pytest.skip("not here")

    @pytest.mark.xfail(reason="known")
    def test_xfails(self):
        assert False

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_errors(broken):
    pass
"""


def test_junit_outcomes_map_back_to_node_ids(tmp_path: Path) -> None:
    pkg = tmp_path / "sub"
    pkg.mkdir()
    (pkg / "test_sample.py").write_text(SAMPLE)
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_logging=all",
            f"--junitxml={junit}",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            "sub/test_sample.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    outcomes = parse_junit(junit.read_text())
    f = "sub/test_sample.py::"
    kinds = {
        nodeid: outcomes[junit_key(f + nodeid)].kind
        for nodeid in (
            "test_passes",
            "test_fails",
            "test_param[1]",
            "test_param[2]",
            "TestGroup::test_skips",
            "TestGroup::test_xfails",
            "test_errors",
        )
    }
    assert kinds == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_param[1]": "passed",
        "test_param[2]": "failed",
        "TestGroup::test_skips": "skipped",
        "TestGroup::test_xfails": "xfailed",
        "test_errors": "failed",
    }
    failed = outcomes[junit_key(f + "test_fails")]
    assert "one is not two" in failed.text
    assert "said before failing" in failed.text
    assert "fixture broke" in outcomes[junit_key(f + "test_errors")].text
    assert outcomes[junit_key(f + "TestGroup::test_skips")].message.endswith("not here")


def test_cpuinfo_flags_decide_hardware_virtualization(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme sse2 lm\n\nflags\t\t: fpu lm\n")
    assert not host_has_hardware_virtualization(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu svm lm\n")
    assert host_has_hardware_virtualization(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu vmx lm\nbugs\t\t: svm_lookalike\n")
    assert host_has_hardware_virtualization(cpuinfo)
    assert not host_has_hardware_virtualization(tmp_path / "absent")


def test_l1_environment_keeps_settings_but_no_host_urls(tmp_path: Path) -> None:
    env = l1_environment(
        {
            "PATH": "/usr/bin:/bin",
            "FLOTILLA_TEST_GUEST": "/x/guest.elf",
            "FLOTILLA_AMQP_URL": "amqp://host:5672/",
            "FLOTILLA_TEST_PG_URL": "postgresql://host/db",
            "SSH_AUTH_SOCK": "/run/ssh",
            "TMPDIR": "/host/tmp",
            "LANG": "C.UTF-8",
        },
        tmp_path,
    )
    assert env["FLOTILLA_TEST_GUEST"] == "/x/guest.elf"
    assert env["LANG"] == "C.UTF-8"
    assert "FLOTILLA_AMQP_URL" not in env
    assert "FLOTILLA_TEST_PG_URL" not in env
    assert "SSH_AUTH_SOCK" not in env
    assert env["TMPDIR"] == str(tmp_path / "tmp")
    assert env["HOME"].startswith(env["TMPDIR"])
    assert env[INSIDE_ENV] == "1"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_run_script_records_output_and_status(tmp_path: Path) -> None:
    """The script the L1's init runs, run here by sh: quoting survives, status is last."""
    (tmp_path / "tmp").mkdir()
    env = {"TMPDIR": str(tmp_path / "tmp"), "HOME": str(tmp_path / "tmp/home"), "X": "a 'b' $c"}
    argv = ["sh", "-c", 'echo "$X"; echo to-stderr >&2; pwd; exit 3']
    script = run_script(argv, tmp_path, env, tmp_path)
    subprocess.run(["sh", "-c", script], check=True, env={"PATH": "/usr/bin:/bin"})
    assert (tmp_path / "status").read_text().strip() == "3"
    assert (tmp_path / "output").read_text().splitlines() == [
        "a 'b' $c",
        "to-stderr",
        str(tmp_path),
    ]
    assert (tmp_path / "tmp" / "home").is_dir()


def test_only_the_l1_dying_under_the_command_counts_as_an_l1_crash() -> None:
    running = "flotilla-l1: running /tmp/flotilla-hwvirt-x/run.sh\n"
    panic = "[  91.2] Kernel panic - not syncing: corrupted stack end detected inside scheduler"

    def result(status: int | None, console: str, *, timed_out: bool = False) -> L1Result:
        return L1Result(status, timed_out, 1.0, output="", console=console)

    panicked = result(None, f"{running}{panic}\n")
    assert panicked.l1_crashed
    assert panicked.l1_panicked
    # A reset without a word (QEMU's -no-reboot ends it): a crash, not a panic.
    silent = result(None, f"{running}[ 69.1] kvm [201]: vcpu0, Unhandled WRMSR(0xc0010007)\n")
    assert silent.l1_crashed
    assert not silent.l1_panicked
    # Frozen (no pulse): ended by the harness, and dead as a panicked one is.
    frozen = result(None, f"{running}[harness] the L1 stopped: no pulse for 121 s; ended\n")
    assert frozen.l1_crashed
    assert frozen.how_the_l1_died == "it stopped: no pulse"
    # The command finished (its status written): whatever the console says after it.
    assert not result(1, f"{running}{panic}\n").l1_crashed
    # Timed out: the bound, not a crash.
    assert not result(None, f"{running}{panic}", timed_out=True).l1_crashed
    # The L1's init gave up before the command: the rig's set-up, not worth running again.
    assert not result(None, "flotilla-l1: cannot mount the virtiofs tag host\n").l1_crashed
    # An L2 guest's panic is in the command's output, never on the L1's console; and a
    # command that fails has a status.
    l2 = L1Result(1, False, 1.0, output=panic, console=f"{running}flotilla-l1: done: 1\n")
    assert not l2.l1_crashed


def test_a_console_tail_keeps_the_head_of_the_l1_kernels_first_report() -> None:
    stack = [f"[ 70.1]  frame{i}+0x1/0x2" for i in range(60)]
    console = "\n".join(
        ["flotilla-l1: running /x/run.sh", "[ 69.9] BUG: scheduling while atomic", *stack]
    )
    tail = L1Result(None, False, 1.0, output="", console=console).console_tail(10)
    lines = tail.splitlines()
    assert lines[1] == "[ 69.9] BUG: scheduling while atomic"
    assert "[...]" in lines
    assert lines[-1] == stack[-1]
    # Nothing reported: the tail alone. The boot line every L1 prints is no report.
    srso = "[ 0.6] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/"
    booted = "\n".join([srso, *stack])
    quiet = L1Result(None, False, 1.0, output="", console=booted).console_tail(10)
    assert quiet.splitlines() == stack[-10:]
    # A report just before the tail: its head stops where the tail begins (no line twice).
    late = "\n".join([*stack[:49], "[ 70.0] WARNING: CPU: 1 PID: 7 at x", *stack[49:]])
    reported = L1Result(None, False, 1.0, output="", console=late).console_tail(10).splitlines()
    assert len(reported) == len(set(reported))
    assert "[ 70.0] WARNING: CPU: 1 PID: 7 at x" in reported


def test_the_l1_cpu_count_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPUS_ENV, raising=False)
    assert default_cpus() == 1
    monkeypatch.setenv(CPUS_ENV, "2")
    assert default_cpus() == 2
    for bad in ("0", "9", "two", ""):
        monkeypatch.setenv(CPUS_ENV, bad)
        with pytest.raises(L1Error, match=CPUS_ENV):
            default_cpus()


def test_qemu_command_names_the_run_dir_and_bounds_nothing_else(tmp_path: Path) -> None:
    argv = qemu_argv(Path("/k"), Path("/i"), tmp_path, 4096, 2)
    assert argv[argv.index("-cpu") + 1] == "EPYC"
    assert f"flotilla.run={tmp_path}" in argv[argv.index("-append") + 1]
    assert "-no-reboot" in argv
    assert "memory-backend-memfd,id=mem,size=4096M,share=on" in argv


def test_timeout_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_HWVIRT_TIMEOUT", "90")
    assert default_timeout() == 90
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("FLOTILLA_HWVIRT_TIMEOUT", bad)
        with pytest.raises(L1Error, match="FLOTILLA_HWVIRT_TIMEOUT"):
            default_timeout()


def test_command_line_takes_pytest_args_after_double_dash() -> None:
    ns = parse(["--timeout", "60", "--", "tests/kvm/test_linux.py", "-x"])
    assert ns.args == ["tests/kvm/test_linux.py", "-x"]
    assert ns.timeout == 60
    assert not ns.exec
    with pytest.raises(SystemExit):
        parse(["--exec"])
    with pytest.raises(SystemExit):
        parse(["--timeout", "0", "--", "x"])


def test_forwarded_ports_only_reach_the_hosts_loopback(tmp_path: Path) -> None:
    argv = qemu_argv(Path("/k"), Path("/i"), tmp_path, 4096, 2, forwards=[5672])
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("user,id=net0,restrict=on,")
    assert f"guestfwd=tcp:{HOST_ALIAS}:5672-cmd:" in netdev
    assert netdev.endswith(f"{RELAY} 5672")
    assert "-netdev" not in qemu_argv(Path("/k"), Path("/i"), tmp_path, 4096, 2)


def test_relay_carries_one_connection_both_ways_to_a_loopback_port() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo_upper() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    thread = threading.Thread(target=echo_upper, daemon=True)
    thread.start()
    payload = b"amqp frames " * 20000  # larger than one pipe buffer
    done = subprocess.run(
        [sys.executable, "-S", str(RELAY), str(port)],
        input=payload,
        capture_output=True,
        timeout=30,
        check=False,
    )
    server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload.upper()


def test_the_l1_reaches_the_host_broker_with_long_amqp_timeouts() -> None:
    # Python in a loaded L1 needed more than pika's 15 s for a handshake.
    params = pika.URLParameters(l1_amqp_url("amqp://u:p@127.0.0.1:5672/%2F"))
    assert (params.host, params.port, params.virtual_host) == (HOST_ALIAS, 5672, "/")
    assert (params.heartbeat, params.socket_timeout, params.stack_timeout) == (600, 120, 300)


class _Item:
    def __init__(self, name: str, *markers: str) -> None:
        self.name = name
        self.markers = markers

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def test_the_control_plane_runs_in_an_l1_apart_from_the_linux_guests() -> None:
    items = [
        _Item("a", "hwvirt"),
        _Item("up1", "hwvirt", "hwvirt_stack"),
        _Item("b", "hwvirt"),
        _Item("up2", "hwvirt", "hwvirt_stack"),
    ]
    groups = l1_groups(items)  # type: ignore[arg-type]
    assert [[i.name for i in g] for g in groups] == [["a", "b"], ["up1", "up2"]]
    assert len(l1_groups(items[:1])) == 1  # type: ignore[arg-type]
    assert len(l1_groups(items[1:2])) == 1  # type: ignore[arg-type]


def test_how_many_l1s_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    assert parallel_l1s() == 2  # side by side unless asked
    monkeypatch.setenv(PARALLEL_ENV, "1")
    assert parallel_l1s() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(PARALLEL_ENV, bad)
        with pytest.raises(pytest.UsageError, match=PARALLEL_ENV):
            parallel_l1s()
