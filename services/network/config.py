"""Network service configuration: a TOML file (`[network]` table), then environment, then flags.

| setting | env | default |
|---|---|---|
| amqp_url | FLOTILLA_AMQP_URL | amqp://guest:guest@127.0.0.1:5672/%2F |
| database_url | FLOTILLA_NETWORK_DATABASE_URL | sqlite:////var/lib/flotilla/network/catalog.db |
| replica | FLOTILLA_NETWORK_REPLICA | `<host name>-<pid>` |
| underlay_mtu | FLOTILLA_NETWORK_UNDERLAY_MTU | 1500 (guests get 50 less: VXLAN) |
| quarantine_s | FLOTILLA_NETWORK_QUARANTINE_S | 300 |
| workers | FLOTILLA_NETWORK_WORKERS | 4 |

Quotas per project (`[network.default_quota]`, `[network.quotas.<project>]`: `networks`,
`ports`), and the shared network made at start-up if missing (`[network.default_network]`:
`name`, `subnet`, `project`), are set in the file.
"""

from __future__ import annotations

from ipaddress import IPv4Network

from pydantic import BaseModel, ConfigDict, Field

from protos.domain import NAME_PATTERN
from services.settings import ReplicaConfig


class NetworkQuota(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    networks: int = Field(default=10, ge=0, le=1_000_000)
    ports: int = Field(default=100, ge=0, le=1_000_000)


class DefaultNetwork(BaseModel):
    """A shared NAT network every project's NICs may use (libvirt's `default`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="default", pattern=NAME_PATTERN)
    subnet: IPv4Network = IPv4Network("192.168.122.0/24")
    project: str = Field(default="admin", pattern=NAME_PATTERN)


class NetworkConfig(ReplicaConfig):
    TABLE = "network"

    database_url: str = "sqlite:////var/lib/flotilla/network/catalog.db"
    # The hosts' underlay MTU; networks that span hosts (VXLAN) get 50 bytes less.
    underlay_mtu: int = Field(default=1500, ge=626, le=65535)
    # A released address is not handed out again for this long.
    quarantine_s: float = Field(default=300.0, ge=0)
    workers: int = Field(default=4, ge=1, le=64)
    default_quota: NetworkQuota = NetworkQuota()
    quotas: dict[str, NetworkQuota] = {}
    default_network: DefaultNetwork | None = None

    def quota_for(self, project: str) -> NetworkQuota:
        return self.quotas.get(project, self.default_quota)

    @classmethod
    def env_fields(cls) -> tuple[str, ...]:
        """The scalar settings (quotas and the default network are set in the file)."""
        return ("amqp_url", "database_url", "replica", "underlay_mtu", "quarantine_s", "workers")
