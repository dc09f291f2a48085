"""Storage verbs, virsh's names: pool-list, pool-info, vol-create, vol-list, vol-info,
vol-delete, vol-resize, vol-clone, vol-wipe, attach-disk, detach-disk."""

from __future__ import annotations

import argparse
import re
import uuid
from collections.abc import Iterator
from typing import Any

from services.cli.client import Exit
from services.cli.domains import CliError, Session, resolve
from services.cli.render import Progress, emit_json, fields, table

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """An argparse type: bytes, or a number with K, M, G or T (binary units: 10G, 512MiB)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10G, 512M, 1048576)")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size is more than 0, not {text!r}")
    return value


def human(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _volumes(s: Session, pool: str | None = None) -> Iterator[dict[str, Any]]:
    """Every volume the token sees, page by page (the API's largest page: protos.volumes
    MAX_PAGE, not imported to keep the CLI's start-up short)."""
    params: dict[str, Any] = {"limit": 10_000}
    if pool:
        params["pool"] = pool
    while True:
        page = s.api.request("GET", "/v1/volumes", params=params)
        yield from page["volumes"]
        if not page.get("next"):
            return
        params["after"] = page["next"]


def resolve_volume(s: Session, ref: str) -> dict[str, Any]:
    """A volume by uuid or by name (within what the token sees)."""
    try:
        uuid.UUID(ref)
    except ValueError:
        pass
    else:
        volume: dict[str, Any] = s.api.request("GET", f"/v1/volumes/{ref}")
        return volume
    found = [v for v in _volumes(s) if v["name"] == ref]
    if not found:
        raise CliError(f"volume {ref!r} not found", Exit.NOT_FOUND)
    if len(found) > 1:
        ids = ", ".join(f"{v['id']} ({v['project']})" for v in found)
        raise CliError(f"several volumes are named {ref!r}: {ids}; give a uuid", Exit.NOT_FOUND)
    return found[0]


def _show(s: Session, v: dict[str, Any]) -> int:
    if s.json:
        emit_json(v)
        return 0
    attachment = v.get("attachment")
    print(
        fields(
            [
                ("Id", v["id"]),
                ("Name", v["name"]),
                ("Project", v["project"]),
                ("Pool", v["pool"]),
                ("Host", v.get("host")),
                ("State", v["state"]),
                ("Capacity", f"{human(v['size'])} ({v['size']} bytes)"),
                (
                    "Attached",
                    f"{attachment['domain_id']} as {attachment['target']}"
                    + (" (readonly)" if attachment.get("readonly") else "")
                    if attachment
                    else None,
                ),
                ("Source", v.get("source_id")),
            ]
        )
    )
    return 0


def cmd_pool_list(s: Session, _args: argparse.Namespace) -> int:
    pools = s.api.request("GET", "/v1/pools")["pools"]
    if s.json:
        emit_json(pools)
        return 0
    rows = [
        (
            p["name"],
            p["kind"],
            p.get("host"),
            human(p["capacity"]),
            human(p["allocation"]),
            human(p["available"]),
            "yes" if p["capabilities"]["reflink"] else "no",
            p["volumes"],
        )
        for p in pools
    ]
    headers = ("Name", "Kind", "Host", "Capacity", "Allocation", "Available", "Reflink", "Volumes")
    print(table(headers, rows))
    return 0


def cmd_pool_info(s: Session, args: argparse.Namespace) -> int:
    p = s.api.request("GET", f"/v1/pools/{args.pool}")
    if s.json:
        emit_json(p)
        return 0
    print(
        fields(
            [
                ("Name", p["name"]),
                ("Kind", p["kind"]),
                ("Host", p.get("host")),
                ("Capacity", human(p["capacity"])),
                ("Allocation", human(p["allocation"])),
                ("Available", human(p["available"])),
                ("Reflink", "yes" if p["capabilities"]["reflink"] else "no"),
                ("Volumes", p["volumes"]),
            ]
        )
    )
    return 0


def cmd_vol_create(s: Session, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "size": args.size}
    if args.pool:
        body["pool"] = args.pool
    return _show(s, s.api.request("POST", "/v1/volumes", json=body))


def cmd_vol_list(s: Session, args: argparse.Namespace) -> int:
    volumes = list(_volumes(s, args.pool))
    if s.json:
        emit_json(volumes)
        return 0
    rows = [
        (
            v["name"],
            v["id"],
            v["pool"],
            human(v["size"]),
            v["state"],
            (v.get("attachment") or {}).get("domain_id"),
        )
        for v in volumes
    ]
    print(table(("Name", "Id", "Pool", "Capacity", "State", "Attached to"), rows))
    return 0


def cmd_vol_info(s: Session, args: argparse.Namespace) -> int:
    return _show(s, resolve_volume(s, args.volume))


def cmd_vol_delete(s: Session, args: argparse.Namespace) -> int:
    v = resolve_volume(s, args.volume)
    s.api.request("DELETE", f"/v1/volumes/{v['id']}")
    if s.json:
        emit_json({"id": v["id"], "deleted": True})
    else:
        print(f"Volume {v['name']} deleted")
    return 0


def cmd_vol_resize(s: Session, args: argparse.Namespace) -> int:
    v = resolve_volume(s, args.volume)
    return _show(
        s, s.api.request("POST", f"/v1/volumes/{v['id']}/resize", json={"size": args.size})
    )


def cmd_vol_clone(s: Session, args: argparse.Namespace) -> int:
    v = resolve_volume(s, args.volume)
    body: dict[str, Any] = {"name": args.name}
    if args.size:
        body["size"] = args.size
    # A clone that copies (no reflink) can take a while: say so while it runs.
    progress = Progress(f"cloning {v['name']} ({human(v['size'])})", quiet=s.json)
    progress.update("copying")
    made = s.api.request("POST", f"/v1/volumes/{v['id']}/clone", json=body)
    progress.done("done")
    return _show(s, made)


def cmd_vol_wipe(s: Session, args: argparse.Namespace) -> int:
    v = resolve_volume(s, args.volume)
    return _show(s, s.api.request("POST", f"/v1/volumes/{v['id']}/wipe"))


def cmd_attach_disk(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    v = resolve_volume(s, args.volume)
    body = {"target": args.target, "volume_id": v["id"], "readonly": args.readonly}
    domain = s.api.request("POST", f"/v1/domains/{d['id']}/disks", json=body)
    if s.json:
        emit_json(domain)
    else:
        print(f"Disk {args.target} ({v['name']}) attached to {d['name']}")
    return 0


def cmd_detach_disk(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    domain = s.api.request("DELETE", f"/v1/domains/{d['id']}/disks/{args.target}")
    if s.json:
        emit_json(domain)
    else:
        print(f"Disk {args.target} detached from {d['name']}")
    return 0
