"""Shared fixtures. The broker comes from, in order: FLOTILLA_AMQP_URL; a testcontainers
RabbitMQ where a Docker engine answers; a private rabbitmq-server node in a temp dir. If none
works, integration tests fail (never skip) with a message saying how to get a broker."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.broker import PrivateCluster
from tests.brokers import (
    BrokerHandle,
    external_broker,
    private_broker,
    testcontainers_broker,
    three_node_cluster,
)

# Tests marked `hwvirt` run in a nested L1 on hosts without vmx/svm (docs/testing.md).
pytest_plugins = ("tests.hwvirt.plugin",)


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    url = os.environ.get("FLOTILLA_AMQP_URL")
    if url:
        yield external_broker(url)
        return
    reasons = []
    with contextlib.ExitStack() as stack:
        try:
            yield stack.enter_context(testcontainers_broker())
            return
        except RuntimeError as exc:
            reasons.append(str(exc))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flotilla-rmq-")))
        try:
            found = stack.enter_context(private_broker(tmp))
        except RuntimeError as exc:
            reasons.append(str(exc))
            pytest.fail(
                "no RabbitMQ broker for the integration tests: set FLOTILLA_AMQP_URL, run a "
                "Docker engine, or `apt-get install -y rabbitmq-server`.\n" + "\n".join(reasons),
                pytrace=False,
            )
        yield found


@pytest.fixture(scope="session")
def amqp_url(broker: BrokerHandle) -> str:
    return broker.url


@pytest.fixture(scope="session")
def broker_cluster() -> Iterator[PrivateCluster]:
    """Three private RabbitMQ nodes clustered on loopback, formed once for the session and
    shared by the cluster tests and the chaos suite (which works in a vhost of its own). A
    user that kills a node restarts it and waits for it to rejoin before it returns."""
    try:
        with three_node_cluster() as cluster:
            yield cluster
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server URL: FLOTILLA_TEST_PG_URL or a private cluster (tests/pg.py)."""
    from tests.pg import server_url

    try:
        with server_url() as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
