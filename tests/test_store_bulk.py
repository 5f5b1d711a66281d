"""Bulk writes and batch reads of the store: a batch of changes, the outbox read in batches,
attempts recorded in batches. Real SQLite files; batches larger than the store's chunks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from comfywatch.history import HistoryRecord, OutputRecord
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import Change, FinishedAttempt, JobFilter, NewJob, Store

# Every test once on SQLite, once on PostgreSQL (the ``store`` fixture's database).
pytestmark = pytest.mark.usefixtures("backend")

NOW_S = 1_700_000_000.0
#: More than one chunk of the store's IN lists (500).
MANY = 1_200


async def register(store: Store, count: int, hooks: Sequence[str] = ("notify",)) -> list[int]:
    """``count`` new jobs (prompt ids p0000, p0001, ...); their ids in that order."""
    jobs = [NewJob("local", f"p{n:04}", {}, tuple(hooks), "t") for n in range(count)]
    assert len(await store.register(jobs, NOW_S)) == count
    by_prompt = {j.prompt_id: j.id for j in await store.active_jobs()}
    return [by_prompt[f"p{n:04}"] for n in range(count)]


def history(n: int, outcome: JobState, *, outputs: int = 2) -> HistoryRecord:
    """A history entry that says which job it belongs to (``number`` and filenames)."""
    return HistoryRecord(
        prompt_id=f"p{n:04}",
        outcome=outcome,
        status_str=outcome.value,
        completed=outcome is JobState.SUCCESS,
        number=n,
        created_at_ms=1_700_000_000_000 + n,
        started_at_ms=1_700_000_001_000 + n,
        finished_at_ms=1_700_000_002_000 + n,
        error=None,
        outputs=tuple(
            OutputRecord(node_id="9", kind="images", position=k, filename=f"{outcome}-{n}-{k}.png")
            for k in range(outputs)
        ),
        entry={"n": n, "outcome": outcome.value},
    )


def finished(job_id: int, n: int, state: JobState, hook: str) -> Change:
    return Change(
        job_id, state, Reason.FINISHED, history(n, state), deliveries=[hook] if hook else []
    )


async def test_a_bulk_record_never_changes_a_terminal_job(store: Store) -> None:
    """A batch naming jobs that are terminal already changes only the others: the terminal
    ones keep their state, times, history, outputs and deliveries (terminal exactly once)."""
    ids = await register(store, MANY)
    first = [finished(i, n, JobState.SUCCESS, "notify") for n, i in enumerate(ids[:300])]
    assert await store.record(first, NOW_S) == ids[:300]
    before = await store.jobs(JobFilter(), with_deliveries=True, with_history=True)
    finished_before = {r.job.id: r for r in before if r.job.state is JobState.SUCCESS}
    assert len(finished_before) == 300

    again = [finished(i, n, JobState.ERROR, "other") for n, i in enumerate(ids)]
    assert await store.record(again, NOW_S + 60) == ids[300:]

    after = {
        r.job.id: r for r in await store.jobs(JobFilter(), with_deliveries=True, with_history=True)
    }
    assert {i: after[i] for i in finished_before} == finished_before
    for n, job_id in enumerate(ids[300:], start=300):
        record = after[job_id]
        assert (record.job.state, record.job.number) == (JobState.ERROR, n)
        assert [o.filename for o in record.outputs] == [f"error-{n}-0.png", f"error-{n}-1.png"]
        assert [d.hook for d in record.deliveries] == ["other"]
    assert await store.record(again, NOW_S + 120) == []  # nothing is active any more


async def test_a_bulk_record_gives_each_job_its_own_values(store: Store) -> None:
    """Changes writing different sets of columns, interleaved in one batch, each land on
    their own job (and only the columns they set)."""
    ids = await register(store, MANY)
    changes: list[Change] = []
    for n, job_id in enumerate(ids):
        match n % 3:
            case 0:
                changes.append(finished(job_id, n, JobState.SUCCESS, ""))
            case 1:
                changes.append(Change(job_id, JobState.QUEUED, queued_at_s=NOW_S + n))
            case _:
                changes.append(Change(job_id, JobState.LOST, Reason.SERVER_RESTARTED))
    assert await store.record(changes, NOW_S + 5_000) == ids

    records = {r.job.id: r for r in await store.jobs(JobFilter(), with_history=True)}
    for n, job_id in enumerate(ids):
        job = records[job_id].job
        if n % 3 == 0:
            assert (job.state, job.number, job.history) == (
                JobState.SUCCESS,
                n,
                {"n": n, "outcome": "success"},
            )
            assert job.comfy_started_at_ms == 1_700_000_001_000 + n
            assert len(records[job_id].outputs) == 2
        elif n % 3 == 1:
            assert job.state is JobState.QUEUED and job.finished_at is None
            assert job.queued_at is not None and job.queued_at.timestamp() == NOW_S + n
            assert job.number is None and not records[job_id].outputs
        else:
            assert (job.state, job.reason, job.number) == (
                JobState.LOST,
                Reason.SERVER_RESTARTED,
                None,
            )
            assert job.finished_at is not None and job.finished_at.timestamp() == NOW_S + 5_000


async def test_an_attempt_recorded_twice_counts_once(store: Store) -> None:
    """A result is applied to the row as its attempt found it: recording it again (after a
    commit that went through despite an error) changes nothing; the next attempt applies."""
    [job_id] = await register(store, 1)
    assert await store.record([finished(job_id, 0, JobState.SUCCESS, "notify")], NOW_S)
    [(delivery, _)] = await store.deliveries()
    failed = FinishedAttempt(
        delivery_id=delivery.id,
        attempt=1,
        state=DeliveryState.PENDING,
        finished_at_s=NOW_S + 1,
        next_attempt_s=NOW_S + 11,
        status_code=500,
        error="HTTP 500",
        response="busy",
    )
    assert await store.record_attempts([failed]) == 1
    assert await store.record_attempts([failed]) == 0
    [(row, _)] = await store.deliveries()
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.PENDING, 1, 500)
    assert row.next_attempt_at is not None and row.next_attempt_at.timestamp() == NOW_S + 11

    delivered = FinishedAttempt(
        delivery_id=delivery.id,
        attempt=2,
        state=DeliveryState.DELIVERED,
        finished_at_s=NOW_S + 12,
        next_attempt_s=None,
        status_code=200,
        error=None,
        response="ok",
    )
    assert await store.record_attempts([delivered, failed]) == 1
    [(row, _)] = await store.deliveries()
    assert (row.state, row.attempts, row.last_response) == (DeliveryState.DELIVERED, 2, "ok")
    assert row.delivered_at is not None and row.delivered_at.timestamp() == NOW_S + 12
    assert row.next_attempt_at is None


async def test_due_batch_leaves_out_what_is_held_and_tells_the_next(store: Store) -> None:
    """Oldest first, up to the limit, with each job's outputs; held ids and hooks left out;
    ``next_at`` is the next delivery due that is neither in the batch nor left out."""
    ids = await register(store, 6, hooks=("a", "b"))
    assert await store.record(
        [
            Change(i, JobState.SUCCESS, history=history(n, JobState.SUCCESS), deliveries=["a", "b"])
            for n, i in enumerate(ids)
        ],
        NOW_S,
    )
    rows = sorted((d for d, _ in await store.deliveries()), key=lambda d: d.id)
    later = rows[-1]  # failed once: due again at NOW_S + 50
    retry = FinishedAttempt(later.id, 1, DeliveryState.PENDING, NOW_S, NOW_S + 50, 500, None, None)
    assert await store.record_attempts([retry]) == 1

    batch = await store.due_batch(NOW_S + 1, 4)
    assert [d.delivery.id for d in batch.deliveries] == [r.id for r in rows[:4]]
    assert batch.next_at is not None and batch.next_at.timestamp() == NOW_S  # more are due
    first = batch.deliveries[0]
    assert first.job.job.id == first.delivery.job_id and len(first.job.outputs) == 2

    held = [d.delivery.id for d in batch.deliveries]
    rest = await store.due_batch(NOW_S + 1, 100, skip_ids=held, skip_hooks=["b"])
    expected = [r.id for r in rows[4:-1] if r.hook == "a"]
    assert [d.delivery.id for d in rest.deliveries] == expected
    assert rest.next_at is None  # the retry is for hook "b", left out

    everything = await store.due_batch(NOW_S + 1, 100, skip_ids=held)
    assert [d.delivery.id for d in everything.deliveries] == [r.id for r in rows[4:-1]]
    assert everything.next_at is not None and everything.next_at.timestamp() == NOW_S + 50

    # Named as due (its delay passed on the dispatcher's monotonic clock): taken whatever
    # its stored time, but only if pending and not left out.
    named = await store.due_batch(NOW_S + 1, 100, skip_ids=held, due_ids=[later.id, rows[0].id])
    assert [d.delivery.id for d in named.deliveries] == [*(r.id for r in rows[4:-1]), later.id]
    assert named.next_at is None
    left_out = await store.due_batch(NOW_S + 1, 100, skip_hooks=["b"], due_ids=[later.id])
    assert later.id not in [d.delivery.id for d in left_out.deliveries]
