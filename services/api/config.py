"""API configuration: a TOML or YAML file, then FLOTILLA_API_* environment variables, then flags.

```toml
[api]
listen_host = "127.0.0.1"
listen_port = 8780
database_url = "sqlite:////var/lib/flotilla/api/registry.db"   # or postgresql://…
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2F"

[[api.tokens]]
token = "s3cret-admin"
project = "admin"
role = "admin"

[[api.tokens]]
token = "s3cret-alice"
project = "alice"          # role defaults to member

[api.default_quota]
domains = 10
vcpus = 20
memory_mib = 16384
images = 10                # image names, and image_gib their raw sizes (checked by storage)
image_gib = 50

[api.quotas.alice]
domains = 2

[api.default_volume_quota]   # checked by the storage service
volumes = 20
gib = 500
```

Scalar settings can be overridden by environment: FLOTILLA_API_LISTEN_HOST,
FLOTILLA_API_LISTEN_PORT, FLOTILLA_API_DATABASE_URL, FLOTILLA_AMQP_URL (shared with the other
services), FLOTILLA_API_RPC_TIMEOUT_S, FLOTILLA_API_SCHEDULE_TIMEOUT_S.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from protos.codec import MAX_MESSAGE_BYTES
from protos.domain import NAME_PATTERN, NOT_BOOL_OR_TEXT
from services.bus import BrokerUrls
from services.settings import load_layered


class Role(StrEnum):
    ADMIN = "admin"  # every project's domains, hosts, tokens, quotas
    MEMBER = "member"  # its own project's domains only


class TokenEntry(BaseModel):
    """A bearer token and whom it stands for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token: str = Field(min_length=8, max_length=256)
    project: str = Field(pattern=NAME_PATTERN)
    role: Role = Role.MEMBER


# A quota beyond this is "unlimited" in all but name; it keeps limits within a 32-bit column.
MAX_QUOTA = 2**31 - 1


# The bounds before the validator, so the schema says minimum/maximum (after it, within a
# union, pydantic writes them as unknown `ge`/`le` keywords).
Limit = Annotated[int, Field(ge=0, le=MAX_QUOTA), NOT_BOOL_OR_TEXT]
# Bytes need more than 32 bits (a 64-bit column); 2**53 - 1 (8 PiB) is where JSON numbers
# read as doubles stop being exact, so the schema's bound means the same to every client.
ByteLimit = Annotated[int, Field(ge=0, le=2**53 - 1), NOT_BOOL_OR_TEXT]


class Quota(BaseModel):
    """Limits per project; None means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    domains: Limit | None = None
    vcpus: Limit | None = None
    memory_mib: Limit | None = None
    # What the project's saves, managed saves and snapshots may occupy (allocated bytes).
    snapshot_bytes: ByteLimit | None = None
    # Checked by the storage service: how many image names, and the sum of their raw sizes
    # in GiB (rounded up).
    images: Limit | None = None
    image_gib: Limit | None = None


class VolumeLimits(BaseModel):
    """A project's volume limits (None: unlimited), checked by the storage service: how many
    volumes, and the sum of their sizes in GiB (rounded up)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    volumes: Limit | None = None
    gib: Limit | None = None


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8780, ge=0, le=65535)
    database_url: str = "sqlite:////var/lib/flotilla/api/registry.db"
    # One broker URL, or one per node of a cluster, comma-separated (tried in order).
    amqp_url: BrokerUrls = "amqp://guest:guest@127.0.0.1:5672/%2F"
    tokens: list[TokenEntry] = []
    default_quota: Quota = Quota()
    quotas: dict[str, Quota] = {}
    default_volume_quota: VolumeLimits = VolumeLimits()
    volume_quotas: dict[str, VolumeLimits] = {}
    # Compute-node commands (actions, console, delete) and the scheduler's placement.
    rpc_timeout_s: float = Field(default=30.0, gt=0)
    schedule_timeout_s: float = Field(default=60.0, gt=0)
    schedule_max_attempts: int = Field(default=3, ge=1, le=20)
    # A host whose heartbeat is older than this many of its intervals is `down`.
    host_down_after_intervals: float = Field(default=3.0, gt=0)
    # How long start-up waits for the broker before serving without it (retried meanwhile).
    broker_connect_timeout_s: float = Field(default=5.0, gt=0)
    # Consume domain events (api.events) and heartbeats; off for an API that only reads.
    consume_events: bool = True
    # SSE: how often a stream looks at the shared event log when nothing woke it.
    sse_poll_s: float = Field(default=0.5, gt=0)
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    # Request bodies beyond this are refused (413), well before a bus message's limit; the
    # models bound what a request becomes on the bus (tests/unit/test_limits.py).
    max_body_bytes: int = Field(default=1024 * 1024, ge=4096, le=MAX_MESSAGE_BYTES // 4)

    def quota_for(self, project: str) -> Quota:
        return self.quotas.get(project, self.default_quota)

    def volume_quota_for(self, project: str) -> VolumeLimits:
        return self.volume_quotas.get(project, self.default_volume_quota)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> ApiConfig:
        """File (TOML, or YAML by its .yaml/.yml suffix; an `[api]` table or the top level),
        then environment, then `overrides` (None values are ignored)."""
        return load_layered(cls, path, table="api", env=cls.environment(), overrides=overrides)

    @classmethod
    def environment(cls) -> dict[str, str]:
        """Field → the environment variable that sets it (scalar settings only)."""
        return {
            "listen_host": "FLOTILLA_API_LISTEN_HOST",
            "listen_port": "FLOTILLA_API_LISTEN_PORT",
            "database_url": "FLOTILLA_API_DATABASE_URL",
            "amqp_url": "FLOTILLA_AMQP_URL",
            "rpc_timeout_s": "FLOTILLA_API_RPC_TIMEOUT_S",
            "schedule_timeout_s": "FLOTILLA_API_SCHEDULE_TIMEOUT_S",
        }
