"""The transition table answers every (state, task, action) and says what libvirt users expect."""

from __future__ import annotations

import itertools

import pytest

from protos.domain import PowerState, TaskState
from protos.states import Action, Verdict, decide

P, T, A = PowerState, TaskState, Action


def test_every_combination_has_a_defined_answer() -> None:
    for power, task, action in itertools.product(PowerState, TaskState, Action):
        decision = decide(power, task, action)
        assert decision.verdict in Verdict
        if decision.verdict is not Verdict.ALLOW:
            assert decision.reason, (power, task, action)


@pytest.mark.parametrize(
    ("power", "action", "verdict"),
    [
        (P.SHUTOFF, A.START, Verdict.ALLOW),
        (P.RUNNING, A.START, Verdict.REFUSE),
        (P.RUNNING, A.PAUSE, Verdict.ALLOW),
        (P.PAUSED, A.PAUSE, Verdict.NOOP),
        (P.PAUSED, A.RESUME, Verdict.ALLOW),
        (P.RUNNING, A.RESUME, Verdict.NOOP),
        (P.SHUTOFF, A.RESUME, Verdict.REFUSE),
        (P.SHUTOFF, A.DESTROY, Verdict.ALLOW),  # the host refuses when nothing is left
        (P.PAUSED, A.DESTROY, Verdict.ALLOW),
        (P.CRASHED, A.DESTROY, Verdict.ALLOW),
        (P.RUNNING, A.UNDEFINE, Verdict.REFUSE),
        (P.SHUTOFF, A.UNDEFINE, Verdict.ALLOW),
        (P.PAUSED, A.REBOOT, Verdict.REFUSE),
        (P.CRASHED, A.REBOOT, Verdict.REFUSE),  # nothing can answer a Ctrl-Alt-Del
        (P.CRASHED, A.RESET, Verdict.ALLOW),  # virsh reset of a crashed domain
        (P.RUNNING, A.RESET, Verdict.ALLOW),
        (P.SHUTOFF, A.RESET, Verdict.REFUSE),
        (P.RUNNING, A.SHUTDOWN, Verdict.ALLOW),
        (P.SHUTDOWN, A.SHUTDOWN, Verdict.NOOP),
        (P.SHUTOFF, A.GET_INFO, Verdict.ALLOW),
    ],
)
def test_libvirt_like_answers(power: PowerState, action: Action, verdict: Verdict) -> None:
    assert decide(power, T.NONE, action).verdict is verdict


def test_refusal_says_the_state() -> None:
    decision = decide(P.RUNNING, T.NONE, A.START)
    assert not decision.allowed
    assert "running" in decision.reason


def test_a_task_under_way_blocks_other_actions() -> None:
    assert decide(P.RUNNING, T.MIGRATING, A.PAUSE).verdict is Verdict.REFUSE
    assert "migrating" in decide(P.RUNNING, T.MIGRATING, A.PAUSE).reason
    assert decide(P.RUNNING, T.MIGRATING, A.DESTROY).allowed
    assert decide(P.NOSTATE, T.DELETING, A.START).verdict is Verdict.REFUSE
