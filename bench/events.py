"""A domain event's latency from the guest to an outside subscriber, on real KVM and a real broker.

    python bench/events.py        # private rabbitmq-server node, or FLOTILLA_AMQP_URL

The compute node runs as `flotilla-compute` in a process of its own (as in bench/compute.py)
with a temp state dir; the outside subscriber is plain pika (a `BlockingConnection` on a thread
of its own, an exclusive queue bound to `domain.shutdown.*`, `domain.stopped.*` and the
anchor's key), as any consumer of the events exchange would be.

- events.guest_to_subscriber_p50: the test guest (`ready echo`) is started, then asked to power
  off (`ShutdownDomain`, ctrl-alt-del, `wait=False`: the guest itself writes ACPI S5; the
  next start waits for `domain.stopped`); the VMM stamps the power-off in its journal record
  (`ts`, wall clock, taken when the VMM reads the machine's event); the figure is that stamp
  to the subscriber's receipt of `domain.shutdown`.
  GUESTS power-offs a round, ROUNDS interleaved rounds, the median of the rounds' p50s.
- Anchor, measured in the same rounds on the same broker and at the same cadence as the
  events: raw pika one-way latency, a `BlockingConnection` publishing a persistent message
  to `flotilla.events` (time.time() just before `basic_publish`) to the same subscriber's
  receipt, one message in each power-off's cycle (after the guest is up, 20 ms before the
  power-off is asked), p50 of the round. A message after an idle stretch takes ~2 x as long
  as one in a back-to-back stream (0.66-0.82 against 0.33-0.37 ms here, CPUs and the
  broker's schedulers asleep), and an event comes after one: the back-to-back figure, RAW
  messages 2 ms apart as this bench took it first, is printed beside it
  (`back_to_back_anchor_value`, `back_to_back_ratio`).

Hops, from the same samples (to stderr and in the figure's `hops`): the VMM's stamp to the
event's envelope `ts` (journal write and fsync, the frame to the worker, the worker's record
read and translation: the envelope is made inside the store's transaction) and the envelope
`ts` to receipt (the store's commit, the outbox's wake-up, the publish, the broker, the
delivery). The fsync costs of the state dir's file system are measured beside them (a
journal-sized append + fsync, and a one-row SQLite commit under synchronous FULL and NORMAL).
Ends with one JSON line per figure.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgpack
import pika
import pika.adapters.blocking_connection
import pika.spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compute import Node, broker, call, make_spec, percentile
from bench.figures import emit, figure, say
from compute_node.vmm import client as vmm_client
from compute_node.vmm.frames import JOURNAL
from native import kvm_unavailable_reason, testguest
from protos import routing
from protos.codec import decode
from protos.commands import DefineDomain, ShutdownDomain, StartDomain, UndefineDomain
from services.bus import Bus

GUESTS = 15
RAW = 100
ROUNDS = 5
ANCHOR_KEY = "bench.oneway.anchor"
KEYS = ("domain.shutdown.*", "domain.stopped.*", ANCHOR_KEY)
FSYNC_SAMPLES = 50
TIMEOUT_S = 20.0


class Subscriber:
    """An outside pika consumer: receipt time (wall clock) of every message, by routing key."""

    def __init__(self, url: str, keys: tuple[str, ...] = KEYS) -> None:
        self._url = url
        self._keys = keys
        self._cond = threading.Condition()
        self.got: list[tuple[str, float, bytes]] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="subscriber", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise SystemExit("bench/events: subscriber did not start")

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self._url))
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        for key in self._keys:
            ch.queue_bind(queue, routing.EVENTS_EXCHANGE, key)

        def on_message(
            _ch: pika.adapters.blocking_connection.BlockingChannel,
            method: pika.spec.Basic.Deliver,
            _props: pika.spec.BasicProperties,
            body: bytes,
        ) -> None:
            now = time.time()
            with self._cond:
                self.got.append((method.routing_key or "", now, body))
                self._cond.notify_all()

        ch.basic_consume(queue, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()

    def wait(self, key: str, after: int, timeout: float = TIMEOUT_S) -> tuple[float, bytes, int]:
        """The first message on `key` at index >= `after`: (receipt, body, its index)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.got)):
                    if self.got[i][0] == key:
                        return self.got[i][1], self.got[i][2], i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"bench/events: nothing on {key} in {timeout:.0f} s")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def raw_once(ch: pika.adapters.blocking_connection.BlockingChannel, sub: Subscriber) -> float:
    """One raw persistent publish to the subscriber's receipt (s)."""
    mark = len(sub.got)
    sent = time.time()
    ch.basic_publish(
        routing.EVENTS_EXCHANGE,
        ANCHOR_KEY,
        msgpack.packb({"sent": sent}),
        pika.BasicProperties(
            content_type="application/msgpack",
            message_id=str(uuid.uuid4()),
            delivery_mode=2,
        ),
    )
    received, _, _ = sub.wait(ANCHOR_KEY, mark)
    return received - sent


