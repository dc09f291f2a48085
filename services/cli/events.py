"""`flotilla events [--follow] [PATTERN]`: the API's Server-Sent Events stream."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from services.cli.client import SseEvent
from services.cli.domains import Session, resolve


def event_line(ev: SseEvent) -> str:
    """`time  type  name  state  seq=n  host  detail` for one domain event."""
    data = ev.data if isinstance(ev.data, dict) else {"data": ev.data}
    inner = data.get("event")
    body: dict[str, Any] = inner if isinstance(inner, dict) else data
    ts = data.get("ts") or body.get("ts")
    when = time.strftime("%H:%M:%S", time.localtime(float(ts))) if ts else "--:--:--"
    kind = str(data.get("type") or ev.event)
    detail = body.get("detail") or ""
    reason = body.get("reason") or ""
    parts = [
        when,
        kind.ljust(18),
        str(body.get("name") or body.get("domain_id") or "-"),
        str(body.get("state") or data.get("state") or "-").ljust(8),
        f"seq={body.get('seq', data.get('seq', '-'))}",
        f"host={body.get('host', data.get('host', '-'))}",
    ]
    if detail:
        parts.append(str(detail))
    if reason and reason != detail:
        parts.append(f"({reason})")
    return "  ".join(parts)


def _domain_id(s: Session, ref: str) -> str:
    """A uuid as given (a deleted domain's history is still served, scoped to the caller's
    project), a name through the domain list."""
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        return str(resolve(s, ref)["id"])


def cmd_events(s: Session, args: argparse.Namespace) -> int:
    domain = _domain_id(s, args.domain) if args.domain else None
    # Without --follow: what is logged so far, from the start unless --since says otherwise.
    since = args.since if args.since is not None or args.follow else "0"
    count = 0
    stream = s.api.events(
        args.pattern,
        since=since,
        domain=domain,
        follow=args.follow,
        read_timeout=None if args.follow else 5.0,
    )
    for ev in stream:
        if ev.event in ("keepalive", "ping"):
            continue
        if s.json:
            print(json.dumps({"id": ev.id, "event": ev.event, "data": ev.data}), flush=True)
        else:
            print(event_line(ev), flush=True)
        count += 1
        if args.count and count >= args.count:
            break
    sys.stdout.flush()
    return 0
