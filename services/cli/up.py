"""`flotilla up`: the whole of Flotilla on this host until Ctrl-C (or SIGTERM).

A private RabbitMQ node (unless FLOTILLA_AMQP_URL names a broker; --broker-nodes N clusters N
of them on loopback and gives every child the URL list), the API, the scheduler and one compute
node, as child processes logging to <state dir>/logs/. Once all are ready it writes
the API URL and an admin token to <state dir>/cli.json (where the other verbs look for them)
and prints both. On Ctrl-C it deletes every guest through the API — this is the all-in-one
demo, so nothing outlives it — unless --keep-guests, in which case guests keep running and the
next `flotilla up` on the same state dir re-adopts them; then it stops the children by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from services.cli.children import StackError
from services.cli.client import Exit
from services.cli.stack import (
    ComputeSpec,
    Stack,
    StackConfig,
    default_state_dir,
    read_cli_state,
)


def _running_elsewhere(state_dir: Path) -> int | None:
    pid = read_cli_state(state_dir).get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _kvm_problem() -> str | None:
    try:
        import native  # noqa: PLC0415  (the compiled runtime; absent on API-only installs)
    except ImportError as exc:
        return f"the native runtime is not built ({exc}): run `make install`"
    reason: str | None = native.kvm_unavailable_reason()
    return reason


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def cmd_up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir()

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    other = _running_elsewhere(state_dir)
    if other is not None:
        print(
            f"flotilla up: already running for {state_dir} (pid {other}); stop it first "
            "or give another --state-dir",
            file=sys.stderr,
        )
        return Exit.CONFLICT
    if args.driver == "kvm" and (problem := _kvm_problem()) is not None:
        print(
            f"flotilla up: KVM cannot run guests here: {problem}\n"
            "  (--driver fake runs pretend guests instead)",
            file=sys.stderr,
        )
        return Exit.UNAVAILABLE
    listen_host, listen_port = args.listen
    config = StackConfig(
        state_dir=state_dir,
        amqp_url=os.environ.get("FLOTILLA_AMQP_URL") or None,
        listen_host=listen_host,
        listen_port=listen_port,
        computes=[ComputeSpec(args.host or socket.gethostname().split(".")[0])],
        driver=args.driver,
        keep_guests=args.keep_guests,
        broker_nodes=args.broker_nodes,
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Signals only set a flag: the main thread stops everything in order.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    stack = Stack(config)
    try:
        timeout = getattr(args, "timeout", 120.0)  # before or after `up`, or the default
        stack.start(timeout=timeout, progress=lambda m: say(f"flotilla up: {m}"))
    except StackError as exc:
        print(f"flotilla up: {exc}", file=sys.stderr)
        return Exit.UNAVAILABLE
    except KeyboardInterrupt:
        return Exit.ERROR
    summary = {
        "api_url": stack.api_url,
        "token": stack.admin_token,
        "state_dir": str(stack.state_dir),
        "amqp_url": stack.amqp_url,
        "hosts": list(stack.computes),
        "pids": {c.name: c.pid for c in stack.children()},
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(
            f"Flotilla is up.\n"
            f"  API:    {stack.api_url}   (OpenAPI at {stack.api_url}/docs)\n"
            f"  token:  {stack.admin_token}   (admin; saved in {state_dir / 'cli.json'})\n"
            f"  broker: {stack.amqp_url}\n"
            f"  hosts:  {', '.join(stack.computes)}\n"
            f"  logs:   {state_dir / 'logs'}\n"
            "Try `flotilla hosts`, `flotilla create --name web --kernel "
            '"$(python -m native.testguest)" --cmdline ready`, `flotilla events --follow`.\n'
            + (
                "Ctrl-C stops everything (running guests are left for the next "
                "`flotilla up` to re-adopt)."
                if args.keep_guests
                else "Ctrl-C deletes the guests and stops everything."
            ),
            flush=True,
        )
    code = Exit.OK
    while not stop.wait(0.5):
        dead = stack.dead_child()
        if dead is not None:
            print(f"flotilla up: {dead.died()}", file=sys.stderr)
            code = Exit.ERROR
            break
    say("flotilla up: stopping" + ("" if args.keep_guests else " (deleting guests first)"))
    # A second Ctrl-C while stopping must not leave half the children running.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    stack.stop()
    say("flotilla up: stopped")
    return code
