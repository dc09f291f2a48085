"""Scheduler configuration: a TOML file (`[scheduler]` table), then environment, then flags.

| setting | env | default |
|---|---|---|
| amqp_url | FLOTILLA_AMQP_URL | amqp://guest:guest@127.0.0.1:5672/%2F |
| replica | FLOTILLA_SCHEDULER_REPLICA | `<host name>-<pid>` |
| weigher | FLOTILLA_SCHEDULER_WEIGHER | spread (or pack) |
| ram_weight_multiplier | FLOTILLA_SCHEDULER_RAM_WEIGHT_MULTIPLIER | 1.0 |
| cpu_weight_multiplier | FLOTILLA_SCHEDULER_CPU_WEIGHT_MULTIPLIER | 0.0 |
| top_n | FLOTILLA_SCHEDULER_TOP_N | 2 |
| max_attempts | FLOTILLA_SCHEDULER_MAX_ATTEMPTS | 5 |
| down_after_intervals | FLOTILLA_SCHEDULER_DOWN_AFTER_INTERVALS | 3.0 |
| silence_grace_intervals | FLOTILLA_SCHEDULER_SILENCE_GRACE_INTERVALS | 10.0 |
| compute_timeout_s | FLOTILLA_SCHEDULER_COMPUTE_TIMEOUT_S | 20.0 |
| restart_wait_s | FLOTILLA_SCHEDULER_RESTART_WAIT_S | 40.0 |
| cleanup_timeout_s | FLOTILLA_SCHEDULER_CLEANUP_TIMEOUT_S | 60.0 |
| migration_start_timeout_s | FLOTILLA_SCHEDULER_MIGRATION_START_TIMEOUT_S | 45.0 |
| peer_claim_timeout_s | FLOTILLA_SCHEDULER_PEER_CLAIM_TIMEOUT_S | 120.0 |
| claim_sync_timeout_s | FLOTILLA_SCHEDULER_CLAIM_SYNC_TIMEOUT_S | 5.0 |
| unanswered_retry_s | FLOTILLA_SCHEDULER_UNANSWERED_RETRY_S | 120.0 |
| workers | FLOTILLA_SCHEDULER_WORKERS | 8 |
| filters | FLOTILLA_SCHEDULER_FILTERS | every registered filter (comma-separated names) |
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from services.settings import ReplicaConfig


class SchedulerConfig(ReplicaConfig):
    TABLE = "scheduler"

    # spread: prefer the host with the most free RAM; pack: the one with the least.
    weigher: Literal["spread", "pack"] = "spread"
    ram_weight_multiplier: float = Field(default=1.0, ge=0)
    cpu_weight_multiplier: float = Field(default=0.0, ge=0)
    # Pick at random among the best `top_n` hosts, so replicas deciding at once rarely collide.
    top_n: int = Field(default=2, ge=1, le=100)
    # A ceiling on ScheduleDomain.max_attempts (the command's own value applies below it).
    max_attempts: int = Field(default=5, ge=1, le=20)
    # A host silent this many of its heartbeat intervals is down, unless the silence is the
    # replica's own (state.Hearing): it heard no host at all, for up to
    # `silence_grace_intervals` more, or it is taking the heartbeats late but in order.
    down_after_intervals: float = Field(default=3.0, gt=0)
    silence_grace_intervals: float = Field(default=10.0, ge=0)
    compute_timeout_s: float = Field(default=20.0, gt=0)
    # A host that did not answer within compute_timeout_s and is silent (restarting: its
    # durable queue keeps the command) or came back meanwhile is waited for, with the same
    # command, up to this long in all; then it is given up like a refusing host.
    restart_wait_s: float = Field(default=40.0, gt=0)
    # A host still beating that did not answer a define or start in time may yet run it: its
    # clean-up (destroy, undefine; ordered after the start by the host's domain lock) is
    # waited for up to this long before another host is tried; unconfirmed, none is.
    cleanup_timeout_s: float = Field(default=60.0, gt=0)
    # The source answers StartMigration once its target is prepared, which it waits for up to
    # 30 s (compute_node.migrating.PEER_TIMEOUT_S): longer than that, shorter than the API's 60.
    migration_start_timeout_s: float = Field(default=45.0, gt=0)
    # A peer replica's claim not followed by `placed`/`released` (the peer died) lapses.
    peer_claim_timeout_s: float = Field(default=120.0, gt=0)
    # How long a claim's confirm, and a redelivered request's wait for the claim stream to
    # catch up, may take before the replica stops trusting its own view.
    claim_sync_timeout_s: float = Field(default=5.0, gt=0)
    # A host that beats but left a define or start unanswered (its clean-up unconfirmed) is
    # passed by this long, unless it answers or restarts first; then it is tried again.
    unanswered_retry_s: float = Field(default=120.0, gt=0)
    workers: int = Field(default=8, ge=1, le=256)
    filters: tuple[str, ...] | None = None

    @field_validator("filters", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value
