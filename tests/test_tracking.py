"""The life cycle as a table: (previous state, what the server showed, now) -> decision;
and the hooks a state change owes."""

from __future__ import annotations

import pytest

from comfywatch.history import parse_history_entry
from comfywatch.restarts import Mark
from comfywatch.states import JobState, Reason
from comfywatch.tracking import Decision, JobView, OwedHooks, Policy, Seen, decide, owed_hooks

from .helpers import only_entry

S = JobState
POLICY = Policy(not_found_after_s=60, queue_timeout_s=1000, run_timeout_s=100)
#: Marks of a server's watch: nothing happened yet; a poll failed since; a restart was
#: inferred since; the socket connected (and stayed so).
WATCHED = Mark()
OUTAGE = Mark(outages=1)
RESTART = Mark(restarts=1)
SOCKET = Mark(socket_events=1, socket_up=True)
SUCCESS = parse_history_entry(*only_entry("success_saveimage_history.json"))
ERROR = parse_history_entry(*only_entry("runtime_error_history.json"))
INTERRUPTED = parse_history_entry(*only_entry("interrupted_history.json"))

# registered at t=0; "now" is the third column.
CASES: list[tuple[str, JobView, Seen, float, S, Reason | None]] = [
    (
        "registered, appears pending",
        JobView(S.REGISTERED, 0),
        Seen(pending=True),
        5,
        S.QUEUED,
        None,
    ),
    (
        "registered, appears running",
        JobView(S.REGISTERED, 0),
        Seen(running=True),
        5,
        S.RUNNING,
        None,
    ),
    (
        "registered, finished before first look",
        JobView(S.REGISTERED, 0),
        Seen(history=SUCCESS),
        5,
        S.SUCCESS,
        Reason.FINISHED,
    ),
    (
        "queued, starts",
        JobView(S.QUEUED, 0, queued_at_s=1, last_seen_at_s=4),
        Seen(running=True),
        5,
        S.RUNNING,
        None,
    ),
    (
        "running, success",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(history=SUCCESS),
        5,
        S.SUCCESS,
        Reason.FINISHED,
    ),
    (
        "running, error",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(history=ERROR),
        5,
        S.ERROR,
        Reason.FINISHED,
    ),
    (
        "running, interrupted",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(history=INTERRUPTED),
        5,
        S.INTERRUPTED,
        Reason.FINISHED,
    ),
    (
        "queued, straight to history",
        JobView(S.QUEUED, 0, 1, None, 4),
        Seen(history=SUCCESS),
        5,
        S.SUCCESS,
        Reason.FINISHED,
    ),
    ("queued, absent once: ask again", JobView(S.QUEUED, 0, 1, None, 4), Seen(), 5, S.QUEUED, None),
    (
        "queued, absent twice: deleted",
        JobView(S.QUEUED, 0, 1, None, 4, 1, WATCHED, WATCHED),
        Seen(),
        6,
        S.CANCELLED,
        Reason.DELETED_FROM_QUEUE,
    ),
    (
        "queued, absent twice after restart",
        JobView(S.QUEUED, 0, 1, None, 4, 1, WATCHED, RESTART),
        Seen(mark=RESTART),
        6,
        S.LOST,
        Reason.SERVER_RESTARTED,
    ),
    (
        "queued, restart before last seen is old news",
        JobView(S.QUEUED, 0, 1, None, 4, 1, RESTART, RESTART),
        Seen(mark=RESTART),
        6,
        S.CANCELLED,
        Reason.DELETED_FROM_QUEUE,
    ),
    (
        "queued, a poll failed since it was seen: the cause is unknown",
        JobView(S.QUEUED, 0, 1, None, 4, 1, WATCHED, OUTAGE),
        Seen(mark=OUTAGE),
        6,
        S.LOST,
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "queued, a restart after it was first missed is not its cause",
        JobView(S.QUEUED, 0, 1, None, 4, 1, WATCHED, WATCHED),
        Seen(mark=RESTART),
        6,
        S.LOST,
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "queued, the socket stayed connected through an outage: deleted",
        JobView(S.QUEUED, 0, 1, None, 4, 1, SOCKET, SOCKET),
        Seen(mark=Mark(socket_events=1, outages=3, socket_up=True)),
        6,
        S.CANCELLED,
        Reason.DELETED_FROM_QUEUE,
    ),
    ("running, absent once: ask again", JobView(S.RUNNING, 0, 1, 2, 4), Seen(), 5, S.RUNNING, None),
    (
        "running, absent twice: history cleared",
        JobView(S.RUNNING, 0, 1, 2, 4, 1, WATCHED, WATCHED),
        Seen(),
        6,
        S.LOST,
        Reason.HISTORY_CLEARED,
    ),
    (
        "running, absent twice after restart",
        JobView(S.RUNNING, 0, 1, 2, 4, 1, WATCHED, RESTART),
        Seen(mark=RESTART),
        6,
        S.LOST,
        Reason.SERVER_RESTARTED,
    ),
    (
        "running, the socket dropped since it was seen: the cause is unknown",
        JobView(S.RUNNING, 0, 1, 2, 4, 1, SOCKET, SOCKET),
        Seen(mark=Mark(socket_events=2)),
        6,
        S.LOST,
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "running, gone while daemon was down",
        JobView(S.RUNNING, 0, 1, 2, None, absent_count=1),
        Seen(),
        6,
        S.LOST,
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "queued, gone while daemon was down",
        JobView(S.QUEUED, 0, 1, None, None, absent_count=1),
        Seen(),
        6,
        S.LOST,
        Reason.LEFT_UNOBSERVED,
    ),
    (
        "registered, unseen within grace",
        JobView(S.REGISTERED, 0, absent_count=5),
        Seen(),
        59,
        S.REGISTERED,
        None,
    ),
    (
        "registered, unseen past grace",
        JobView(S.REGISTERED, 0, absent_count=5),
        Seen(),
        60,
        S.NOT_FOUND,
        Reason.NEVER_SEEN,
    ),
    (
        "registered, first look already past grace: ask twice",
        JobView(S.REGISTERED, 0),
        Seen(),
        600,
        S.REGISTERED,
        None,
    ),
    (
        "running past run deadline",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(running=True),
        102,
        S.TIMEOUT,
        Reason.RUN_TIMEOUT,
    ),
    (
        "running within run deadline",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(running=True),
        101,
        S.RUNNING,
        None,
    ),
    (
        "finished past deadline is still a finish",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(history=SUCCESS),
        5000,
        S.SUCCESS,
        Reason.FINISHED,
    ),
    (
        "queued past queue deadline",
        JobView(S.QUEUED, 0, 1, None, 4),
        Seen(pending=True),
        1000,
        S.TIMEOUT,
        Reason.QUEUE_TIMEOUT,
    ),
    (
        "queued within queue deadline",
        JobView(S.QUEUED, 0, 1, None, 4),
        Seen(pending=True),
        999,
        S.QUEUED,
        None,
    ),
    (
        "running, history unreadable: unchanged",
        JobView(S.RUNNING, 0, 1, 2, 4, absent_count=1),
        Seen(unreadable=True),
        50,
        S.RUNNING,
        None,
    ),
    (
        "running, history unreadable past run deadline",
        JobView(S.RUNNING, 0, 1, 2, 4),
        Seen(unreadable=True),
        102,
        S.TIMEOUT,
        Reason.RUN_TIMEOUT,
    ),
    (
        "queued, history unreadable past queue deadline",
        JobView(S.QUEUED, 0, 1, None, 4),
        Seen(unreadable=True),
        1000,
        S.TIMEOUT,
        Reason.QUEUE_TIMEOUT,
    ),
    (
        "registered, history unreadable: not counted absent",
        JobView(S.REGISTERED, 0, absent_count=5),
        Seen(unreadable=True),
        600,
        S.REGISTERED,
        None,
    ),
    (
        "stuck worker: same prompt running forever",
        JobView(S.RUNNING, 0, 1, 2, 50),
        Seen(running=True),
        150,
        S.TIMEOUT,
        Reason.RUN_TIMEOUT,
    ),
]


