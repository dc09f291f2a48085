"""The chosen host: define (and start) the domain there, and clean up after a refusal or a
start that did not answer in time, so that no domain is left defined on a host that refused
it and no two hosts run one domain.

Mixed into the scheduler service (services.scheduler.service), whose state, claim
announcements and compute-node seam (`call`) it uses.
"""

from __future__ import annotations

import threading
import time
import uuid

import structlog

from protos import routing
from protos.bindings import PortBinding
from protos.commands import (
    Command,
    DefineDomain,
    DestroyDomain,
    StartDomain,
    UndefineDomain,
)
from protos.domain import PowerState
from protos.replies import DomainInfo
from protos.scheduler import ClaimPhase, ScheduleDomain
from services.bus import (
    BusError,
    ConnectionLost,
    NoRouteError,
    RemoteError,
    Retry,
    RpcTimeout,
    ServiceError,
)
from services.scheduler.core import SchedulerCore
from services.scheduler.state import Claim

log = structlog.get_logger("flotilla.scheduler")

# Compute node answers after which another host may do better. A refusal of the spec itself
# (`invalid`, `forbidden`: a bad path, a file that is no kernel) would be the same on every
# host, so it ends the placement at once and reaches the caller as it is.
RETRYABLE = frozenset({"no_capacity", "spawn_failed", "unavailable"})
SPEC_REFUSALS = frozenset({"invalid", "forbidden"})
_IDS = uuid.UUID("6b1e0f8e-5c1d-4f0a-9a51-0c9b8f3c2d10")  # namespace of derived message ids


def derived_id(key: str) -> str:
    """The message id of the command `key` names: the same for every copy of one
    ScheduleDomain, so a redelivered one replays the commands its first copy sent."""
    return str(uuid.uuid5(_IDS, key))


# The pause before a command cut short by this replica's own link (LinkLost,
# ClaimUnconfirmed) is handed back to the broker: a link still down is not tried again in a
# tight loop.
LINK_LOST_PAUSE_S = 0.5


def handed_back(reason: str) -> Retry:
    """The Retry that requeues a command this replica's own link cut short, after the
    pause (`LINK_LOST_PAUSE_S`): raise it."""
    time.sleep(LINK_LOST_PAUSE_S)
    return Retry(reason)


