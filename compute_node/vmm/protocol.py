"""The control socket's records: one closed, versioned set of requests, one of replies and
one error type (docs/vmm.md, "Control protocol").

On the wire each record is a frame (compute_node.vmm.frames) holding a msgpack map: a request
is `{"v": VERSION, "op": <tag>, <fields>}`, a reply `{"ok": true, "reply": <tag>, <fields>}`,
a refusal `{"ok": false, "code": str, "error": str}`. `decode_request` and `decode_reply`
turn maps into the records below and raise `ControlError` for anything outside the set; the
VMM answers every request with one reply record or a refusal. Standard library only: the VMM
process imports this at start-up.
"""

from __future__ import annotations

from typing import Any, ClassVar, dataclass_transform

# Bumped when a request or reply changes shape; a VMM refuses a request of a newer version
# (code `version`), so an older VMM left running by an earlier worker says so plainly.
VERSION = 1


class ControlError(Exception):
    """A request refused, by the VMM or by a decoder. `code` is one of: bad_frame,
    unknown_op, bad_request, version, state, busy, unsupported, no_space, invalid, vmm,
    internal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass_transform(frozen_default=True)
class Record:
    """An immutable record whose fields are its annotations (with class-level defaults):
    what a frozen dataclass or NamedTuple gives, at a tenth of the cost of defining one (the
    VMM defines these at every start; a NamedTuple class costs ~0.1 ms)."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _field_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls) -> None:
        # The class's own annotations (`inspect` would cost the VMM its import).
        names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
        cls._fields = names
        cls._field_defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} fields")
        values = dict(zip(fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in fields or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated {name!r}")
            values[name] = value
        for name in fields:
            if name not in values:
                if name not in self._field_defaults:
                    raise TypeError(f"{type(self).__name__}: missing {name!r}")
                values[name] = self._field_defaults[name]
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _asdict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return self._asdict() == other._asdict()

    def __hash__(self) -> int:
        return hash((type(self), *(repr(getattr(self, n)) for n in self._fields)))

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({body})"


# -- requests ---------------------------------------------------------------------------------


class Status(Record):
    pass


class Pause(Record):
    pass


class Resume(Record):
    pass


class Shutdown(Record):
    mode: str = "ctrl-alt-del"  # | "acpi"


class Destroy(Record):
    pass


class Reboot(Record):
    mode: str = "reset"  # | "ctrl-alt-del"


class Stats(Record):
    pass


class Console(Record):
    max_bytes: int | None = None  # None: the whole ring


class Subscribe(Record):
    from_n: int = 0


class Attach(Record):
    pass


class Save(Record):
    """Pause, write the machine into `directory`, end the machine (`stopped`/saved)."""

    directory: str


class Snapshot(Record):
    """Pause, write the machine into `directory` (None: nothing, a disk-only snapshot), reply
    `Held`, then wait up to `hold_s` for `Proceed` on the same connection (or its close)
    before the machine goes on as it was."""

    directory: str | None = None
    hold_s: float = 60.0


class Proceed(Record):
    """The client of a held snapshot is done (its disks are copied): let the machine go on."""


class MigrateOut(Record):
    """Migrate the running or paused machine live to the listener at `address:port` that
    holds `token` (docs/vmm.md, "Live migration"). The reply comes on this connection when
    the migration ends (a `MigrationReply`, `ended` true): meanwhile the VMM answers other
    connections. `bandwidth`: bytes/s, 0 for no cap; `timeout_s` 0: none; `timeout_action`
    `abort` (the source runs on) or `pause` (the pause budget is lifted: the guest pauses for
    the rest and the migration completes). `copy_disks`: the disks the stream carries too."""

    address: str
    port: int
    token: str
    max_downtime_ms: float = 300.0
    bandwidth: int = 0
    auto_converge: bool = True
    verify: bool = False
    timeout_s: float = 0.0
    timeout_action: str = "abort"
    # The indices of the disks copied into the target's own files (docs/migration.md "Block
    # copy"): the target's machine must accept the same ones.
    copy_disks: tuple[int, ...] = ()
    # The stream version the target speaks (its newest; 1: a target of an older release,
    # which copies no disks). A VMM of an older release ignores it and speaks its own.
    stream_version: int = 2


class MigrationStatus(Record):
    """The outgoing migration's figures (the running one, or the last one)."""


class MigrationSet(Record):
    """Change the running migration's budget (ms) or cap (bytes/s, 0: none); None: keep."""

    max_downtime_ms: float | None = None
    bandwidth: int | None = None


class MigrationCancel(Record):
    """Stop the running migration before its commit (a no-op after it)."""


class CancelIncoming(Record):
    """End a VMM waiting for an incoming migration that has not run the guest."""


Request = (
    Status
    | Pause
    | Resume
    | Shutdown
    | Destroy
    | Reboot
    | Stats
    | Console
    | Subscribe
    | Attach
    | Save
    | Snapshot
    | Proceed
    | MigrateOut
    | MigrationStatus
    | MigrationSet
    | MigrationCancel
    | CancelIncoming
)

_INT = (int,)
_STR = (str,)
_NUM = (int, float)
_BOOL = (bool,)
# tag -> (record type, field -> accepted Python types); None is allowed where the default is.
_REQUESTS: dict[str, tuple[type[Any], dict[str, tuple[type, ...]]]] = {
    "status": (Status, {}),
    "pause": (Pause, {}),
    "resume": (Resume, {}),
    "shutdown": (Shutdown, {"mode": _STR}),
    "destroy": (Destroy, {}),
    "reboot": (Reboot, {"mode": _STR}),
    "stats": (Stats, {}),
    "console": (Console, {"max_bytes": _INT}),
    "subscribe": (Subscribe, {"from_n": _INT}),
    "attach": (Attach, {}),
    "save": (Save, {"directory": _STR}),
    "snapshot": (Snapshot, {"directory": _STR, "hold_s": _NUM}),
    "proceed": (Proceed, {}),
    "migrate_out": (
        MigrateOut,
        {
            "address": _STR,
            "port": _INT,
            "token": _STR,
            "max_downtime_ms": _NUM,
            "bandwidth": _INT,
            "auto_converge": _BOOL,
            "verify": _BOOL,
            "timeout_s": _NUM,
            "timeout_action": _STR,
            "copy_disks": (list, tuple),
            "stream_version": _INT,
        },
    ),
    "migration_status": (MigrationStatus, {}),
    "migration_set": (MigrationSet, {"max_downtime_ms": _NUM, "bandwidth": _INT}),
    "migration_cancel": (MigrationCancel, {}),
    "cancel_incoming": (CancelIncoming, {}),
}
_TAGS: dict[type[Any], str] = {cls: tag for tag, (cls, _) in _REQUESTS.items()}


def encode_request(request: Request) -> dict[str, Any]:
    return {"v": VERSION, "op": _TAGS[type(request)], **request._asdict()}


def decode_request(frame: dict[str, Any]) -> Request:
    """The request record a frame holds; ControlError (`version`, `unknown_op`,
    `bad_request`) when it is none. A frame without `v` is taken as version 1."""
    version = frame.get("v", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ControlError("bad_request", "v must be a positive integer")
    if version > VERSION:
        raise ControlError("version", f"request version {version} is newer than {VERSION}")
    op = frame.get("op")
    entry = _REQUESTS.get(op) if isinstance(op, str) else None
    if entry is None:
        raise ControlError("unknown_op", f"unknown op {op!r}")
    cls, kinds = entry
    values: dict[str, Any] = {}
    for name in cls._fields:
        if name not in frame:
            if name not in cls._field_defaults:
                raise ControlError("bad_request", f"{op}: missing {name!r}")
            continue
        value = frame[name]
        if value is None and cls._field_defaults.get(name, ...) is None:
            values[name] = None
            continue
        # bool is an int: refuse it where a number is meant, and take it only where meant.
        if not isinstance(value, kinds[name]) or isinstance(value, bool) != (kinds[name] == _BOOL):
            raise ControlError("bad_request", f"{op}: {name!r} has the wrong type")
        values[name] = tuple(value) if isinstance(value, list) else value  # msgpack: a list
    request: Request = cls(**values)
    return request


# -- replies ----------------------------------------------------------------------------------


class Done(Record):
    """The request was carried out. `journal_n`, in the reply to `subscribe` only: the last
    record journaled when the subscription began (the client waits for the stream to reach
    it instead of asking `status`); absent from an older VMM's reply."""

    journal_n: int | None = None


class StatusReply(Record):
    state: str  # a PowerState value: running | paused | shutoff | crashed
    pid: int
    cpu_time_ns: int  # the whole process, vCPU threads included
    journal_n: int
    started_at: float  # wall clock of the last machine start, 0 if none
    cgroup: str | None
    cgroup_error: str | None
    # The port a VMM waiting for an incoming migration listens on (None otherwise): spawn()
    # reads it with the readiness. Absent from an older VMM's reply.
    incoming_port: int | None = None


class StatsReply(Record):
    counters: dict[str, Any]  # exits, unhandled_io, …, devices, cpu_time_ns


class ConsoleReply(Record):
    data: bytes
    truncated: bool  # older output than `data` existed and is gone from the ring


class Saved(Record):
    """A `save` wrote the machine and ended it (or a `snapshot` resumed it as it was)."""

    power: str  # running | paused: as it was when taken
    pause_ms: float
    state_bytes: int
    memory_pages: int


class Held(Record):
    """A `snapshot` paused the machine and wrote its state: the client copies its disks,
    then sends `Proceed`."""

    power: str
    state_bytes: int
    memory_pages: int


class MigrationReply(Record):
    """An outgoing migration's figures. `phase`: setup, precopy, stopcopy, commit, done,
    failed or cancelled (a `protos.migration.MigrationPhase` value); `ended` once it is over.
    `committed`: the target was told to run the guest (with `error`: it never confirmed, the
    source stays paused). `downtime_ms`: the pause the target measured; `paused_ms`: the
    source's pause to the target's resume (one host's clock); `source_paused`: the source
    paused a running guest for the last pages."""

    phase: str
    ended: bool = False
    committed: bool = False
    iteration: int = 0
    bytes_sent: int = 0
    remaining_bytes: int = 0
    memory_bytes: int = 0
    dirty_rate: int = 0
    bandwidth: int = 0
    predicted_ms: float = 0.0
    budget_ms: float = 0.0
    throttle_pct: int = 0
    elapsed_ms: float = 0.0
    downtime_ms: float | None = None
    paused_ms: float | None = None
    source_paused: bool = False
    error: str | None = None


Reply = Done | StatusReply | StatsReply | ConsoleReply | Saved | Held | MigrationReply

_REPLIES: dict[str, type[Any]] = {
    "done": Done,
    "status": StatusReply,
    "stats": StatsReply,
    "console": ConsoleReply,
    "saved": Saved,
    "held": Held,
    "migration": MigrationReply,
}
_REPLY_TAGS: dict[type[Any], str] = {cls: tag for tag, cls in _REPLIES.items()}


def encode_reply(reply: Reply) -> dict[str, Any]:
    return {"ok": True, "reply": _REPLY_TAGS[type(reply)], **reply._asdict()}


def encode_error(error: ControlError) -> dict[str, Any]:
    return {"ok": False, "code": error.code, "error": error.message}


def decode_reply(frame: dict[str, Any]) -> Reply:
    """The reply record a frame holds; raises the refusal it carries as ControlError, and
    ControlError(`bad_frame`) for a map that is neither."""
    if frame.get("ok") is not True:
        code, message = frame.get("code"), frame.get("error")
        if frame.get("ok") is False and isinstance(code, str) and isinstance(message, str):
            raise ControlError(code, message)
        raise ControlError("bad_frame", f"not a reply: {frame!r:.200}")
    cls = _REPLIES.get(frame.get("reply"))  # type: ignore[arg-type]
    if cls is None:
        raise ControlError("bad_frame", f"unknown reply {frame.get('reply')!r}")
    try:
        # A field with a default may be absent (a reply of an older VMM).
        reply: Reply = cls(
            **{n: frame[n] for n in cls._fields if n in frame or n not in cls._field_defaults}
        )
    except KeyError as exc:
        raise ControlError("bad_frame", f"{frame['reply']} reply without {exc}") from None
    return reply