def raw_one_way(url: str, sub: Subscriber) -> list[float]:
    """RAW raw messages back to back (2 ms apart)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    samples = []
    try:
        for _ in range(RAW):
            samples.append(raw_once(ch, sub))
            time.sleep(0.002)
    finally:
        conn.close()
    return samples


def power_offs(
    bus: Bus,
    node: Node,
    sub: Subscriber,
    guest: Path,
    *,
    each_cycle: Callable[[], None] | None = None,
) -> list[tuple[float, float]]:
    """GUESTS starts and guest power-offs of one domain: (stamp→receipt, envelope ts→receipt);
    `each_cycle` is called once the guest is up, 20 ms before its power-off is asked."""
    spec = make_spec(guest)
    spec = spec.model_copy(update={"boot": spec.boot.model_copy(update={"cmdline": "ready echo"})})
    call(bus, node.queue, DefineDomain(spec=spec))
    key = routing.event_key("domain", "shutdown", str(spec.uuid))
    stopped = routing.event_key("domain", "stopped", str(spec.uuid))
    journal = node.state_dir / "domains" / str(spec.uuid) / JOURNAL
    samples = []
    try:
        for _ in range(GUESTS):
            call(bus, node.queue, StartDomain(domain_id=spec.uuid))
            time.sleep(0.02)  # the guest reaches its input loop
            if each_cycle is not None:
                each_cycle()
                time.sleep(0.02)  # as idle again as the power-off's cycle was before
            mark = len(sub.got)
            # wait=False: nothing but the guest's own power-off runs in the worker meanwhile.
            bus.call(node.queue, ShutdownDomain(domain_id=spec.uuid, wait=False), timeout=30)
            received, body, at = sub.wait(key, mark)
            sub.wait(stopped, at)
            stamp = next(
                r["ts"]
                for r in reversed(vmm_client.read_journal(journal))
                if r["kind"] == "shutdown"
            )
            samples.append((received - stamp, received - decode(body).ts))
    finally:
        bus.call(node.queue, UndefineDomain(domain_id=spec.uuid), timeout=30)
    return samples


def fsync_costs(directory: Path) -> dict[str, float]:
    """Medians in ms: a journal-sized append + fsync; a one-row commit, FULL and NORMAL."""
    out: dict[str, float] = {}
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    samples = []
    for _ in range(FSYNC_SAMPLES):
        begin = time.perf_counter()
        os.write(fd, b"r" * 80)
        os.fsync(fd)
        samples.append(time.perf_counter() - begin)
    os.close(fd)
    out["journal_append_fsync_ms"] = statistics.median(samples) * 1e3
    for mode in ("FULL", "NORMAL"):
        db = sqlite3.connect(directory / f"probe-{mode}.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={mode}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        samples = []
        for _ in range(FSYNC_SAMPLES):
            begin = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (b"e" * 300,))
            db.execute("COMMIT")
            samples.append(time.perf_counter() - begin)
        db.close()
        out[f"sqlite_commit_{mode.lower()}_ms"] = statistics.median(samples) * 1e3
    return out


def main() -> int:
    reason = kvm_unavailable_reason()
    if reason is not None:
        say(f"bench/events: no usable /dev/kvm: {reason}")
        return 2
    guest = testguest.build()
    with broker() as url, tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        bus = Bus(url, source="bench-client").start()
        node = Node(url, state_dir)
        sub = Subscriber(url)
        try:
            node.wait_serving(bus)
            power_offs(bus, node, sub, guest)  # warm-up: page cache, first imports
            ours, to_env, from_env, raw, back_to_back = [], [], [], [], []
            with pika.BlockingConnection(pika.URLParameters(url)) as raw_conn:
                raw_ch = raw_conn.channel()
                for round_no in range(ROUNDS):
                    same_cadence: list[float] = []

                    def raw_in_cycle(into: list[float] = same_cadence) -> None:
                        into.append(raw_once(raw_ch, sub))

                    got = power_offs(bus, node, sub, guest, each_cycle=raw_in_cycle)
                    ours.append(percentile([g[0] for g in got], 0.5))
                    from_env.append(percentile([g[1] for g in got], 0.5))
                    to_env.append(percentile([g[0] - g[1] for g in got], 0.5))
                    raw.append(percentile(same_cadence, 0.5))
                    back_to_back.append(percentile(raw_one_way(url, sub), 0.5))
                    say(
                        f"round {round_no + 1}: guest->subscriber p50 {ours[-1] * 1e3:.2f} ms "
                        f"(stamp->envelope {to_env[-1] * 1e3:.2f}, envelope->receipt "
                        f"{from_env[-1] * 1e3:.2f}), p99 "
                        f"{percentile([g[0] for g in got], 0.99) * 1e3:.2f} ms; raw one-way p50 "
                        f"{raw[-1] * 1e3:.2f} ms at the events' cadence, "
                        f"{back_to_back[-1] * 1e3:.2f} ms back to back"
                    )
            costs = fsync_costs(Path(tmp))
            say("fsync costs here: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
        finally:
            sub.close()
            bus.close()
            node.stop()
    med = statistics.median
    value, anchor_value = med(ours) * 1e3, med(raw) * 1e3
    hot = med(back_to_back) * 1e3
    hops = {
        "stamp_to_envelope_ms": round(med(to_env) * 1e3, 3),
        "envelope_to_receipt_ms": round(med(from_env) * 1e3, 3),
        **{k: round(v, 3) for k, v in costs.items()},
    }
    emit(
        [
            figure(
                "events.guest_to_subscriber_p50",
                value,
                "ms",
                anchor="raw-pika-one-way-same-cadence",
                anchor_value=anchor_value,
                target="value <= 3 ms and ratio <= 3",
                met=value <= 3.0 and value <= 3 * anchor_value,
                back_to_back_anchor_value=round(hot, 3),
                back_to_back_ratio=round(value / hot, 4),
                hops=hops,
            )
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
