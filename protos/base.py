"""The base of every wire message and the registry of message types."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

_REGISTRY: dict[str, type[Message]] = {}


class Message(BaseModel):
    """A message body. Subclasses set `TYPE` (the envelope's `type`) and `VERSION`.

    `VERSION` is "major.minor". A reader accepts any minor version of its own major: an older
    writer leaves out fields that have defaults, a newer one adds fields this reader ignores
    (`extra="ignore"`). Changing a model's fields without bumping `VERSION` fails the schema
    test (tests/unit/test_schema_pins.py).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[str] = "1.0"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        type_name = cls.__dict__.get("TYPE")
        if type_name:
            other = _REGISTRY.get(type_name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"message type {type_name!r} registered twice")
            _REGISTRY[type_name] = cls

    @classmethod
    def major(cls) -> int:
        return int(cls.VERSION.split(".", 1)[0])


def message_types() -> dict[str, type[Message]]:
    """Every registered message type by its `TYPE`, after importing all protos modules."""
    # Imported here, not at the top: those modules import this one.
    import protos.commands  # noqa: PLC0415
    import protos.events  # noqa: PLC0415
    import protos.host  # noqa: PLC0415
    import protos.images  # noqa: PLC0415
    import protos.migration  # noqa: PLC0415
    import protos.network  # noqa: PLC0415
    import protos.replies  # noqa: PLC0415
    import protos.scheduler  # noqa: PLC0415
    import protos.storage  # noqa: PLC0415
    import protos.volumes  # noqa: F401, PLC0415  (imported for their registrations)

    return dict(sorted(_REGISTRY.items()))


def lookup(type_name: str) -> type[Message] | None:
    return _REGISTRY.get(type_name)
