"""Run a pytest selection (or, with --exec, any command) where hardware virtualization is.

    python -m tests.hwvirt [--timeout S] [--junitxml PATH] -- tests/kvm/test_linux.py -x
    python -m tests.hwvirt --exec -- python bench/linux.py

On a host without vmx/svm it boots a nested L1 under QEMU TCG (tests/hwvirt/l1.py), runs the
command there with the output streamed here, and copies the JUnit XML back; on a host with
vmx/svm, and inside the L1, it runs the command directly. The exit status is the command's;
124 when the L1 run timed out, 125 when the L1 ended without the command finishing, 2 when
the L1 could not be started (the message says why).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.hwvirt.l1 import (
    L1_CRASH_RETRIES,
    LEAN_PLUGINS,
    L1Error,
    default_timeout,
    run_in_l1,
    runs_directly,
)

TIMED_OUT = 124
L1_DIED = 125
NOT_STARTED = 2


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.hwvirt", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--timeout", type=float, help="seconds for the whole L1 run")
    parser.add_argument(
        "--junitxml",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"flotilla-hwvirt-junit-{os.getpid()}.xml",
        help="where the pytest run's JUnit XML is copied (default: a file of this run's own "
        "under TMPDIR, so runs side by side do not overwrite each other's)",
    )
    parser.add_argument(
        "--exec", action="store_true", help="ARGS are a command, not pytest arguments"
    )
    parser.add_argument(
        "--all-plugins",
        action="store_true",
        help="keep hypothesis, anyio and the cache provider (left out by default: slow in L1)",
    )
    parser.add_argument(
        "--broker",
        action=argparse.BooleanOptionalAction,
        help="run a RabbitMQ node on the host for the L1 (FLOTILLA_AMQP_URL there); "
        "default: on for pytest, off with --exec",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=L1_CRASH_RETRIES,
        help="run the command again in a fresh L1 when the L1 dies under it (its kernel "
        "panics, it resets, or its pulse stops), up to this many times within --timeout "
        f"(default {L1_CRASH_RETRIES})",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="pytest arguments (after --)")
    ns = parser.parse_args(argv)
    if ns.args[:1] == ["--"]:
        ns.args = ns.args[1:]
    if ns.exec and not ns.args:
        parser.error("--exec needs a command")
    if ns.timeout is not None and ns.timeout <= 0:
        parser.error("--timeout must be positive")
    if ns.retries < 0:
        parser.error("--retries cannot be negative")
    return ns


def command(ns: argparse.Namespace, junit: Path | None) -> list[str]:
    if ns.exec:
        return list(ns.args)
    extra = [f"--junitxml={junit}"] if junit is not None else []
    # Never a .pytest_cache written into the checkout from the L1.
    plugins = ["-p", "no:cacheprovider"] if ns.all_plugins else list(LEAN_PLUGINS)
    return [sys.executable, "-m", "pytest", *plugins, *extra, *ns.args]


def main(argv: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if argv is None else argv)
    junit: Path | None = None if ns.exec else ns.junitxml.resolve()
    if runs_directly():
        return subprocess.call(command(ns, junit))
    try:
        timeout = default_timeout() if ns.timeout is None else ns.timeout
        with tempfile.TemporaryDirectory(prefix="flotilla-hwvirt-") as tmp:
            run_dir = Path(tmp)
            inner_junit = None if junit is None else run_dir / "junit.xml"
            result = run_in_l1(
                command(ns, inner_junit),
                run_dir,
                timeout=timeout,
                echo=sys.stdout,
                broker=not ns.exec if ns.broker is None else ns.broker,
                retries=ns.retries,
            )
            if junit is not None and inner_junit is not None and inner_junit.is_file():
                shutil.copyfile(inner_junit, junit)
                print(f"hwvirt: JUnit XML in {junit}")
    except L1Error as exc:
        print(f"hwvirt: {exc}", file=sys.stderr)
        return NOT_STARTED
    crashed = f" (after {len(result.crashes)} L1 death(s))" if result.crashes else ""
    print(
        f"hwvirt: L1 run took {result.seconds:.1f} s{crashed}; its pulse's longest silence "
        f"{result.longest_silence:.1f} s"
    )
    if result.status is not None:
        return result.status
    why = f"timed out after {timeout:.0f} s" if result.timed_out else "ended early"
    print(f"hwvirt: the L1 {why}; its console ends with:\n{result.console_tail()}")
    return TIMED_OUT if result.timed_out else L1_DIED


if __name__ == "__main__":
    sys.exit(main())
