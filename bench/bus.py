"""services.bus against raw pika on the same broker, in one run.

    python bench/bus.py            # private rabbitmq-server node, or FLOTILLA_AMQP_URL

RPC round trip (1,000 calls a round, p50/p99), the server in a process of its own as in a
deployment: raw pika BlockingConnection + direct reply-to against a raw echo server, doing the
same AMQP work ours does (persistent, mandatory, to a durable quorum queue), versus `Bus.call`
to a `ServiceRunner`. Confirmed publishing (20,000 messages of ~256 bytes, 1000 in flight, to
a quorum queue): raw pika SelectConnection with async confirms and the same AMQP properties
ours set, versus `Bus.publish_event_async`. Each figure is the median of 5 interleaved rounds.
Ends with one JSON line per figure.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.synchronize import Event
from pathlib import Path

import pika
import pika.channel
import pika.frame

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import emit, figure
from protos import routing
from protos.commands import GetDomainInfo
from protos.domain import PowerState
from protos.events import DomainStarted, StartedDetail
from protos.replies import DomainInfo
from services.broker import PrivateBroker
from services.bus import Bus, Context, Service, ServiceRunner, handles
from services.bus.topology import QueueDecl

RPC_CALLS = 1000
PUBLISH_COUNT = 20_000
IN_FLIGHT = 1000
ROUNDS = 5
PAYLOAD = b"x" * 256


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- RPC ------------------------------------------------------------------------------------


def _raw_echo_server(url: str, queue: str, ready: Event, stop: Event) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()

    def on_request(
        c: pika.adapters.blocking_connection.BlockingChannel,
        method: pika.spec.Basic.Deliver,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        c.basic_publish(
            "", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id)
        )
        c.basic_ack(method.delivery_tag)

    ch.basic_qos(prefetch_count=32)
    ch.basic_consume(queue, on_request)
    ready.set()
    while not stop.is_set():
        conn.process_data_events(time_limit=0.1)
    conn.close()


def raw_rpc(url: str) -> list[float]:
    queue = f"bench.raw-rpc.{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    # The same kind of queue our command queues are: durable, quorum.
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    server = multiprocessing.Process(target=_raw_echo_server, args=(url, queue, ready, stop))
    server.start()
    ready.wait(30)
    replies: dict[str, bytes] = {}

    def on_reply(_c: object, _m: object, props: pika.BasicProperties, body: bytes) -> None:
        replies[props.correlation_id] = body

    ch.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
    samples = []
    for _ in range(RPC_CALLS + 100):
        cid = str(uuid.uuid4())
        start = time.perf_counter()
        ch.basic_publish(
            "",
            queue,
            PAYLOAD,
            pika.BasicProperties(
                reply_to="amq.rabbitmq.reply-to", correlation_id=cid, delivery_mode=2
            ),
            mandatory=True,
        )
        while cid not in replies:
            conn.process_data_events(time_limit=None)
        samples.append(time.perf_counter() - start)
        del replies[cid]
    stop.set()
    server.join(10)
    ch.queue_delete(queue)
    conn.close()
    return samples[100:]


class _Info(Service):
    name = "bench-info"

    @handles(GetDomainInfo)
    def info(self, cmd: GetDomainInfo, _ctx: Context) -> DomainInfo:
        return DomainInfo(
            domain_id=cmd.domain_id,
            name="bench",
            host="h",
            state=PowerState.RUNNING,
            vcpus=1,
            memory_mib=64,
            seq=1,
        )


def _our_server(url: str, queue: str, ready: Event, stop: Event) -> None:
    with Bus(url, source="bench-server") as server:
        runner = ServiceRunner(server, _Info(), queue=queue).start()
        ready.set()
        stop.wait()
        runner.stop()


def our_rpc(url: str) -> list[float]:
    queue = f"bench-rpc-{uuid.uuid4().hex[:6]}"
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    server = multiprocessing.Process(target=_our_server, args=(url, queue, ready, stop))
    server.start()
    ready.wait(30)
    client = Bus(url, source="bench-client").start()
    command = GetDomainInfo(domain_id=uuid.uuid4())
    samples = []
    try:
        for _ in range(RPC_CALLS + 100):
            start = time.perf_counter()
            client.call(queue, command, timeout=10)
            samples.append(time.perf_counter() - start)
    finally:
        client.close()
        stop.set()
        server.join(10)
    _delete_queue(url, queue)
    return samples[100:]


# ---- confirmed publishing ---------------------------------------------------------------------


def _bench_queue(url: str, key: str) -> str:
    name = f"bench.publish.{uuid.uuid4().hex[:6]}"
    bus = Bus(url, source="bench-setup").start()
    bus.declare(QueueDecl(name, kind="events", patterns=(key,)))
    bus.close()
    return name


def _delete_queue(url: str, name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(name)
    conn.close()


def raw_publish(url: str, key: str) -> float:
    """Messages/s with async confirms, IN_FLIGHT outstanding, on a SelectConnection, each
    message with the same AMQP properties ours carry (content type, message id, type,
    timestamp, persistent), so the anchor does the same protocol work."""
    state = {"sent": 0, "acked": 0, "start": 0.0, "end": 0.0}

    def on_open(conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch: pika.channel.Channel) -> None:
        ch.confirm_delivery(lambda f: on_confirm(ch, f), callback=lambda _f: start(ch))

    def start(ch: pika.channel.Channel) -> None:
        state["start"] = time.perf_counter()
        fill(ch)

    def fill(ch: pika.channel.Channel) -> None:
        while state["sent"] < PUBLISH_COUNT and state["sent"] - state["acked"] < IN_FLIGHT:
            props = pika.BasicProperties(
                content_type="application/msgpack",
                message_id=str(uuid.uuid4()),
                type="domain.started",
                timestamp=int(time.time()),
                delivery_mode=2,
            )
            ch.basic_publish(routing.EVENTS_EXCHANGE, key, PAYLOAD, props)
            state["sent"] += 1

    def on_confirm(ch: pika.channel.Channel, frame: pika.frame.Method) -> None:
        tag = frame.method.delivery_tag
        state["acked"] = tag if frame.method.multiple else max(state["acked"], tag)
        if state["acked"] >= PUBLISH_COUNT:
            state["end"] = time.perf_counter()
            ch.connection.close()
            return
        fill(ch)

    conn = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=on_open,
        on_close_callback=lambda c, _r: c.ioloop.stop(),
    )
    conn.ioloop.start()
    return PUBLISH_COUNT / (state["end"] - state["start"])


def our_publish(url: str, key_id: str) -> float:
    bus = Bus(url, source="bench-pub").start()
    window = threading.Semaphore(IN_FLIGHT)
    done = threading.Event()
    acked = [0]
    lock = threading.Lock()
    event = DomainStarted(
        domain_id=uuid.UUID(key_id),
        name="bench-" + "x" * 120,
        host="bench-host",
        seq=1,
        state=PowerState.RUNNING,
        detail=StartedDetail.BOOTED,
    )

    def confirmed(_f: object) -> None:
        window.release()
        with lock:
            acked[0] += 1
            if acked[0] == PUBLISH_COUNT:
                done.set()

    start = time.perf_counter()
    for _ in range(PUBLISH_COUNT):
        window.acquire()
        future, _ = bus.publish_event_async(event)
        future.add_done_callback(confirmed)
    done.wait(120)
    elapsed = time.perf_counter() - start
    bus.close()
    return PUBLISH_COUNT / elapsed


def main() -> int:
    url = os.environ.get("FLOTILLA_AMQP_URL")
    node = None
    if not url:
        node = PrivateBroker(Path(tempfile.mkdtemp(prefix="flotilla-bench-")), name="bench")
        node.start()
        url = node.url
    try:
        rpc_raw_p50, rpc_raw_p99, rpc_our_p50, rpc_our_p99 = [], [], [], []
        pub_raw, pub_our = [], []
        key_id = str(uuid.uuid4())
        key = routing.event_key("domain", "started", key_id)
        for round_no in range(ROUNDS):
            raw = raw_rpc(url)
            ours = our_rpc(url)
            rpc_raw_p50.append(percentile(raw, 0.5))
            rpc_raw_p99.append(percentile(raw, 0.99))
            rpc_our_p50.append(percentile(ours, 0.5))
            rpc_our_p99.append(percentile(ours, 0.99))
            queue = _bench_queue(url, key)
            pub_raw.append(raw_publish(url, key))
            _delete_queue(url, queue)
            queue = _bench_queue(url, key)
            pub_our.append(our_publish(url, key_id))
            _delete_queue(url, queue)
            print(
                f"round {round_no + 1}: rpc p50 raw {rpc_raw_p50[-1] * 1e6:.0f} us, ours "
                f"{rpc_our_p50[-1] * 1e6:.0f} us; publish raw {pub_raw[-1]:.0f}/s, ours "
                f"{pub_our[-1]:.0f}/s",
                file=sys.stderr,
            )
    finally:
        if node is not None:
            node.stop()
    med = statistics.median
    figures = [
        figure(
            "bus.rpc_p50",
            med(rpc_our_p50) * 1e6,
            "us",
            anchor="raw-pika",
            anchor_value=med(rpc_raw_p50) * 1e6,
            target="ratio <= 1.5",
        ),
        figure(
            "bus.rpc_p99",
            med(rpc_our_p99) * 1e6,
            "us",
            anchor="raw-pika",
            anchor_value=med(rpc_raw_p99) * 1e6,
            target="report",
        ),
        figure(
            "bus.publish_confirmed",
            med(pub_our),
            "msg/s",
            anchor="raw-pika-async-confirms",
            anchor_value=med(pub_raw),
            target="ratio >= 0.7",
        ),
    ]
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
