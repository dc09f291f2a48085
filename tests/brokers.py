"""Ways to get a RabbitMQ for tests, each a context manager yielding a `BrokerHandle`."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from protos import routing
from services.broker import BrokerError, PrivateBroker, PrivateCluster, available


@dataclass
class BrokerHandle:
    url: str
    kind: str
    close_all_connections: Callable[[], None]


def external_broker(url: str) -> BrokerHandle:
    """A broker named by URL; connections are force-closed through its management API
    (FLOTILLA_AMQP_MGMT_URL, default http://<host>:15672)."""
    parsed = urllib.parse.urlparse(url)
    mgmt = os.environ.get("FLOTILLA_AMQP_MGMT_URL", f"http://{parsed.hostname}:15672")
    user, password = parsed.username or "guest", parsed.password or "guest"

    def close_all() -> None:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers = {"Authorization": f"Basic {auth}"}
        req = urllib.request.Request(f"{mgmt}/api/connections", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            connections = json.load(resp)
        for conn in connections:
            name = urllib.parse.quote(conn["name"], safe="")
            delete = urllib.request.Request(
                f"{mgmt}/api/connections/{name}", headers=headers, method="DELETE"
            )
            with contextlib.suppress(OSError):
                urllib.request.urlopen(delete, timeout=10).close()

    return BrokerHandle(url, "external", close_all)


@contextlib.contextmanager
def testcontainers_broker() -> Iterator[BrokerHandle]:
    """A RabbitMQ container; RuntimeError if no Docker engine answers."""
    try:
        from docker.errors import DockerException
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError as exc:
        raise RuntimeError(f"testcontainers unavailable: {exc}") from None
    # The container reads RABBITMQ_* from the environment: keep a private node's out of it.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RABBITMQ_")}
    try:
        container = RabbitMqContainer("rabbitmq:3.13-management")
    except DockerException as exc:
        raise RuntimeError(f"no Docker engine: {exc}") from None
    finally:
        os.environ.update(saved)
    with container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        url = f"amqp://guest:guest@{host}:{port}/%2F"

        def close_all() -> None:
            container.exec(["rabbitmqctl", "close_all_connections", "test"])

        yield BrokerHandle(url, "testcontainers", close_all)


@contextlib.contextmanager
def private_broker(base: Path) -> Iterator[BrokerHandle]:
    """A private rabbitmq-server node under `base`; RuntimeError if it cannot start."""
    node = PrivateBroker(base, name="flotilla-test")
    try:
        node.start()
    except (BrokerError, OSError) as exc:
        node.stop()
        raise RuntimeError(f"private rabbitmq-server node failed: {exc}") from None
    try:
        yield BrokerHandle(node.url, "private", node.close_all_connections)
    finally:
        node.stop()


@contextlib.contextmanager
def three_node_cluster() -> Iterator[PrivateCluster]:
    """Three private rabbitmq-server nodes clustered on loopback, in a temp dir removed after;
    RuntimeError if they cannot be formed. Forming one takes 30-60 s on a 2-core host, so the
    session forms it once (the `broker_cluster` fixture) for every test that needs one."""
    if not available():
        raise RuntimeError("rabbitmq-server is not installed: `apt-get install -y rabbitmq-server`")
    base = Path(tempfile.mkdtemp(prefix="flotilla-cluster-"))
    cluster = PrivateCluster(base, 3, name="flotilla-ct")
    try:
        try:
            cluster.start(timeout=180)
        except (BrokerError, OSError) as exc:
            raise RuntimeError(f"private three-node cluster failed: {exc}") from None
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def cluster_vhost(cluster: PrivateCluster, prefix: str) -> Iterator[str]:
    """A virtual host of its own on a shared cluster, for one user of it: its queues and
    exchanges are apart from every other test's (a scheduler queue, `api.events`, heartbeats
    left behind are not seen). Yields the URL list (every node, node 0 first) in the form
    `amqp_url` settings take; the vhost and everything in it is deleted after."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    first = cluster.nodes[0]
    first.ctl("add_vhost", name)
    try:
        first.ctl("set_permissions", "-p", name, first.user, ".*", ".*", ".*")
        vhost = urllib.parse.quote(name, safe="")
        yield ",".join(
            f"amqp://{n.user}:{n.password}@127.0.0.1:{n.port}/{vhost}" for n in cluster.nodes
        )
    finally:
        with contextlib.suppress(BrokerError):
            cluster.nodes[1].ctl("delete_vhost", name, timeout=60)


STORAGE_EVENTS = routing.service_event_queue("storage")
API_EVENTS = routing.service_event_queue("api")


def purge_queues(amqp_url: str, *queues: str) -> None:
    """Empty `queues` where they exist, for a test's fresh services on the session's broker.

    Service event queues (`<service>.events`) are durable and shared by every replica, so on a
    shared broker they keep what earlier tests' hosts sent after those tests' services stopped.
    A storage service that starts on a backlog of heartbeats asks each gone host's agent for its
    pools and waits out its RPC timeout (30 s) per host, in the test and again in its stop; an
    API logs every domain event it finds there (thousands after the scale test)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url.split(",", maxsplit=1)[0]))
    try:
        for queue in queues:
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:  # not declared yet: nothing to purge
                    raise
                continue
            channel.close()
    finally:
        conn.close()


def find_dead_letter(
    amqp_url: str, match: Any, timeout: float = 10
) -> tuple[pika.BasicProperties, bytes]:
    """Take the dead letter that `match(props, body)` picks from the dead-letter queue;
    others are put back."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = []
            found = None
            while True:
                method, props, body = ch.basic_get(routing.DEAD_QUEUE)
                if method is None:
                    break
                seen.append(method.delivery_tag)
                if found is None and props.headers and match(props, body):
                    found = (props, body)
                    ch.basic_ack(method.delivery_tag)
                    seen.pop()
            for tag in seen:
                ch.basic_nack(tag, requeue=True)
            if found is not None:
                return found
            time.sleep(0.2)
    finally:
        conn.close()
    raise AssertionError("dead letter not found")
