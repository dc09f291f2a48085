"""Commands carry an expiry their sender sets (the envelope's `expires_at`): a start that waited
in a stopped node's durable queue past it is not run when the node comes back, but
dead-lettered with reason `expired`; a resend with the same message id and a fresh expiry
runs (the expired copy left no answer on record).

Before the expiry, the start ran whenever the node came back, minutes after its caller gave
up and maybe placed the domain elsewhere.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from compute_node.config import ComputeConfig
from compute_node.fake import FakeDriver
from compute_node.node import ComputeNode
from protos import routing
from protos.codec import decode
from protos.commands import DefineDomain, GetDomainInfo, StartDomain
from protos.domain import DomainSpec, PowerState
from protos.replies import DomainInfo
from services.bus import Bus, RpcTimeout
from tests.bootfiles import BOOT_DIR, KERNEL
from tests.brokers import find_dead_letter

pytestmark = pytest.mark.integration


def _node(amqp_url: str, tmp_path: Path, host: str) -> ComputeNode:
    config = ComputeConfig(
        host=host,
        state_dir=tmp_path / host,
        amqp_url=amqp_url,
        driver="fake",
        allowed_boot_dirs=[BOOT_DIR],
        heartbeat_interval_s=0.5,
    )
    return ComputeNode(config, FakeDriver()).start()


def test_a_start_that_waited_past_its_expiry_is_dead_lettered_not_run(
    amqp_url: str, make_bus: Callable[..., Bus], tmp_path: Path
) -> None:
    host = f"exp-{uuid.uuid4().hex[:6]}"
    queue = routing.compute_queue(host)
    bus = make_bus()
    node = _node(amqp_url, tmp_path, host)
    try:
        spec = DomainSpec.model_validate(
            {"name": f"exp-{uuid.uuid4().hex[:6]}", "memory_mib": 32, "boot": {"kernel": KERNEL}}
        )
        bus.call(queue, DefineDomain(spec=spec, privileged=True), timeout=20)
        node.stop()  # its queue keeps what is sent meanwhile

        start_id = str(uuid.uuid4())
        with pytest.raises(RpcTimeout):
            bus.call(
                queue,
                StartDomain(domain_id=spec.uuid),
                timeout=1.0,
                message_id=start_id,
                expires=True,
            )
        time.sleep(0.5)  # well past its expiry
        node = _node(amqp_url, tmp_path, host)

        def is_the_start(props: Any, body: bytes) -> bool:
            return bool(props.message_id == start_id)

        props, body = find_dead_letter(amqp_url, is_the_start, timeout=20)
        assert props.headers[routing.REASON_HEADER] == "expired"
        assert props.headers[routing.QUEUE_HEADER] == queue
        assert decode(body).expires_at is not None
        info = bus.call(queue, GetDomainInfo(domain_id=spec.uuid), timeout=20)
        assert isinstance(info, DomainInfo)
        assert (info.state, info.seq) == (PowerState.SHUTOFF, 1), "the expired start ran"

        # The caller sends it again with the same id: a fresh expiry, and it runs once.
        info = bus.call(
            queue,
            StartDomain(domain_id=spec.uuid),
            timeout=20,
            message_id=start_id,
            expires=True,
        )
        assert isinstance(info, DomainInfo)
        assert (info.state, info.seq) == (PowerState.RUNNING, 2)
    finally:
        node.stop()
