"""Layered settings for every Flotilla service: a file, then environment variables, then flags.

Each service's config model names its file table (`[compute]`, `[scheduler]`, `[api]`) and
which environment variable feeds which field; `load_layered` applies the layers in that order
(a later layer wins; flags given as None are ignored) and validates once. The replicated
services (scheduler, network, storage) share `ReplicaConfig`: a broker, a replica name and
the naming of their variables.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.bus import BrokerUrls

M = TypeVar("M", bound=BaseModel)


def read_table(path: Path, table: str) -> dict[str, Any]:
    """The `table` of a TOML file (or YAML, by its .yaml/.yml suffix), or its top level."""
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
    else:
        with path.open("rb") as f:
            data = tomllib.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table at the top level")  # noqa: TRY004  (bad input, as pydantic's errors)
    section = data.get(table, data)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: [{table}] is not a table")  # noqa: TRY004
    return section


def load_layered(
    model: type[M],
    path: Path | None,
    *,
    table: str,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> M:
    """`model` from `path`'s `table`, then the variables in `env` (field → variable name),
    then `overrides` whose value is not None."""
    values: dict[str, Any] = {} if path is None else dict(read_table(path, table))
    for field, variable in env.items():
        value = os.environ.get(variable)
        if value is not None:
            values[field] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return model.model_validate(values)


def default_replica() -> str:
    """`<short host name>-<pid>`: distinct among the replicas of a service."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


class ReplicaConfig(BaseModel):
    """What every replicated service's settings have: its broker(s) and its replica name,
    read from the file's `[TABLE]` table, then FLOTILLA_AMQP_URL and
    FLOTILLA_<TABLE>_<FIELD> for each of `env_fields`, then flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    TABLE: ClassVar[str]

    # One broker URL, or one per node of a cluster, comma-separated (tried in order).
    amqp_url: BrokerUrls = "amqp://guest:guest@127.0.0.1:5672/%2F"
    replica: str = Field(default_factory=default_replica, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Self:
        """File (if given), then environment, then `overrides` (None values are ignored)."""
        return load_layered(cls, path, table=cls.TABLE, env=cls.environment(), overrides=overrides)

    @classmethod
    def env_fields(cls) -> tuple[str, ...]:
        """The fields the environment may set (default: all of them)."""
        return tuple(cls.model_fields)

    @classmethod
    def environment(cls) -> dict[str, str]:
        """Field → the environment variable that sets it."""
        prefix = f"FLOTILLA_{cls.TABLE.upper()}_"
        return {
            name: "FLOTILLA_AMQP_URL" if name == "amqp_url" else prefix + name.upper()
            for name in cls.env_fields()
        }
