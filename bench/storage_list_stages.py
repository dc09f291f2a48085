"""Where a page of storage.list_10k goes, stage by stage, in one process (no broker, no HTTP).

    python bench/storage_list_stages.py

10,000 volume rows in a fresh SQLite catalog; for a page of 1000, in interleaved rounds:
- `sql`: the page's SELECT alone (the rows, nothing built from them);
- `page`: the storage service's handler (Catalog.page_wire: the query and the reply);
- `encode`: the reply into its envelope and msgpack bytes (what the service sends);
- `record`: the reply recorded in the catalog's replies table (what the service's idempotency
  store did for every command, reads included);
- `decode`: msgpack bytes back to the reply in the API (decode and validation);
- `render`: the reply to the JSON bytes the API sends.
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

from protos.codec import decode, encode, parse_body  # noqa: E402
from protos.volumes import VolumePage  # noqa: E402
from services.api.routes.volumes import page_response  # noqa: E402
from services.api.visibility import HostMask  # noqa: E402
from services.storage.catalog import Catalog  # noqa: E402
from services.storage.tables import volumes  # noqa: E402

VOLUMES = 10_000
PAGE = 1000
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
            k: [] for k in ("sql", "page", "encode", "record", "decode", "render")
        }
        for _ in range(ROUNDS):
            with catalog.db.transaction() as conn:
                t, _rows = timed(lambda c=conn: c.execute(query).all())  # type: ignore[misc]
            times["sql"].append(t)
            t, reply = timed(lambda: catalog.page_wire("bench", None, PAGE, None))
            times["page"].append(t)
            t, (data, _env) = timed(lambda r=reply: encode(r, source="bench"))  # type: ignore[misc]
            times["encode"].append(t)
            t, _ = timed(lambda d=data: catalog.record_reply(str(uuid.uuid4()), d))  # type: ignore[misc]
            times["record"].append(t)
            t, answer = timed(lambda d=data: parse_body(decode(d)))  # type: ignore[misc]
            times["decode"].append(t)
            assert isinstance(answer, VolumePage)
            t, _ = timed(lambda a=answer: page_response(a, mask).body)  # type: ignore[misc]
            times["render"].append(t)
        catalog.close()
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(f"a page of {PAGE} of {VOLUMES} volumes, {ROUNDS} rounds, medians (ms):", file=sys.stderr)
    for name, value in med.items():
        print(f"  {name:8s} {value:8.2f}", file=sys.stderr)
    print(json.dumps(med))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
