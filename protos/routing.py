"""Exchange, queue and routing-key names: the one place they are spelled."""

from __future__ import annotations

import re

COMMANDS_EXCHANGE = "flotilla.commands"  # direct: routing key = queue name
EVENTS_EXCHANGE = "flotilla.events"  # topic: <entity>.<event>.<entity_id>
DEAD_EXCHANGE = "flotilla.dead"  # fanout to the dead-letter queue
DEAD_QUEUE = "flotilla.dead"

SCHEDULER_QUEUE = "scheduler"
NETWORK_QUEUE = "network"
STORAGE_QUEUE = "storage"
SERVICE_QUEUES = (SCHEDULER_QUEUE, NETWORK_QUEUE, STORAGE_QUEUE)

# A poison command is dead-lettered by the broker after this many deliveries.
DELIVERY_LIMIT = 5

_WORD = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_PART = re.compile(r"^[A-Za-z0-9_.:-]+$")

REASON_HEADER = "x-flotilla-reason"
QUEUE_HEADER = "x-flotilla-queue"


def compute_queue(host: str) -> str:
    """The command queue of the compute node on `host`."""
    if not _KEY_PART.match(host) or "." in host:
        raise ValueError(f"bad host name {host!r}")
    return f"compute.{host}"


def storage_queue(host: str) -> str:
    """The command queue of the storage agent on `host` (file work on its pools)."""
    if not _KEY_PART.match(host) or "." in host:
        raise ValueError(f"bad host name {host!r}")
    return f"storage.{host}"


def service_event_queue(service: str) -> str:
    """The durable queue a service's event handlers consume from."""
    return f"{service}.events"


def event_key(entity: str, event: str, entity_id: str) -> str:
    """`<entity>.<event>.<entity_id>`, e.g. `domain.started.<uuid>`."""
    for part in (entity, event):
        if not _WORD.match(part):
            raise ValueError(f"bad routing word {part!r}")
    if not _KEY_PART.match(entity_id) or "." in entity_id:
        raise ValueError(f"bad entity id {entity_id!r}")
    return f"{entity}.{event}.{entity_id}"


def network_ports_key(event: str, network_id: str) -> str:
    """`netport.<event>.<network_id>`: a port event as routed by its network (its second
    routing key, beside `port.<event>.<port_id>`)."""
    return event_key("netport", event, network_id)


def network_ports_pattern(network_id: str) -> str:
    """What a host's port queue is bound by for each network it carries: every port event
    of that network."""
    network_ports_key("bound", network_id)  # checks the id
    return f"netport.*.{network_id}"


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching (`*` one word, `#` zero or more), for local filtering."""
    return _match(pattern.split("."), key.split("."))


def _match(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])
