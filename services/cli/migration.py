"""Migration verbs, as virsh has them: migrate, migrate-setmaxdowntime, migrate-setspeed,
domjobinfo, domjobabort; and evacuate (docs/migration.md, "The control plane")."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from services.cli.client import Exit
from services.cli.domains import CliError, Session, resolve
from services.cli.images import human
from services.cli.render import emit_json, fields, table

Verb = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]
POLL_S = 0.2


def _job_path(s: Session, ref: str) -> tuple[dict[str, Any], str]:
    d = resolve(s, ref)
    return d, f"/v1/domains/{d['id']}/job"


def migrate_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body `flotilla migrate`'s options make (only what was given)."""
    given = {
        "live": args.live,
        "host": args.host,
        "max_downtime_ms": args.max_downtime,
        "bandwidth_mibps": args.bandwidth,
        "timeout_s": args.migration_timeout,
        "timeout_action": args.timeout_action,
    }
    return {key: value for key, value in given.items() if value is not None}


class JobBar:
    """`migrating web to node-2: precopy 45% 120.00 MiB of 256.00 MiB, iteration 3,
    80.00 MiB/s` rewritten in place on stderr; nothing when stderr is not a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()

    def show(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        total = int(job.get("memory_bytes") or 0)
        sent = int(job.get("bytes_sent") or 0)
        copied = ""
        if total:
            pct = 100 * max(0, total - int(job.get("remaining_bytes") or 0)) // total
            copied = f" {pct}% {human(sent)} of {human(total)},"
        if job.get("phase") == "queued":
            sys.stderr.write(f"\r\x1b[K{self.what}: queued, place {job.get('queue_position')}")
            sys.stderr.flush()
            return
        sys.stderr.write(
            f"\r\x1b[K{self.what}: {job.get('phase')}{copied} "
            f"iteration {job.get('iteration', 0)}, {human(int(job.get('bandwidth') or 0))}/s"
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def wait_job(s: Session, path: str, bar: JobBar) -> dict[str, Any]:
    """Poll the job until it ends (or the session's timeout passes: the migration runs on)."""
    deadline = time.monotonic() + s.timeout
    try:
        while True:
            job: dict[str, Any] = s.api.request("GET", path)
            if not job.get("running"):
                return job
            bar.show(job)
            if time.monotonic() > deadline:
                raise CliError(
                    f"the migration still runs after {s.timeout:g} s (phase {job.get('phase')});"
                    " `flotilla domjobinfo` follows it, `flotilla domjobabort` cancels it",
                    Exit.TIMEOUT,
                )
            time.sleep(POLL_S)
    finally:
        bar.finish()


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} ms"


def ended_text(name: str, job: dict[str, Any]) -> str:
    how = "live" if job.get("live") else "offline"
    if job.get("phase") == "done":
        return (
            f"Migration of '{name}' to {job['target']} done ({how}): "
            f"{_ms(job.get('elapsed_ms'))} in all, downtime {_ms(job.get('downtime_ms'))}"
        )
    why = f": {job['error']}" if job.get("error") else ""
    return (
        f"Migration of '{name}' to {job['target']} {job.get('phase')}{why}; it runs on where it was"
    )


