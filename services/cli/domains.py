"""Domain verbs: list, create, the power actions, delete, dominfo, console."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.cli.client import Api, ApiError, Exit
from services.cli.render import Progress, emit_json, fields, table


class CliError(Exception):
    """A failure with the exit code it maps to (the message goes to stderr)."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    api: Api
    json: bool
    wait: bool
    timeout: float
    quiet: bool = False


# The registry's record, read in one place.
def power(d: dict[str, Any]) -> str:
    return str(d.get("state") or "nostate")


def task(d: dict[str, Any]) -> str:
    return str(d.get("task") or "none")


def fault_text(d: dict[str, Any]) -> str:
    f = d.get("fault")
    if not isinstance(f, dict):
        return ""
    where = f" on {f['host']}" if f.get("host") else ""
    return f"{f.get('code', 'error')}{where}: {f.get('message', '')}"


def status_text(d: dict[str, Any]) -> str:
    t = task(d)
    return power(d) if t == "none" else f"{power(d)} ({t})"


def resolve(s: Session, ref: str) -> dict[str, Any]:
    """A domain by uuid or by name (within what the token sees)."""
    try:
        uuid.UUID(ref)
    except ValueError:
        pass
    else:
        return s.api.get_domain(ref)
    found = [d for d in s.api.list_domains(name=ref) if d.get("name") == ref]
    if not found:
        raise CliError(f"domain {ref!r} not found", Exit.NOT_FOUND)
    if len(found) > 1:
        ids = ", ".join(f"{d['id']} ({d.get('project', '?')})" for d in found)
        raise CliError(f"several domains are named {ref!r}: {ids}; give a uuid", Exit.NOT_FOUND)
    return found[0]


def wait_for(
    s: Session,
    d: dict[str, Any],
    what: str,
    done: Callable[[dict[str, Any]], bool],
    *,
    gone_ok: bool = False,
) -> dict[str, Any]:
    """Poll the domain until `done(record)`; CliError on `error` (with the fault) or timeout.
    With `gone_ok`, a 404 is success (delete)."""
    name = d.get("name") or d["id"]
    progress = Progress(str(name), quiet=s.quiet)
    deadline = time.monotonic() + s.timeout
    current = d
    while True:
        if done(current):
            progress.done(status_text(current))
            return current
        if task(current) == "error":
            progress.done("error")
            raise CliError(f"{name} failed: {fault_text(current) or 'error'}", Exit.ERROR)
        progress.update(f"{status_text(current)}, waiting for {what}")
        if time.monotonic() > deadline:
            progress.done(f"still {status_text(current)}")
            raise CliError(
                f"{name}: not {what} after {s.timeout:.0f} s (now {status_text(current)})",
                Exit.TIMEOUT,
            )
        time.sleep(0.1)
        try:
            current = s.api.get_domain(d["id"])
        except ApiError as exc:
            if gone_ok and exc.status == 404:
                progress.done("deleted")
                return {**current, "state": "nostate", "task": "none", "deleted": True}
            raise


def is_state(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: power(d) in states and task(d) == "none"


def show_domain(s: Session, d: dict[str, Any]) -> None:
    if s.json:
        emit_json(d)
        return
    spec = d.get("spec") if isinstance(d.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    placement = spec.get("placement") or {}
    pairs: list[tuple[str, Any]] = [
        ("Id", d.get("id")),
        ("Name", d.get("name")),
        ("Project", d.get("project")),
        ("State", power(d)),
        ("Task", task(d)),
        ("Host", d.get("host")),
        ("CPU(s)", d.get("vcpus", spec.get("vcpus"))),
        ("Memory", f"{d.get('memory_mib', spec.get('memory_mib'))} MiB"),
        ("Kernel", _boot_source(spec, "kernel", "image")),
        ("Initrd", _boot_source(spec, "initrd", "initrd_image")),
        ("Cmdline", (spec.get("boot") or {}).get("cmdline")),
        ("Group", placement.get("group")),
        ("Seq", d.get("seq")),
    ]
    if d.get("fault"):
        pairs.append(("Fault", fault_text(d)))
    pairs.extend(
        (
            f"Interface nic{nic.get('nic')}",
            f"{nic.get('mac')} {nic.get('ipv4') or '-'} ({nic.get('network')})",
        )
        for nic in d.get("interfaces") or []
    )
    print(fields(pairs))


# ---- verbs -----------------------------------------------------------------------------------


def cmd_list(s: Session, args: argparse.Namespace) -> int:
    filters = {
        "state": args.state or "",
        "host": args.host or "",
        "name": args.name or "",
        "project": args.project or "",
    }
    items = s.api.list_domains(**filters)
    if s.json:
        emit_json(items)
        return 0
    rows = [
        (
            d.get("name"),
            status_text(d),
            d.get("host"),
            d.get("vcpus"),
            d.get("memory_mib"),
            d.get("project"),
            d.get("id"),
        )
        for d in sorted(items, key=lambda d: str(d.get("name")))
    ]
    print(table(("Name", "State", "Host", "vCPUs", "MiB", "Project", "Id"), rows))
    return 0


# A spec is small (the API refuses bodies over 1 MiB by default, 4 MiB at most).
MAX_SPEC_FILE_BYTES = 4 * 1024 * 1024


def load_spec_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (`-`: stdin); CliError (exit 2) for anything else."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_SPEC_FILE_BYTES + 1)
        else:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}", Exit.USAGE) from None
    if len(raw) > MAX_SPEC_FILE_BYTES:
        raise CliError(f"{path}: larger than {MAX_SPEC_FILE_BYTES} bytes", Exit.USAGE)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise CliError(
            f"{path}: not UTF-8 text (byte {exc.start}): is it a spec?", Exit.USAGE
        ) from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"{path}: not valid YAML/JSON: {exc}", Exit.USAGE) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping at the top level", Exit.USAGE)
    return data


