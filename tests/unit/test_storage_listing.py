"""A page of the catalog is read without SQLite's write lock: it neither waits for a writer
nor holds one up (a page of 10,000 takes long enough to matter)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from services.storage.catalog import Catalog
from services.storage.tables import volumes


def _row(name: str) -> dict[str, object]:
    now = time.time()
    return {
        "id": str(uuid.uuid4()),
        "project": "p1",
        "name": name,
        "pool": "default",
        "host": "node-1",
        "size": 512,
        "state": "available",
        "seq": 1,
        "created_at": now,
        "updated_at": now,
    }


def test_a_page_is_read_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}", "r1")
    names: list[str] = []

    def page() -> None:
        names.extend(str(v.name) for v in catalog.page_wire("p1", None, 10, None).volumes)

    reader = threading.Thread(target=page)
    try:
        with catalog.db.transaction() as conn:
            conn.execute(sa.insert(volumes), [_row("a"), _row("b")])
        with catalog.db.transaction() as writer:  # BEGIN IMMEDIATE: the write lock, held
            writer.execute(sa.insert(volumes), [_row("c")])
            started = time.monotonic()
            reader.start()
            reader.join(5)
            waited = time.monotonic() - started
            assert not reader.is_alive(), "the page waited for the writer's lock"
        assert waited < 5
        assert names == ["a", "b"]  # the snapshot before the writer's commit
    finally:
        if reader.is_alive():
            reader.join()
        catalog.close()


def test_a_writer_commits_while_a_read_transaction_is_open(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}", "r1")
    try:
        done = threading.Event()

        def write() -> None:
            with catalog.db.transaction() as conn:
                conn.execute(sa.insert(volumes), [_row("w")])
            done.set()

        with catalog.db.transaction(read_only=True) as reading:
            assert reading.execute(sa.select(sa.func.count()).select_from(volumes)).scalar() == 0
            writer = threading.Thread(target=write)
            writer.start()
            assert done.wait(5), "the writer waited for a reader"
        writer.join()
        assert [v.name for v in catalog.page("p1", None, 10, None).volumes] == ["w"]
    finally:
        catalog.close()
