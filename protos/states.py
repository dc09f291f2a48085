"""The one transition table: which action is allowed in which state.

`decide(power, task, action)` answers every combination: ALLOW (do it), NOOP (already so:
succeed without doing anything or emitting an event) or REFUSE (with the reason the caller sees,
HTTP 409 at the API). Nothing else in Flotilla decides this.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protos.domain import PowerState, TaskState

P = PowerState


class Action(StrEnum):
    DEFINE = "define"  # redefine an existing domain: takes effect at next boot
    UNDEFINE = "undefine"
    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"  # ask the guest (Ctrl-Alt-Del): it must be running to answer
    RESET = "reset"  # reboot mode reset: a fresh machine now, as `virsh reset`
    PAUSE = "pause"
    RESUME = "resume"
    MIGRATE = "migrate"
    GET_INFO = "get_info"
    CONSOLE = "console"
    SAVE = "save"  # save and managedsave
    RESTORE = "restore"
    MANAGEDSAVE_REMOVE = "managedsave_remove"
    SNAPSHOT_CREATE = "snapshot_create"
    SNAPSHOT_REVERT = "snapshot_revert"
    SNAPSHOT_DELETE = "snapshot_delete"


class Verdict(StrEnum):
    ALLOW = "allow"
    NOOP = "noop"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.REFUSE


ALLOW = Decision(Verdict.ALLOW)
_ALL = frozenset(PowerState)
_INACTIVE = frozenset({P.NOSTATE, P.SHUTOFF})
_ACTIVE = _ALL - _INACTIVE
_RUNNING = frozenset({P.RUNNING, P.BLOCKED})

# For each action: the states where it is allowed, where it is a no-op, and the reason given
# everywhere else.
_TABLE: dict[Action, tuple[frozenset[PowerState], frozenset[PowerState], str]] = {
    Action.DEFINE: (_ALL, frozenset(), ""),
    Action.UNDEFINE: (_INACTIVE, frozenset(), "domain is active: destroy it first"),
    Action.START: (_INACTIVE, frozenset(), "domain is already active"),
    Action.SHUTDOWN: (_RUNNING, frozenset({P.SHUTDOWN}), "domain is not running"),
    # Any state: the host ends a VMM that a preserve policy kept after a shut-off domain's
    # machine stopped, and refuses (`conflict`, "domain is not running") if none is left.
    Action.DESTROY: (_ALL, frozenset(), ""),
    Action.REBOOT: (_RUNNING, frozenset(), "domain is not running"),
    # libvirt resets a crashed domain (on_crash=preserve) too: the way back without a
    # destroy. Nothing of the crashed guest can answer a Ctrl-Alt-Del.
    Action.RESET: (_RUNNING | {P.CRASHED}, frozenset(), "domain is not running"),
    Action.PAUSE: (_RUNNING, frozenset({P.PAUSED}), "domain is not running"),
    Action.RESUME: (frozenset({P.PAUSED}), _RUNNING, "domain is not paused"),
    Action.MIGRATE: (
        _RUNNING | {P.PAUSED, P.SHUTOFF},
        frozenset(),
        "domain cannot migrate in this state",
    ),
    Action.GET_INFO: (_ALL, frozenset(), ""),
    Action.CONSOLE: (_ALL, frozenset(), ""),
    Action.SAVE: (_RUNNING | {P.PAUSED}, frozenset(), "domain is not running"),
    Action.RESTORE: (_INACTIVE, frozenset(), "domain is already active"),
    Action.MANAGEDSAVE_REMOVE: (_INACTIVE, frozenset(), "domain is active"),
    # A shut-off domain's snapshot holds its disks only; a crashed one is not consistent.
    Action.SNAPSHOT_CREATE: (
        _RUNNING | _INACTIVE | {P.PAUSED},
        frozenset(),
        "domain cannot be snapshotted in this state",
    ),
    Action.SNAPSHOT_REVERT: (_INACTIVE, frozenset(), "domain is active: destroy it first"),
    Action.SNAPSHOT_DELETE: (_ALL, frozenset(), ""),
}

# While the control plane works on a domain, only these actions get through.
_DURING_TASK: dict[TaskState, frozenset[Action]] = {
    TaskState.NONE: frozenset(Action),
    TaskState.SCHEDULING: frozenset({Action.GET_INFO, Action.CONSOLE, Action.UNDEFINE}),
    TaskState.BUILDING: frozenset({Action.GET_INFO, Action.CONSOLE, Action.DESTROY}),
    TaskState.MIGRATING: frozenset({Action.GET_INFO, Action.CONSOLE, Action.DESTROY}),
    TaskState.DELETING: frozenset({Action.GET_INFO}),
    TaskState.ERROR: frozenset(
        {
            Action.GET_INFO,
            Action.CONSOLE,
            Action.DESTROY,
            Action.UNDEFINE,
            Action.START,
            Action.DEFINE,
        }
    ),
}


def decide(power: PowerState, task: TaskState, action: Action) -> Decision:
    """The answer for `action` on a domain in `power` state with `task` under way."""
    if action not in _DURING_TASK[task]:
        return Decision(Verdict.REFUSE, f"task {task.value!r} in progress")
    allowed, noop, reason = _TABLE[action]
    if power in allowed:
        return ALLOW
    if power in noop:
        return Decision(Verdict.NOOP, f"domain is already {power.value}")
    return Decision(Verdict.REFUSE, f"{reason} (state {power.value})")
