"""Image verbs: image-import, image-list, image-delete; and the byte progress bar that
uploads and downloads show (on a terminal only: quiet when stderr is not a TTY)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from services.cli.client import Exit
from services.cli.domains import CliError, Session
from services.cli.render import emit_json, fields, table

CHUNK = 1 << 20


def human(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


class ByteBar:
    """`what: 45% 120.00 MiB of 266.00 MiB, 80.1 MiB/s` rewritten in place on stderr, at most
    ten times a second; nothing at all when stderr is not a terminal."""

    def __init__(self, what: str, total: int | None) -> None:
        self.what = what
        self.total = total
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = 0.0
        self.done_bytes = 0

    def add(self, n: int) -> None:
        self.done_bytes += n
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.1:
            self.shown = now
            rate = self.done_bytes / max(now - self.started, 1e-6)
            of = ""
            if self.total:
                pct = 100 * self.done_bytes // self.total
                of = f"{pct}% {human(self.done_bytes)} of {human(self.total)}"
            else:
                of = human(self.done_bytes)
            sys.stderr.write(f"\r\x1b[K{self.what}: {of}, {human(int(rate))}/s")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def stream_file(source: BinaryIO, bar: ByteBar, digest: Any) -> Iterator[bytes]:
    """The file's bytes in 1 MiB chunks, hashed and counted on the way."""
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            bar.finish()
            return
        digest.update(chunk)
        bar.add(len(chunk))
        yield chunk


def _show(s: Session, image: dict[str, Any]) -> int:
    if s.json:
        emit_json(image)
        return 0
    print(
        fields(
            [
                ("Id", image["id"]),
                ("Name", image["name"]),
                ("Project", image["project"]),
                ("Kind", image["kind"]),
                ("Visibility", image["visibility"]),
                ("Pool", image["pool"]),
                ("State", image["state"]),
                ("Size", None if image.get("size") is None else human(image["size"])),
                ("Format", image.get("source_format")),
                ("Sha256", image.get("sha256")),
            ]
        )
    )
    return 0


def cmd_image_import(s: Session, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "name": args.name,
        "kind": args.kind,
        "visibility": "public" if args.public else "private",
    }
    if args.format:
        params["format"] = args.format
    if args.pool:
        params["pool"] = args.pool
    if args.from_host:
        body = dict(params.items())
        body["path"] = args.file
        return _show(s, s.api.request("POST", "/v1/images/from-host", json=body))
    path = Path(args.file)
    try:
        source = path.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    with source:
        size = os.fstat(source.fileno()).st_size
        digest = hashlib.sha256()
        bar = ByteBar(f"importing {path.name}", size)
        image = s.api.request(
            "POST",
            "/v1/images",
            params=params,
            content=stream_file(source, bar, digest),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=None,
        )
    if not s.json:
        print(f"uploaded {human(size)}, sha256 {digest.hexdigest()}", file=sys.stderr)
    return _show(s, image)


def _images(s: Session) -> list[dict[str, Any]]:
    body: dict[str, Any] = s.api.request("GET", "/v1/images")
    return list(body["images"])


def resolve_image(s: Session, ref: str) -> dict[str, Any]:
    try:
        uuid.UUID(ref)
    except ValueError:
        pass
    else:
        image: dict[str, Any] = s.api.request("GET", f"/v1/images/{ref}")
        return image
    found = [i for i in _images(s) if i["name"] == ref]
    if not found:
        raise CliError(f"image {ref!r} not found", Exit.NOT_FOUND)
    if len(found) > 1:
        ids = ", ".join(f"{i['id']} ({i['project']})" for i in found)
        raise CliError(f"several images are named {ref!r}: {ids}; give a uuid", Exit.NOT_FOUND)
    return found[0]


def cmd_image_list(s: Session, _args: argparse.Namespace) -> int:
    images = _images(s)
    if s.json:
        emit_json(images)
        return 0
    rows = [
        (
            i["name"],
            i["id"],
            i["kind"],
            i["visibility"],
            None if i.get("size") is None else human(i["size"]),
            i["state"],
            (i.get("sha256") or "")[:12],
        )
        for i in images
    ]
    print(table(("Name", "Id", "Kind", "Visibility", "Size", "State", "Sha256"), rows))
    return 0


def cmd_image_delete(s: Session, args: argparse.Namespace) -> int:
    image = resolve_image(s, args.image)
    s.api.request("DELETE", f"/v1/images/{image['id']}")
    if not s.json:
        print(f"Image {image['name']} deleted")
    return 0


def cmd_vol_upload(s: Session, args: argparse.Namespace) -> int:
    """A new volume from a local file (its size a multiple of 512), streamed."""
    path = Path(args.file)
    try:
        source = path.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", Exit.USAGE) from None
    params: dict[str, Any] = {"name": args.name}
    if args.pool:
        params["pool"] = args.pool
    with source:
        size = os.fstat(source.fileno()).st_size
        if size == 0 or size % 512:
            raise CliError(f"{path}: {size} bytes; a volume is a multiple of 512", Exit.USAGE)
        digest = hashlib.sha256()
        bar = ByteBar(f"uploading {path.name}", size)
        volume = s.api.request(
            "POST",
            "/v1/volumes/upload",
            params=params,
            content=stream_file(source, bar, digest),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=None,
        )
    if s.json:
        emit_json({**volume, "sha256": digest.hexdigest()})
    else:
        print(f"Volume {volume['name']} uploaded: {human(size)}, sha256 {digest.hexdigest()}")
    return 0


def cmd_vol_download(s: Session, args: argparse.Namespace) -> int:
    """A volume's bytes into a local file: written to FILE.part, renamed when whole."""
    from services.cli.volumes import resolve_volume  # noqa: PLC0415

    volume = resolve_volume(s, args.volume)
    dest = Path(args.file)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    bar = ByteBar(f"downloading {volume['name']}", volume["size"])
    got = 0
    try:
        with (
            s.api.http.stream("GET", f"/v1/volumes/{volume['id']}/content", timeout=None) as r,
            part.open("wb") as out,
        ):
            if r.status_code >= 400:
                r.read()
                s.api.raise_for(r)
            for chunk in r.iter_bytes(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
                bar.add(len(chunk))
        bar.finish()
        if got != volume["size"]:
            raise CliError(f"the download ended after {got} of {volume['size']} bytes")
        part.rename(dest)
    finally:
        part.unlink(missing_ok=True)
    if s.json:
        emit_json({"file": str(dest), "size": got, "sha256": digest.hexdigest()})
    else:
        sha = digest.hexdigest()
        print(f"Volume {volume['name']} downloaded to {dest}: {human(got)}, sha256 {sha}")
    return 0
