"""Save and snapshot verbs, as virsh has them: save, restore, managedsave,
managedsave-remove, snapshot-create, snapshot-list [--tree], snapshot-info, snapshot-revert,
snapshot-delete (docs/snapshots.md)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from services.cli.domains import Session, resolve, show_domain, status_text
from services.cli.render import emit_json, fields, table
from services.cli.volumes import human


def _path(s: Session, ref: str, tail: str) -> tuple[dict[str, Any], str]:
    d = resolve(s, ref)
    return d, f"/v1/domains/{d['id']}/{tail}"


def _done(s: Session, result: Any, text: str) -> int:
    if s.json:
        emit_json(result)
    elif not s.quiet:
        print(text)
    return 0


def cmd_save(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, "save")
    body = {"pool": args.pool} if args.pool else None
    saved = s.api.request("POST", path, json=body)
    where = f" in pool {saved['pool']}" if saved.get("pool") else ""
    return _done(s, saved, f"Domain '{d['name']}' saved{where} ({human(saved['bytes'])})")


def cmd_restore(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, "restore")
    body = {"paused": True} if args.paused else None
    result = s.api.request("POST", path, json=body)
    return _done(s, result, f"Domain '{d['name']}' restored ({status_text(result)})")


def cmd_managedsave(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, "managedsave")
    saved = s.api.request("POST", path)
    return _done(s, saved, f"Domain '{d['name']}' state saved ({human(saved['bytes'])})")


def cmd_managedsave_remove(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, "managedsave")
    result = s.api.request("DELETE", path)
    return _done(s, result, f"Removed managedsave image for domain '{d['name']}'")


def cmd_snapshot_create(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, "snapshots")
    name = args.name or time.strftime("snap-%Y%m%d-%H%M%S")
    body = {"name": name, "description": args.description or "", "memory": not args.disk_only}
    snapshot = s.api.request("POST", path, json=body)
    kind = "disk-only" if not snapshot["memory"] else "with memory"
    return _done(s, snapshot, f"Domain snapshot {name} created ({kind}) of '{d['name']}'")


def cmd_snapshot_list(s: Session, args: argparse.Namespace) -> int:
    _d, path = _path(s, args.domain, "snapshots")
    listing = s.api.request("GET", path)
    if s.json:
        emit_json(listing)
        return 0
    snapshots = listing["snapshots"]
    if args.tree:
        print("\n".join(tree_lines(snapshots)))
        return 0
    rows = [
        (
            x["name"] + (" *" if x["current"] else ""),
            time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(x["created_at"])),
            x["power"],
            x["parent"] or "",
            human(x["bytes"]),
        )
        for x in snapshots
    ]
    print(table(("Name", "Creation Time", "State", "Parent", "Size"), rows))
    return 0


def tree_lines(snapshots: list[dict[str, Any]]) -> list[str]:
    """virsh snapshot-list --tree: each root, its children indented below it."""
    by_name = {x["name"]: x for x in snapshots}
    lines: list[str] = []

    def walk(name: str, prefix: str, last: bool, root: bool) -> None:
        mark = "" if root else ("`- " if last else "+- ")
        lines.append(f"{prefix}{mark}{name}")
        children = by_name[name]["children"]
        inner = prefix if root else prefix + ("   " if last else "|  ")
        for i, child in enumerate(children):
            walk(child, inner, i == len(children) - 1, root=False)

    for x in snapshots:
        if x["parent"] is None:
            walk(x["name"], "", True, root=True)
    return lines


def cmd_snapshot_info(s: Session, args: argparse.Namespace) -> int:
    d, path = _path(s, args.domain, f"snapshots/{args.name}")
    x = s.api.request("GET", path)
    if s.json:
        emit_json(x)
        return 0
    pairs: list[tuple[str, Any]] = [
        ("Name", x["name"]),
        ("Domain", d["name"]),
        ("Current", "yes" if x["current"] else "no"),
        ("State", x["power"]),
        ("Location", "internal" if x["memory"] else "disks only"),
        ("Parent", x["parent"] or "-"),
        ("Children", len(x["children"])),
        ("Disks", ", ".join(x["disks"]) or "-"),
        ("Size", human(x["bytes"])),
        ("Description", x["description"] or "-"),
    ]
    print(fields(pairs))
    return 0


def cmd_snapshot_revert(s: Session, args: argparse.Namespace) -> int:
    _d, path = _path(s, args.domain, f"snapshots/{args.name}/revert")
    body = {"start": True} if args.running else ({"start": False} if args.stopped else None)
    result = s.api.request("POST", path, json=body)
    if s.json:
        emit_json(result)
    elif not s.quiet:
        show_domain(s, result)
    return 0


def cmd_snapshot_delete(s: Session, args: argparse.Namespace) -> int:
    _d, path = _path(s, args.domain, f"snapshots/{args.name}")
    s.api.request("DELETE", path)
    return _done(s, {"deleted": args.name}, f"Domain snapshot {args.name} deleted")


def add_verbs(verb: Any) -> None:
    """Register the verbs with `services.cli.main`'s `verb(name, help, func)`."""
    p = verb("save", "save a running domain's whole machine and stop it", cmd_save)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("--pool", help="keep it in this storage pool (a shared one: any host)")
    p = verb("restore", "start a domain from its save", cmd_restore)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("--paused", action="store_true", help="leave it paused")
    p = verb("managedsave", "save a domain; its next start restores it", cmd_managedsave)
    p.add_argument("domain", help="name or uuid")
    p = verb("managedsave-remove", "drop a domain's managed save", cmd_managedsave_remove)
    p.add_argument("domain", help="name or uuid")
    p = verb("snapshot-create", "snapshot a domain's disks (and memory)", cmd_snapshot_create)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("name", nargs="?", help="default: snap-<date>-<time>")
    p.add_argument("--description")
    p.add_argument("--disk-only", action="store_true", help="disks only, no machine state")
    p = verb("snapshot-list", "list a domain's snapshots", cmd_snapshot_list)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("--tree", action="store_true", help="as a tree of parents and children")
    p = verb("snapshot-info", "show one snapshot", cmd_snapshot_info)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("name")
    p = verb("snapshot-revert", "return a shut-off domain to a snapshot", cmd_snapshot_revert)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("name")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--running", action="store_true", help="start it afterwards")
    start.add_argument("--stopped", action="store_true", help="leave it shut off")
    p = verb("snapshot-delete", "delete a snapshot (its children keep theirs)", cmd_snapshot_delete)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("name")
