"""Storage service configuration: a TOML file (`[storage]` table), then environment, then
flags.

| setting | env | default |
|---|---|---|
| amqp_url | FLOTILLA_AMQP_URL | amqp://guest:guest@127.0.0.1:5672/%2F |
| database_url | FLOTILLA_STORAGE_DATABASE_URL | sqlite:////var/lib/flotilla/storage/catalog.db |
| replica | FLOTILLA_STORAGE_REPLICA | `<host name>-<pid>` |
| shared_pools | FLOTILLA_STORAGE_SHARED_POOLS | none (`name=/path,…`: shared pools served here) |
| transfer_listen | FLOTILLA_STORAGE_TRANSFER_LISTEN | 127.0.0.1 (the shared pools' byte streams) |
| transfer_advertise | FLOTILLA_STORAGE_TRANSFER_ADVERTISE | the bound address |
| agent_hosts | FLOTILLA_STORAGE_AGENT_HOSTS | none (more are learned from heartbeats) |
| default_pool | FLOTILLA_STORAGE_DEFAULT_POOL | `default` |
| workers | FLOTILLA_STORAGE_WORKERS | 4 |
| rpc_timeout_s | FLOTILLA_STORAGE_RPC_TIMEOUT_S | 10 (below the API's 30: a silent host is a 503) |
| long_timeout_s | FLOTILLA_STORAGE_LONG_TIMEOUT_S | 900 (clones, wipes) |
| lease_s | FLOTILLA_STORAGE_LEASE_S | 30 |
| reconcile_interval_s | FLOTILLA_STORAGE_RECONCILE_INTERVAL_S | 30 |
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from protos.domain import NAME_PATTERN
from services.settings import ReplicaConfig


class StorageConfig(ReplicaConfig):
    TABLE = "storage"

    database_url: str = "sqlite:////var/lib/flotilla/storage/catalog.db"
    # Shared pools (a directory every replica mounts) whose file work runs in this service.
    shared_pools: dict[str, Path] = {}
    # Hosts whose storage agents are asked for their pools at start (heartbeats add more).
    agent_hosts: tuple[str, ...] = ()
    default_pool: str = Field(default="default", pattern=NAME_PATTERN)
    # Where the shared pools' byte streams listen (compute_node/storage_transfer.py), and
    # the address tickets name (default: the bound address).
    transfer_listen: str = "127.0.0.1"
    transfer_advertise: str = ""
    workers: int = Field(default=4, ge=1, le=64)
    rpc_timeout_s: float = Field(default=10.0, gt=0)
    long_timeout_s: float = Field(default=900.0, gt=0)
    lease_s: float = Field(default=30.0, gt=0)
    reconcile_interval_s: float = Field(default=30.0, gt=0)

    @field_validator("shared_pools", mode="before")
    @classmethod
    def _pools(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            return {name.strip(): path.strip() for name, path in pairs}
        return value

    @field_validator("shared_pools")
    @classmethod
    def _absolute(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            if not path.is_absolute():
                raise ValueError(f"pool {name}: {path} is not an absolute path")
        return value

    @field_validator("agent_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value