def _boot_source(spec: dict[str, Any], path: str, image: str) -> str | None:
    boot = spec.get("boot") or {}
    if boot.get(image):
        return f"image {boot[image]}"
    return boot.get(path)


def _boot_from_args(boot: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The spec's `boot` with the flags on top: a flag replaces the spec file's source of
    the same role (a host path or an image)."""
    if args.kernel:
        boot.pop("image", None)
        boot.pop("initrd_image", None)
        boot["kernel"] = (
            str(Path(args.kernel).resolve()) if Path(args.kernel).exists() else args.kernel
        )
    if args.image:
        boot.pop("kernel", None)
        boot.pop("initrd", None)
        boot["image"] = args.image
    if args.initrd:
        boot.pop("initrd_image", None)
        boot["initrd"] = (
            str(Path(args.initrd).resolve()) if Path(args.initrd).exists() else args.initrd
        )
    if args.initrd_image:
        boot.pop("initrd", None)
        boot["initrd_image"] = args.initrd_image
    if args.cmdline is not None:
        boot["cmdline"] = args.cmdline
    return boot


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/domains body: a spec file, then flags on top of it."""
    body: dict[str, Any] = load_spec_file(args.file) if args.file else {}
    if args.name:
        body["name"] = args.name
    if args.vcpus is not None:
        body["vcpus"] = args.vcpus
    if args.memory is not None:
        body["memory_mib"] = args.memory
    boot = _boot_from_args(dict(body.get("boot") or {}), args)
    if boot:
        body["boot"] = boot
    if args.group or args.affinity:
        placement = dict(body.get("placement") or {})
        if args.group:
            placement["group"] = args.group
        if args.affinity:
            placement["policy"] = args.affinity
        body["placement"] = placement
    if args.no_start:
        body["start"] = False
    if "name" not in body:
        raise CliError("a domain needs a name: --name NAME or `name:` in the spec", Exit.USAGE)
    return body


def cmd_create(s: Session, args: argparse.Namespace) -> int:
    body = spec_from_args(args)
    d = s.api.create_domain(body)
    start = body.get("start", True)
    if s.wait:
        d = wait_for(
            s, d, "running" if start else "defined", is_state("running" if start else "shutoff")
        )
    show_domain(s, d)
    return 0


# verb → (API action, states that end the wait, what the wait is for, what virsh would say)
ACTIONS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "start": ("start", ("running",), "running", "started"),
    "shutdown": ("shutdown", ("shutoff",), "shut off", "is shut off"),
    "destroy": ("destroy", ("shutoff",), "shut off", "destroyed"),
    "reboot": ("reboot", ("running",), "running", "rebooted"),
    "suspend": ("pause", ("paused",), "paused", "suspended"),
    "resume": ("resume", ("running",), "running", "resumed"),
}


def cmd_action(s: Session, args: argparse.Namespace) -> int:
    action, states, what, done = ACTIONS[args.verb]
    d = resolve(s, args.domain)
    answer = s.api.action(d["id"], action)
    if isinstance(answer, dict) and "id" in answer:
        d = answer
    if s.wait:
        d = wait_for(s, d, what, is_state(*states))
    if s.json:
        emit_json(d)
    elif s.wait:
        print(f"Domain '{d.get('name')}' {done}")
    else:
        print(f"Domain '{d.get('name')}': {action} requested ({status_text(d)})")
    return 0


def cmd_delete(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    s.api.delete_domain(d["id"])
    if s.wait:
        d = wait_for(s, d, "deleted", lambda _: False, gone_ok=True)
    if s.json:
        emit_json({"id": d["id"], "name": d.get("name"), "deleted": bool(d.get("deleted"))})
    elif s.wait:
        print(f"Domain '{d.get('name')}' deleted")
    else:
        print(f"Domain '{d.get('name')}': delete requested")
    return 0


def cmd_dominfo(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    if d.get("interfaces") is None and (d.get("spec") or {}).get("nics"):
        d = s.api.get_domain(d["id"])  # a list entry has no interfaces: the full view does
    show_domain(s, d)
    return 0


def console_text(answer: Any) -> str:
    if isinstance(answer, dict):
        for key in ("output", "text", "data", "console"):
            if isinstance(answer.get(key), str):
                return str(answer[key])
    return str(answer)


def cmd_console(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    if args.follow:
        from services.cli.attach import attach  # noqa: PLC0415  (websockets only here)

        return attach(s, d, read_only=args.read_only)
    answer = s.api.console(d["id"], max_bytes=args.bytes)
    if s.json:
        emit_json(answer)
        return 0
    text = console_text(answer)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0
