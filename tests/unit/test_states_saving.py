"""The transition table's rows for save, restore, managed save and snapshots, as the API and
the compute node refuse with them (docs/snapshots.md)."""

from __future__ import annotations

import pytest

from protos.domain import PowerState, TaskState
from protos.states import Action, Verdict, decide

P, T, A = PowerState, TaskState, Action
OK, NO = Verdict.ALLOW, Verdict.REFUSE


@pytest.mark.parametrize(
    ("power", "task", "action", "verdict"),
    [
        (P.RUNNING, T.NONE, A.SAVE, OK),
        (P.PAUSED, T.NONE, A.SAVE, OK),
        (P.SHUTOFF, T.NONE, A.SAVE, NO),
        (P.RUNNING, T.MIGRATING, A.SAVE, NO),  # no save while migrating
        (P.SHUTOFF, T.NONE, A.RESTORE, OK),
        (P.RUNNING, T.NONE, A.RESTORE, NO),
        (P.SHUTOFF, T.NONE, A.MANAGEDSAVE_REMOVE, OK),
        (P.RUNNING, T.NONE, A.MANAGEDSAVE_REMOVE, NO),
        (P.RUNNING, T.NONE, A.SNAPSHOT_CREATE, OK),
        (P.PAUSED, T.NONE, A.SNAPSHOT_CREATE, OK),
        (P.SHUTOFF, T.NONE, A.SNAPSHOT_CREATE, OK),  # disks only
        (P.CRASHED, T.NONE, A.SNAPSHOT_CREATE, NO),  # not a consistent machine
        (P.SHUTOFF, T.NONE, A.SNAPSHOT_REVERT, OK),
        (P.RUNNING, T.NONE, A.SNAPSHOT_REVERT, NO),  # no revert while running
        (P.PAUSED, T.NONE, A.SNAPSHOT_REVERT, NO),
        (P.RUNNING, T.NONE, A.SNAPSHOT_DELETE, OK),
        (P.SHUTOFF, T.DELETING, A.SNAPSHOT_DELETE, NO),
    ],
)
def test_save_and_snapshot_rows(
    power: PowerState, task: TaskState, action: Action, verdict: Verdict
) -> None:
    decision = decide(power, task, action)
    assert decision.verdict is verdict, decision
    if verdict is NO:
        assert decision.reason
