"""Layered settings for every Flotilla service: a file, then environment variables, then flags.

Each service's config model names its file table (`[compute]`, `[scheduler]`, `[api]`) and
which environment variable feeds which field; `load_layered` applies the layers in that order
(a later layer wins; flags given as None are ignored) and validates once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

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
