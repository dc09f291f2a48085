"""Where a page of storage.list_10k goes, stage by stage, in one process (no broker, no HTTP).

    python bench/storage_list_stages.py

10,000 volume rows in a fresh SQLite catalog; for a page of PAGE (the whole listing in one
page, as storage.list_10k now asks; `python bench/storage_list_stages.py 1000` for pages of
1000), in interleaved rounds:
- `sql`: the page's SELECT alone, through SQLAlchemy (rows, nothing built from them);
- `page`: the storage service's handler (Catalog.page_wire: the query and the reply);
- `encode`: the reply into its envelope and msgpack bytes (what the service sends);
- `decode`: msgpack bytes back to the page in the API (the envelope, then the body checked by
  protos.volume_wire, as Bus.call_read does);
- `model`: the same bytes validated as the VolumePage model instead (what every other reply
  goes through; for comparison, not on the listing's path);
- `render`: the page to the JSON bytes the API sends.
The API's listing now takes the storage service's rendering instead (cmd.catalog.volume_listing):
- `listing`: the storage service's handler for it (Catalog.listing: the query of each
  volume's stored JSON, joined);
- `l_built`: the same page built from the rows' columns instead (what the handler did before
  each volume kept its JSON, and still does for a page with a row lacking it);
- `l_encode`: that reply into its envelope and msgpack bytes;
- `l_read`: the API's read of it (the envelope, then protos.volume_wire.read_volume_listing's
  structural check) and the splice into the response body (volume_listing_json).
The stages above it (`page` … `render`) are the path before, kept for comparison; the two give
the same bytes (checked every round).
Medians on stderr, then the same as JSON on stdout.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protos.codec import decode, decode_head, encode, parse_body  # noqa: E402
from protos.volume_wire import read_volume_listing, read_volume_page  # noqa: E402
from protos.volumes import VolumePage  # noqa: E402
from services.api.visibility import HostMask  # noqa: E402
from services.api.volume_models import volume_list_json, volume_listing_json  # noqa: E402
from services.storage.catalog import Catalog  # noqa: E402
from services.storage.listing import built_listing  # noqa: E402
from services.storage.tables import volumes  # noqa: E402

VOLUMES = 10_000
PAGE = int(sys.argv[1]) if len(sys.argv) > 1 else VOLUMES
ROUNDS = 15


def fill(catalog: Catalog) -> None:
    now = time.time()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "project": "bench",
            "name": f"vol-{i:05d}",
            "pool": "default",
            "host": "node-1",
            "size": 1 << 30,
            "state": "available",
            "seq": 1,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(VOLUMES)
    ]
    with catalog.db.transaction() as conn:
        conn.execute(sa.insert(volumes), rows)
    catalog.fill_listings()  # as volumes created through the service have it


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp:
        catalog = Catalog.open(f"sqlite:///{Path(tmp) / 'catalog.db'}", "bench")
        fill(catalog)
        mask = HostMask(None, list)
        query = sa.select(volumes).order_by(volumes.c.project, volumes.c.name).limit(PAGE + 1)
        times: dict[str, list[float]] = {
            k: []
            for k in (
                "sql",
                "page",
                "encode",
                "decode",
                "model",
                "render",
                "listing",
                "l_built",
                "l_encode",
                "l_read",
            )
        }
        for _ in range(ROUNDS):
            with catalog.db.transaction() as conn:
                t, _rows = timed(lambda c=conn: c.execute(query).all())  # type: ignore[misc]
            times["sql"].append(t)
            t, reply = timed(lambda: catalog.page_wire("bench", None, PAGE, None))
            times["page"].append(t)
            t, (data, _env) = timed(lambda r=reply: encode(r, source="bench"))  # type: ignore[misc]
            times["encode"].append(t)
            t, page = timed(lambda d=data: read_volume_page(decode_head(d)[1]))  # type: ignore[misc]
            times["decode"].append(t)
            t, model = timed(lambda d=data: parse_body(decode(d)))  # type: ignore[misc]
            times["model"].append(t)
            assert isinstance(model, VolumePage)
            assert len(model.volumes) == len(page.volumes)
            t, before = timed(lambda p=page: volume_list_json(p, mask))  # type: ignore[misc]
            times["render"].append(t)
            del model, page
            with catalog.db.transaction(read_only=True) as conn:
                t, built = timed(
                    lambda c=conn: built_listing(c, "bench", None, PAGE, None, None)  # type: ignore[misc]
                )
            times["l_built"].append(t)
            t, reply = timed(lambda: catalog.listing("bench", None, PAGE, None, None))
            times["listing"].append(t)
            assert reply == built
            t, (data, _env) = timed(lambda r=reply: encode(r, source="bench"))  # type: ignore[misc]
            times["l_encode"].append(t)
            t, body = timed(
                lambda d=data: volume_listing_json(read_volume_listing(decode_head(d)[1]))  # type: ignore[misc]
            )
            times["l_read"].append(t)
            assert body == before
        catalog.close()
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(f"a page of {PAGE} of {VOLUMES} volumes, {ROUNDS} rounds, medians (ms):", file=sys.stderr)
    for name, value in med.items():
        print(f"  {name:8s} {value:8.2f}", file=sys.stderr)
    print(json.dumps(med))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