class HostRefused(Exception):
    """The chosen host did not take the domain; another may."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HostInDoubt(Exception):
    """A host still beating did not answer a define or start, nor confirm its clean-up: it
    may yet run the domain, so no other host may be asked (two copies could run)."""


class ClaimUnconfirmed(Exception):
    """The broker did not confirm this replica's `claimed` announcement (its own connection
    down or the broker slow): the host was not asked, so it refused nothing. The claim is
    released and the command is left to be delivered again; no attempt is spent on it."""


class LinkLost(Exception):
    """This replica lost its own broker connection while asking the host to define or start
    the domain: that says nothing about the host, which may have taken the command. The claim
    stays and the command is left to be delivered again (to this replica or a peer), which
    replays the same message ids to the same host; nothing is destroyed there and no other
    host is asked."""


class Spawning(SchedulerCore):
    """Asking the chosen host, and cleaning up there; the scheduler service provides the
    rest."""

    def _spawn(
        self, claim: Claim, cmd: ScheduleDomain, request_id: str, ports: list[PortBinding]
    ) -> DomainInfo:
        """Define (and start) the domain on the claim's host; raise HostRefused if it will not,
        having removed what was left there; a non-retryable answer is raised as ServiceError."""
        host = claim.host
        self._announce(ClaimPhase.CLAIMED, claim)
        # The ports are bound to this host while it defines and starts the domain: the other
        # hosts get their forwarding entries for them from `port.bound` meanwhile, so a peer
        # reaches the guest as soon as it runs (Nova sets binding:host_id before the spawn
        # too). A refusal moves them with the next host's binding, a failure releases them.
        binding = self._binding(cmd.spec.uuid, host, request_id) if ports else None
        try:
            return self._define_and_start(host, cmd, request_id, ports)
        finally:
            if binding is not None:
                binding.join()

    def _binding(self, domain_id: uuid.UUID, host: str, request_id: str) -> threading.Thread:
        thread = threading.Thread(
            target=self._bind_ports,
            args=(domain_id, host, request_id),
            name=f"bind-{domain_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _define_and_start(
        self, host: str, cmd: ScheduleDomain, request_id: str, ports: list[PortBinding]
    ) -> DomainInfo:
        # Defined and started in one command (`and_start`): a refusal of its start part
        # leaves the definition, so any refusal is cleaned up after (an undefine of a domain
        # the define part refused finds nothing). A node older than DefineDomain 1.7 answers
        # the domain shut off: it is started with StartDomain, which only starts a domain
        # whose create's start is pending (so a guest that ended at once is not started twice).
        maybe_defined = False
        try:
            define = DefineDomain(
                spec=cmd.spec,
                privileged=cmd.privileged,
                disks=cmd.disks,
                kernel_image=cmd.kernel_image,
                initrd_image=cmd.initrd_image,
                ports=ports,
                start=cmd.start,  # kept there: a create cut off before its start is finished
                and_start=cmd.start,
            )
            maybe_defined = cmd.start  # its start part refused: the definition is left
            info = self._call(host, define, f"{request_id}:{host}:define")
            maybe_defined = True
            if cmd.start and info.state is PowerState.SHUTOFF:
                start = StartDomain(domain_id=cmd.spec.uuid, if_pending=True)
                info = self._call(host, start, f"{request_id}:{host}:start")
            return info
        except RemoteError as exc:
            if maybe_defined:
                self._clean_up(host, cmd.spec.uuid, destroy=False)
            if exc.code in RETRYABLE:
                raise HostRefused(exc.code, exc.message) from None
            if exc.code in SPEC_REFUSALS:
                raise ServiceError(exc.code, exc.message, {**exc.details, "host": host}) from None
            raise ServiceError(
                exc.code, f"host {host}: {exc.message}", {**exc.details, "host": host}
            ) from None
        except ConnectionLost as exc:
            raise LinkLost(str(exc)) from None
        except (RpcTimeout, NoRouteError, BusError) as exc:
            if isinstance(exc, NoRouteError):
                raise HostRefused("unavailable", str(exc)) from None
            if self.state.beating(host, time.monotonic()):
                # Alive, it may still run what it was sent (taken before its expiry, slow).
                # Another host is asked only once this one confirms the domain is gone.
                if not self._cleaned_up(host, cmd.spec.uuid):
                    # Beating but not answering (its worker stuck): the next requests pass
                    # it by until it answers again (the `responsive` filter).
                    self.state.unanswered(host, time.monotonic())
                    log.warning("host beats but does not answer: passed by", host=host)
                    raise HostInDoubt(f"{exc}; its clean-up was not confirmed") from None
            else:
                # Silent: what waits in its queue has expired by the time it is back (it
                # will not run); the clean-up removes the definition then, best effort.
                self._clean_up(host, cmd.spec.uuid, destroy=True)
            raise HostRefused("unavailable", str(exc)) from None

    def _clean_up(self, host: str, domain_id: uuid.UUID, *, destroy: bool) -> None:
        """Remove the definition a refusing host was left with (best effort: a host that does
        not answer keeps a stopped definition, which an operator can see and delete)."""
        commands: list[Command] = [UndefineDomain(domain_id=domain_id)]
        if destroy:
            commands.insert(0, DestroyDomain(domain_id=domain_id))
        for command in commands:
            try:
                self.call(routing.compute_queue(host), command, timeout=5.0, message_id=None)
            except RemoteError as exc:
                if exc.code != "not_found":  # not there (anymore): nothing to clean
                    log.warning("clean-up refused", host=host, command=command.TYPE, error=str(exc))
            except Exception as exc:
                log.warning("clean-up failed", host=host, command=command.TYPE, error=str(exc))

    def _cleaned_up(self, host: str, domain_id: uuid.UUID) -> bool:
        """Destroy and undefine the domain on a live host that did not answer its define or
        start in time; True once the host confirmed it is gone (undefined, or not there).

        No expiry on these: they wait for the host's domain lock, so a start under way ends
        first and is undone, and a start taken after them finds no domain (or is expired,
        as the define and start expire when the scheduler stops waiting). A start that slips
        in between the two (a clock behind the scheduler's) makes the undefine a `conflict`:
        both are sent again. Waited for up to `cleanup_timeout_s` in all."""
        queue = routing.compute_queue(host)
        deadline = time.monotonic() + self.config.cleanup_timeout_s
        for _ in range(3):
            for command in (
                DestroyDomain(domain_id=domain_id),
                UndefineDomain(domain_id=domain_id),
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    self.call(queue, command, timeout=remaining, message_id=None)
                except RemoteError as exc:
                    if exc.code == "not_found":
                        self.state.answered(host)
                        return True
                    if exc.code == "conflict":
                        continue  # a destroy of a stopped domain; an undefine of a running one
                    log.warning("clean-up refused", host=host, command=command.TYPE, error=str(exc))
                    return False
                except BusError as exc:
                    log.warning(
                        "clean-up not confirmed", host=host, command=command.TYPE, error=str(exc)
                    )
                    return False
                else:
                    if isinstance(command, UndefineDomain):
                        self.state.answered(host)
                        return True
        return False

    def _call(self, host: str, command: Command, key: str) -> DomainInfo:
        """Send `command` to `host` and wait for its answer. Derived ids make a redelivered
        ScheduleDomain replay the same commands, which the compute node answers from its
        idempotency record.

        A host that does not answer within `compute_timeout_s` because it went silent meanwhile
        (its worker restarting: the command waits in its durable queue, or is redelivered to
        it if it was under way) is asked again with the same id, up to `restart_wait_s` in
        all: it runs the command once when it is back and answers every copy. Giving up on it
        then would leave the command to run after the clean-up sent in its place, or beside
        it (a restarted worker takes all of them at once). Raises RpcTimeout when the host is
        not restarting or the wait is over."""
        message_id = derived_id(key)
        sent_at = time.monotonic()
        give_up_at = sent_at + max(self.config.compute_timeout_s, self.config.restart_wait_s)
        timeout = self.config.compute_timeout_s
        while True:
            try:
                # It expires when this wait ends: a host that takes it later does not run
                # it (a copy sent again carries a fresh expiry).
                reply = self.call(
                    routing.compute_queue(host),
                    command,
                    timeout=timeout,
                    message_id=message_id,
                    expires=True,
                )
                break
            except RemoteError:
                self.state.answered(host)  # a refusal is an answer
                raise
            except RpcTimeout:
                now = time.monotonic()
                if now >= give_up_at or not self.state.restarting(host, sent_at, now):
                    raise
                timeout = min(self.config.compute_timeout_s, give_up_at - now)
                log.info("host restarting: asking again", host=host, command=command.TYPE)
        self.state.answered(host)
        assert isinstance(reply, DomainInfo), reply
        return reply