def cmd_migrate(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    job: dict[str, Any] = s.api.request(
        "POST", f"/v1/domains/{d['id']}/migrate", json=migrate_body(args)
    )
    if args.wait:
        bar = JobBar(f"migrating {d['name']} to {job['target']}")
        job = wait_job(s, f"/v1/domains/{d['id']}/job", bar)
    if s.json:
        emit_json(job)
    elif job.get("running"):
        how = "live" if job.get("live") else "offline"
        if job.get("phase") == "queued":
            print(
                f"Migration of '{d['name']}' to {job['target']} queued ({how}): place "
                f"{job.get('queue_position')} behind its host's running migrations"
            )
        else:
            print(f"Migration of '{d['name']}' to {job['target']} started ({how})")
    else:
        print(ended_text(d["name"], job))
    if job.get("running") or job.get("phase") == "done":
        return 0
    return Exit.ERROR


def _set(s: Session, args: argparse.Namespace, body: dict[str, Any], what: str) -> int:
    d, path = _job_path(s, args.domain)
    job = s.api.request("PATCH", path, json=body)
    if s.json:
        emit_json(job)
    else:
        print(f"Migration of '{d['name']}': {what}")
    return 0


def cmd_migrate_setmaxdowntime(s: Session, args: argparse.Namespace) -> int:
    body = {"max_downtime_ms": args.downtime}
    return _set(s, args, body, f"downtime budget {args.downtime:g} ms from the next round")


def cmd_migrate_setspeed(s: Session, args: argparse.Namespace) -> int:
    cap = f"{args.bandwidth} MiB/s" if args.bandwidth else "none"
    return _set(s, args, {"bandwidth_mibps": args.bandwidth}, f"bandwidth cap {cap}")


def cmd_domjobinfo(s: Session, args: argparse.Namespace) -> int:
    _d, path = _job_path(s, args.domain)
    job = s.api.request("GET", path)
    if s.json:
        emit_json(job)
        return 0
    params = job.get("params") or {}
    total = int(job.get("memory_bytes") or 0)
    print(
        fields(
            [
                ("Job type", "Unbounded" if job.get("running") else "Completed"),
                ("Operation", f"Outgoing migration ({'live' if job.get('live') else 'offline'})"),
                ("Source", job.get("source")),
                ("Target", job.get("target")),
                ("Phase", job.get("phase")),
                ("Queue position", job.get("queue_position")),
                ("Time elapsed", _ms(job.get("elapsed_ms"))),
                ("Iteration", job.get("iteration")),
                ("Data processed", human(int(job.get("bytes_sent") or 0))),
                ("Data remaining", human(int(job.get("remaining_bytes") or 0))),
                ("Data total", human(total) if total else None),
                ("Memory bandwidth", f"{human(int(job.get('bandwidth') or 0))}/s"),
                ("Dirty rate", f"{human(int(job.get('dirty_rate') or 0))}/s"),
                ("Expected downtime", _ms(job.get("predicted_ms")) if job.get("running") else None),
                ("Downtime budget", _ms(params.get("max_downtime_ms")) if params else None),
                ("Bandwidth cap", _cap(params)),
                ("vCPU throttle", f"{job.get('throttle_pct', 0)}%"),
                ("Downtime", _ms(job.get("downtime_ms"))),
                ("Error", job.get("error")),
            ]
        )
    )
    return 0


def _cap(params: dict[str, Any]) -> str | None:
    if not params:
        return None
    cap = int(params.get("bandwidth_mibps") or 0)
    return f"{cap} MiB/s" if cap else "none"


def cmd_domjobabort(s: Session, args: argparse.Namespace) -> int:
    d, path = _job_path(s, args.domain)
    job = s.api.request("DELETE", path)
    if s.json:
        emit_json(job)
    else:
        print(f"Migration of '{d['name']}' {job.get('phase')}: it runs on where it was")
    return 0


def cmd_evacuate(s: Session, args: argparse.Namespace) -> int:
    result: dict[str, Any] = s.api.request("POST", f"/v1/hosts/{args.host}/evacuate")
    if s.json:
        emit_json(result)
    else:
        rows = []
        for o in result["domains"]:
            job = o.get("job")
            if job is not None:
                how = "live" if job.get("live") else "offline"
                outcome = f"migrating {how} to {job['target']}"
            else:
                outcome = f"stays: {o.get('code')}: {o.get('detail')}"
            rows.append((o["name"], o["state"], outcome))
        if rows:
            print(table(("Name", "State", "Outcome"), rows))
        print(f"{args.host}: {result['started']} migration(s) started, {result['refused']} refused")
    return 0 if not result["refused"] else Exit.CONFLICT


def _downtime_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 < value <= 60_000:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 60000 ms, not {text}")
    return value


def _mibps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB/s: {text!r}") from None
    if not 0 <= value <= 1 << 20:
        raise argparse.ArgumentTypeError(f"must be 0 (no cap) to 1048576 MiB/s, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 s, not {text}")
    return value


def add_verbs(verb: Verb) -> None:
    p = verb("migrate", "migrate a domain to another host (virsh migrate)", cmd_migrate)
    p.add_argument("domain", help="name or uuid")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--live", dest="live", action="store_const", const=True, help="the guest runs on"
    )
    how.add_argument(
        "--offline", dest="live", action="store_const", const=False, help="a shut-off domain"
    )
    p.set_defaults(live=None)
    p.add_argument("--host", help="the target host (admin; default: the scheduler picks)")
    p.add_argument("--max-downtime", type=_downtime_ms, metavar="MS", help="pause budget")
    p.add_argument("--bandwidth", type=_mibps, metavar="MiBps", help="cap on the stream")
    p.add_argument(
        "--timeout",
        dest="migration_timeout",
        type=_seconds,
        metavar="S",
        help="after S seconds still copying, do --timeout-action",
    )
    p.add_argument("--timeout-action", choices=("abort", "pause"), help="default abort")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job to end (a progress bar on a terminal), at most the global "
        "--timeout (default 120 s)",
    )
    p = verb(
        "migrate-setmaxdowntime",
        "change a running migration's downtime budget",
        cmd_migrate_setmaxdowntime,
    )
    p.add_argument("domain", help="name or uuid")
    p.add_argument("downtime", type=_downtime_ms, metavar="MS")
    p = verb("migrate-setspeed", "change a running migration's bandwidth cap", cmd_migrate_setspeed)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("bandwidth", type=_mibps, metavar="MiBps", help="0: no cap")
    p = verb("domjobinfo", "the domain's migration job, or its last one", cmd_domjobinfo)
    p.add_argument("domain", help="name or uuid")
    p = verb("domjobabort", "cancel the domain's migration before it commits", cmd_domjobabort)
    p.add_argument("domain", help="name or uuid")
    p = verb("evacuate", "migrate every domain off a disabled host (admin)", cmd_evacuate)
    p.add_argument("host")
