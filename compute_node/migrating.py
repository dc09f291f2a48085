"""The compute node's migration handlers (protos.migration, docs/migration.md "The control
plane: the compute node"): both ends, put together.

Mixed into the lifecycle service (compute_node.lifecycle), whose lock, transition check,
plugging and event path they use. The source's part is compute_node.migration_source, the
target's compute_node.migration_target, what both use compute_node.migration_base; here the
driver's events go to whichever end they concern.
"""

from __future__ import annotations

from compute_node.driver import GuestEvent
from compute_node.migration_base import PEER_TIMEOUT_S
from compute_node.migration_source import FINISH_ATTEMPTS, MigrationSource
from compute_node.migration_target import MigrationTarget

__all__ = ["FINISH_ATTEMPTS", "PEER_TIMEOUT_S", "MigrationHandlers"]


class MigrationHandlers(MigrationSource, MigrationTarget):
    """Live and cold migration, both ends; the lifecycle service provides the rest."""

    def _init_migrations(self) -> None:
        self._init_peers()
        self._init_source()
        self._init_target()

    def on_guest_event(self, event: GuestEvent) -> None:
        """Persist what happened to a guest and the events it means (`_consume`), except for
        a domain migrating in: its events wait for FinishIncoming."""
        with self._sink_lock:
            if self._hold(event):
                return
            self._consume(event)
            self._after_consumed(event)
