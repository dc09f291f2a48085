"""storage.list_10k: listing 10,000 volumes through the API, against the same rows read
straight from the catalog.

    python bench/storage_list.py

Starts the stack on one host (`flotilla up`'s Stack: a private broker, the API, the
scheduler, the storage service, one compute node on the fake driver), puts 10,000 volume rows
in the storage service's SQLite catalog (rows only: listing reads the catalog, never the
pool, so the 10,000 files are not needed) with each one's listing JSON (as the service
stores it for a volume it creates), then times, in interleaved rounds:
- the full listing through the API: `GET /v1/volumes?limit=10000` page after page (one page:
  HTTP, the API, an RPC to the storage service, its SQL query, the JSON, and the client's
  parse of that JSON) — the figure;
- the same listing in pages of 1000 (10 pages: how it was measured before pages of 10,000);
- one page of 100 (the default page) and one of 1000;
- the client's share: parsing the 10,000 volumes' JSON body alone (`json.loads`, as
  httpx's `Response.json` does), already inside the figure;
- the anchor: the same 10,000 rows selected from the catalog with SQLAlchemy in-process.
Medians of ROUNDS rounds; human-readable results on stderr, JSON figures last.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.brokers import broker_url, have_broker  # noqa: E402
from bench.figures import emit, figure, say  # noqa: E402
from services.broker import free_port  # noqa: E402
from services.cli.stack import Stack, StackConfig  # noqa: E402
from services.db import Database  # noqa: E402
from services.storage.listing import fill_listings  # noqa: E402
from services.storage.tables import volumes  # noqa: E402

VOLUMES = 10_000
ROUNDS = 15
PAGE = 10_000


def fill(catalog: Path, host: str) -> None:
    now = time.time()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "project": "bench",
            "name": f"vol-{i:05d}",
            "pool": "default",
            "host": host,
            "size": 1 << 30,
            "state": "available",
            "seq": 1,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(VOLUMES)
    ]
    db = Database(f"sqlite:///{catalog}")
    try:
        with db.transaction() as conn:
            conn.execute(sa.insert(volumes), rows)
        # Each volume's listing JSON, as a volume created through the service has it.
        while True:
            with db.transaction() as conn:
                if not fill_listings(conn):
                    break
    finally:
        db.close()


def walk(client: httpx.Client, limit: int = PAGE) -> int:
    params: dict[str, str | int] = {"limit": limit}
    seen = 0
    while True:
        page = client.get("/v1/volumes", params=params)
        page.raise_for_status()
        body = page.json()
        seen += len(body["volumes"])
        if "next" not in body:
            return seen
        params["after"] = body["next"]


def parse(body: bytes) -> None:
    json.loads(body)


def page(client: httpx.Client, limit: int) -> None:
    client.get("/v1/volumes", params={"limit": limit}).raise_for_status()


def select_all(db: Database) -> int:
    with db.transaction() as conn:
        return len(
            conn.execute(sa.select(volumes).order_by(volumes.c.project, volumes.c.name)).all()
        )


def ms(fn: object, *args: object) -> float:
    started = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def main() -> int:
    result = measure()
    if result is None:
        return 2
    emit([result])
    return 0


def measure() -> dict[str, object] | None:
    """The storage.list_10k figure (results on stderr); None without a broker."""
    if not have_broker():
        say("no broker: set FLOTILLA_AMQP_URL or `apt-get install -y rabbitmq-server`")
        return None
    with (
        tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp,
        broker_url(Path(tmp), "flotilla-bench-storage") as amqp_url,
    ):
        state = Path(tmp) / "state"
        stack = Stack(
            StackConfig(state_dir=state, amqp_url=amqp_url, listen_port=free_port(), driver="fake")
        )
        say("starting the stack (API, scheduler, storage service, one compute node)")
        stack.start(timeout=120)
        try:
            catalog = state / "storage" / "catalog.db"
            fill(catalog, stack.computes_spec[0].host)
            db = Database(f"sqlite:///{catalog}")
            client = httpx.Client(
                base_url=stack.api_url,
                headers={"Authorization": f"Bearer {stack.admin_token}"},
                timeout=60,
            )
            assert walk(client) == VOLUMES
            assert walk(client, 1000) == VOLUMES
            body = client.get("/v1/volumes", params={"limit": VOLUMES}).content
            times: dict[str, list[float]] = {
                k: [] for k in ("all", "all1000", "page100", "page1000", "parse", "sql")
            }
            for _ in range(ROUNDS):
                times["all"].append(ms(walk, client))
                times["all1000"].append(ms(walk, client, 1000))
                times["parse"].append(ms(parse, body))
                times["page100"].append(ms(page, client, 100))
                times["page1000"].append(ms(page, client, 1000))
                times["sql"].append(ms(select_all, db))
            client.close()
            db.close()
        finally:
            stack.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    say(f"storage.list_10k ({VOLUMES} volumes, {ROUNDS} rounds, medians)")
    for name, label in (
        ("all", f"all through the API (pages of {PAGE})"),
        ("all1000", "all through the API (10 pages of 1000)"),
        ("page1000", "one page of 1000"),
        ("page100", "one page of 100"),
        ("parse", "the client's json.loads of the 10k body"),
        ("sql", "SELECT of every row from the catalog"),
    ):
        say(f"  {label:44s} {med[name]:8.1f} ms  (min {min(times[name]):.1f})")
    return figure(
        "storage.list_10k",
        med["all"],
        "ms",
        anchor="SELECT of the 10k rows from the catalog (SQLAlchemy, in-process)",
        anchor_value=med["sql"],
        target="value <= 50 ms",
        pages_of_1000_ms=round(med["all1000"], 1),
        page_1000_ms=round(med["page1000"], 1),
        page_100_ms=round(med["page100"], 1),
        client_parse_ms=round(med["parse"], 1),
    )


if __name__ == "__main__":
    raise SystemExit(main())
