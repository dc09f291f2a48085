"""`flotilla hosts [enable|disable HOST]` (admin)."""

from __future__ import annotations

import argparse

from services.cli.domains import Session
from services.cli.render import emit_json, table


def cmd_hosts(s: Session, args: argparse.Namespace) -> int:
    if args.action in ("enable", "disable"):
        answer = s.api.set_host(args.host, args.action == "enable", args.reason or "")
        if s.json:
            emit_json(answer if answer is not None else {"host": args.host, "done": True})
        else:
            print(f"{args.host}: {args.action}d")
        return 0
    hosts = s.api.list_hosts()
    if s.json:
        emit_json(hosts)
        return 0
    rows = []
    for h in sorted(hosts, key=lambda h: str(h.get("name"))):
        cap = h.get("capacity") or {}
        use = h.get("usage") or {}
        vcpu_limit = int(cap.get("vcpus", 0) * h.get("cpu_allocation_ratio", 1.0))
        mib_limit = int(cap.get("memory_mib", 0) * h.get("ram_allocation_ratio", 1.0))
        running = sum(int(v) for v in (h.get("domains_by_state") or {}).values())
        rows.append(
            (
                h.get("name"),
                h.get("state"),
                "yes" if h.get("enabled") else "no",
                h.get("kvm"),
                f"{use.get('vcpus', 0)}/{vcpu_limit}",
                f"{use.get('memory_mib', 0)}/{mib_limit}",
                running,
                f"{h.get('seconds_since_heartbeat', 0):.1f} s",
            )
        )
    print(table(("Host", "State", "Enabled", "KVM", "vCPUs", "MiB", "Domains", "Last beat"), rows))
    for h in sorted(hosts, key=lambda h: str(h.get("name"))):
        if h.get("vtep"):
            print(f"{h.get('name')}: VXLAN underlay (vtep) {h['vtep']}")
        if h.get("pools"):
            print(f"{h.get('name')}: pools {', '.join(h['pools'])}")
        for warning in h.get("network_warnings") or []:
            print(f"{h.get('name')}: warning: {warning}")
    return 0
