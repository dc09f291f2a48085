"""Hypothesis strategies that build any Flotilla message from its pydantic fields."""

from __future__ import annotations

import enum
import ipaddress
import types
import typing
import uuid
from typing import Any

import annotated_types
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


def _constraints(info: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for meta in info.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length", "pattern"):
            value = getattr(meta, name, None)
            if value is not None:
                found[name] = value
        if isinstance(meta, annotated_types.MaxLen):
            found["max_length"] = meta.max_length
    return found


def for_annotation(tp: Any, info: FieldInfo | None = None) -> st.SearchStrategy[Any]:
    c = _constraints(info) if info is not None else {}
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base = typing.get_args(tp)[0]
        merged = FieldInfo.from_annotation(tp)
        return for_annotation(base, merged)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_annotation(a, info) for a in typing.get_args(tp)))
    if tp is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_dicts(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        lo = c.get("ge", c["gt"] + 1 if "gt" in c else -(2**40))
        hi = c.get("le", c["lt"] - 1 if "lt" in c else 2**40)
        if "multiple_of" in c:
            step = c["multiple_of"]
            return st.integers(-(-lo // step), hi // step).map(lambda n: n * step)
        return st.integers(lo, hi)
    if tp is float:
        lo = c.get("ge", c.get("gt", -1e9))
        hi = c.get("le", c.get("lt", 1e9))
        return st.floats(lo, hi, exclude_min="gt" in c, allow_nan=False)
    if tp is str:
        if "pattern" in c:
            return st.from_regex(c["pattern"], fullmatch=True)
        return st.text(
            st.characters(codec="utf-8", exclude_categories=["Cs"]),
            min_size=c.get("min_length", 0),
            max_size=min(c.get("max_length", 20), 20),
        )
    if tp is uuid.UUID:
        return st.uuids()
    if tp is ipaddress.IPv4Address:
        return st.ip_addresses(v=4).map(str)
    if tp is ipaddress.IPv4Interface:
        return st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
    if tp is ipaddress.IPv4Network:
        return st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
            lambda t: str(ipaddress.IPv4Network(f"{t[0]}/{t[1]}", strict=False))
        )
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(for_annotation(item), max_size=min(c.get("max_length", 3), 3))
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(for_annotation(key), for_annotation(value), max_size=3)
    if tp is Any:
        return st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), _text)
    raise NotImplementedError(f"no strategy for {tp!r}")


def model_dicts(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    fields = {}
    for name, info in model.model_fields.items():
        strategy = for_annotation(info.annotation, info)
        if not info.is_required():
            strategy = st.one_of(st.just(_MISSING), strategy)
        fields[name] = strategy
    return st.fixed_dictionaries(fields).map(
        lambda d: {k: v for k, v in d.items() if v is not _MISSING}
    )


_MISSING = object()


def _valid(model: type[BaseModel], data: dict[str, Any]) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def messages(model: type[BaseModel]) -> st.SearchStrategy[BaseModel]:
    """Valid instances of `model` (inputs its own validators reject are filtered out)."""
    return model_dicts(model).map(lambda d: _valid(model, d)).filter(lambda m: m is not None)  # type: ignore[return-value]