@pytest.mark.parametrize(
    ("view", "seen", "now", "state", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decision_table(
    view: JobView, seen: Seen, now: float, state: JobState, reason: Reason | None
) -> None:
    decision = decide(view, seen, now, POLICY)
    assert decision.state is state
    assert decision.reason is reason


def test_first_sighting_sets_timestamps_and_resets_absence() -> None:
    seen = Seen(running=True, sighting=SOCKET, mark=RESTART)
    d = decide(JobView(S.REGISTERED, 0, absent_count=1), seen, 7, POLICY)
    assert d == Decision(
        S.RUNNING, None, None, queued_at_s=7, started_at_s=7, last_seen_at_s=7, seen_mark=SOCKET
    )


def test_a_job_keeps_the_marks_of_its_sighting_and_of_its_first_absence() -> None:
    """The poll that last saw it and the first that missed it bound where it left."""
    d = decide(
        JobView(S.QUEUED, 0, 1), Seen(pending=True, sighting=SOCKET, mark=RESTART), 2, POLICY
    )
    assert (d.seen_mark, d.missed_mark) == (SOCKET, None)
    dropped = Mark(socket_events=2)
    view = JobView(S.QUEUED, 0, 1, None, 2, seen_mark=d.seen_mark)
    first = decide(view, Seen(mark=dropped), 3, POLICY)
    assert (first.state, first.absent_count, first.missed_mark) == (S.QUEUED, 1, dropped)
    view = JobView(S.QUEUED, 0, 1, None, 2, 1, first.seen_mark, first.missed_mark)
    second = decide(view, Seen(mark=Mark(socket_events=2, restarts=1)), 4, POLICY)
    assert second.missed_mark == dropped  # the restart came after it was missed
    assert (second.state, second.reason) == (S.LOST, Reason.LEFT_UNOBSERVED)


def test_queue_deadline_counts_from_registration_when_never_seen() -> None:
    policy = Policy(not_found_after_s=10_000, queue_timeout_s=30)
    d = decide(JobView(S.REGISTERED, 0, absent_count=3), Seen(), 31, policy)
    assert (d.state, d.reason) == (S.TIMEOUT, Reason.QUEUE_TIMEOUT)


def test_no_deadlines_means_waiting_forever() -> None:
    policy = Policy(not_found_after_s=60)
    d = decide(JobView(S.RUNNING, 0, 1, 2, 4), Seen(running=True), 10**9, policy)
    assert d.state is S.RUNNING


@pytest.mark.parametrize("state", sorted(s for s in JobState if s.terminal))
def test_terminal_states_never_change(state: JobState) -> None:
    with pytest.raises(ValueError, match="terminal"):
        decide(JobView(state, 0), Seen(history=SUCCESS), 1, POLICY)


# Configured hooks and the states each fires on.
HOOK_STATES = {
    "on_success": {S.SUCCESS},
    "on_failure": {S.ERROR, S.LOST, S.TIMEOUT},
    "always": set(S) - {S.REGISTERED, S.QUEUED, S.RUNNING},
}

OWED_CASES: list[tuple[str, tuple[str, ...], S, OwedHooks]] = [
    ("a hook for this state", ("on_success",), S.SUCCESS, OwedHooks(("on_success",))),
    ("a hook for other states", ("on_success",), S.ERROR, OwedHooks()),
    ("no hooks named", (), S.SUCCESS, OwedHooks()),
    ("configured but not named by the job", ("on_failure",), S.SUCCESS, OwedHooks()),
    ("not terminal: nothing owed", ("always", "gone"), S.RUNNING, OwedHooks()),
    ("registered is not terminal either", ("always",), S.REGISTERED, OwedHooks()),
    ("unconfigured: still owed, and named", ("gone",), S.LOST, OwedHooks(("gone",), ("gone",))),
    (
        "the job's order, unconfigured ones among them",
        ("always", "gone", "on_success", "on_failure", "later"),
        S.TIMEOUT,
        OwedHooks(("always", "gone", "on_failure", "later"), ("gone", "later")),
    ),
    ("every terminal state owes 'always'", ("always",), S.NOT_FOUND, OwedHooks(("always",))),
    ("cancelled is terminal", ("always", "on_failure"), S.CANCELLED, OwedHooks(("always",))),
]


@pytest.mark.parametrize(
    ("job_hooks", "state", "owed"),
    [case[1:] for case in OWED_CASES],
    ids=[case[0] for case in OWED_CASES],
)
def test_owed_hooks_table(job_hooks: tuple[str, ...], state: JobState, owed: OwedHooks) -> None:
    assert owed_hooks(job_hooks, state, HOOK_STATES) == owed
