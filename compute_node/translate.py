"""What a driver's GuestEvent means in libvirt's event model.

One table-like function: the power state before, the guest event, and out come the domain
events to publish (possibly none: a change that did not happen emits nothing) and the state
after.
"""

from __future__ import annotations

from collections.abc import Callable

from compute_node.driver import GuestEvent, GuestEventKind
from compute_node.store import EventDraft
from protos.domain import PowerState
from protos.events import (
    CrashedDetail,
    DomainCrashed,
    DomainRebooted,
    DomainResumed,
    DomainShutdown,
    DomainStarted,
    DomainStopped,
    DomainSuspended,
    ResumedDetail,
    ShutdownDetail,
    StartedDetail,
    StoppedDetail,
    SuspendedDetail,
)

P = PowerState
K = GuestEventKind

_STOPPED_DETAIL = {
    "shutdown": StoppedDetail.SHUTDOWN,
    "destroyed": StoppedDetail.DESTROYED,
    "crashed": StoppedDetail.CRASHED,
    "failed": StoppedDetail.FAILED,
    "saved": StoppedDetail.SAVED,
    "migrated": StoppedDetail.MIGRATED,
}
# A machine that continued from a saved state rather than booting (driver `detail`).
_STARTED_DETAIL = {
    "restored": StartedDetail.RESTORED,
    "from_snapshot": StartedDetail.FROM_SNAPSHOT,
}
_SUSPENDED_DETAIL = {
    "restored": SuspendedDetail.RESTORED,
    "from_snapshot": SuspendedDetail.FROM_SNAPSHOT,
}


Drafts = tuple[list[EventDraft], PowerState]


# A machine's migration (compute_node.migrating) shows in the driver's event `reason`.
MIGRATING = "migrating"  # paused for the last pages
MIGRATED = "migrated"  # the machine moved: stopped here, started (or paused) there
MIGRATION_FAILED = "migration_failed"  # resumed where it was after a failed stop-and-copy


def _started(event: GuestEvent, before: PowerState) -> Drafts:
    if before in (P.RUNNING, P.BLOCKED, P.PAUSED):
        return [], before  # already known to run
    if event.reason == MIGRATED:
        return [EventDraft(DomainStarted, P.RUNNING, StartedDetail.MIGRATED)], P.RUNNING
    drafts = []
    if before is P.CRASHED:  # restarted by on_crash=restart: the crashed machine is gone
        drafts.append(EventDraft(DomainStopped, P.SHUTOFF, StoppedDetail.CRASHED, "restart"))
    elif before is P.SHUTDOWN:  # restarted by on_poweroff=restart
        drafts.append(EventDraft(DomainStopped, P.SHUTOFF, StoppedDetail.SHUTDOWN, "restart"))
    restored = _STARTED_DETAIL.get(event.detail)
    if restored is not None:
        drafts.append(EventDraft(DomainStarted, P.RUNNING, restored))
    else:
        drafts.append(EventDraft(DomainStarted, P.RUNNING, StartedDetail.BOOTED, event.detail))
    return drafts, P.RUNNING


def _paused(event: GuestEvent, before: PowerState) -> Drafts:
    if before is P.PAUSED:
        return [], before
    if event.reason in (MIGRATING, MIGRATED):
        return [EventDraft(DomainSuspended, P.PAUSED, SuspendedDetail.MIGRATED)], P.PAUSED
    detail = _SUSPENDED_DETAIL.get(event.detail, SuspendedDetail.PAUSED)
    return [EventDraft(DomainSuspended, P.PAUSED, detail)], P.PAUSED


def _resumed(event: GuestEvent, before: PowerState) -> Drafts:
    if before in (P.RUNNING, P.BLOCKED):
        return [], before
    detail = ResumedDetail.MIGRATED if event.reason == MIGRATION_FAILED else ResumedDetail.UNPAUSED
    return [EventDraft(DomainResumed, P.RUNNING, detail)], P.RUNNING


def _rebooted(event: GuestEvent, _before: PowerState) -> Drafts:
    return [EventDraft(DomainRebooted, P.RUNNING, None, event.reason)], P.RUNNING


def _crashed(event: GuestEvent, _before: PowerState) -> Drafts:
    return [EventDraft(DomainCrashed, P.CRASHED, CrashedDetail.PANICKED, event.reason)], P.CRASHED


def _shutdown(event: GuestEvent, _before: PowerState) -> Drafts:
    detail = ShutdownDetail.HOST if event.detail == "host" else ShutdownDetail.GUEST
    return [EventDraft(DomainShutdown, P.SHUTDOWN, detail, event.reason)], P.SHUTDOWN


def _stopped(event: GuestEvent, before: PowerState) -> Drafts:
    if before in (P.SHUTOFF, P.NOSTATE):
        return [], P.SHUTOFF
    detail = _STOPPED_DETAIL.get(event.reason, StoppedDetail.FAILED)
    reason = event.detail or event.reason
    return [EventDraft(DomainStopped, P.SHUTOFF, detail, reason)], P.SHUTOFF


def _failed(_event: GuestEvent, before: PowerState) -> Drafts:
    return [], before  # the machine never started; the start command reports why


_BY_KIND: dict[GuestEventKind, Callable[[GuestEvent, PowerState], Drafts]] = {
    K.STARTED: _started,
    K.PAUSED: _paused,
    K.RESUMED: _resumed,
    K.REBOOTED: _rebooted,
    K.CRASHED: _crashed,
    K.SHUTDOWN: _shutdown,
    K.STOPPED: _stopped,
    K.FAILED: _failed,
}


def translate(event: GuestEvent, before: PowerState) -> Drafts:
    """The events `event` produces for a domain in state `before`, and the state after it."""
    return _BY_KIND[event.kind](event, before)
