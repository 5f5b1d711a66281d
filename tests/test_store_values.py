"""The store hands out frozen values that match its tables, and stores states as words."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from comfywatch.history import OutputRecord, parse_history_entry
from comfywatch.states import DeliveryState, JobState, Reason
from comfywatch.store import (
    Change,
    DeliveryRow,
    JobFilter,
    JobRow,
    NewJob,
    Store,
    output_columns,
)
from comfywatch.store.models import Base, HookDelivery, Job, JobOutput, render_type
from comfywatch.views import output_json

from .helpers import only_entry

NOW_S = 1_700_000_000.0


async def finished(store: Store, prompt_id: str = "p1") -> int:
    """Register a job and record it as a success (from a recorded entry) owing ``notify``."""
    await store.register([NewJob("local", prompt_id, {"k": "v"}, ("notify",), "t")], NOW_S)
    [job] = [j for j in await store.active_jobs() if j.prompt_id == prompt_id]
    record = parse_history_entry(*only_entry("success_saveimage_history.json"))
    change = Change(job.id, JobState.SUCCESS, Reason.FINISHED, record, deliveries=["notify"])
    assert await store.record([change], NOW_S + 1) == [job.id]
    return job.id


@pytest.mark.parametrize(
    ("value_type", "model", "not_columns"),
    [
        (JobRow, Job, set()),
        (DeliveryRow, HookDelivery, set()),
        (OutputRecord, JobOutput, {"id", "job_id"}),
    ],
)
def test_values_have_a_field_for_every_column(
    value_type: type, model: type[Base], not_columns: set[str]
) -> None:
    """A column added to a table without its value field (or the reverse) fails here."""
    columns = {c.name for c in model.__table__.columns} - not_columns
    assert {f.name for f in dataclasses.fields(value_type)} == columns


async def test_values_outlive_their_session_and_are_frozen(store: Store) -> None:
    """What the store returns is read after its transaction: no lazy loads, no ORM rows."""
    await finished(store)
    [record] = await store.jobs(JobFilter(), with_deliveries=True)
    assert record.job.history is None  # not asked for: absent, not a detached lazy load
    assert record.job.state is JobState.SUCCESS and record.job.reason is Reason.FINISHED
    assert record.job.labels == {"k": "v"} and record.job.hooks == ("notify",)
    [delivery] = record.deliveries
    assert delivery.state is DeliveryState.PENDING and delivery.event_type == "job.success"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.job.state = JobState.ERROR  # type: ignore[misc]
    [with_history] = await store.jobs(JobFilter(), with_history=True)
    assert with_history.job.history is not None and "outputs" in with_history.job.history
    [(due, job)] = await store.due_deliveries(NOW_S + 2, limit=10)
    assert (due, job.id) == (delivery, record.job.id)


async def test_outputs_come_back_as_they_were_recorded(store: Store) -> None:
    job_id = await finished(store)
    written = parse_history_entry(*only_entry("success_saveimage_history.json")).outputs
    stored = await store.job_record(job_id)
    assert stored is not None and stored.outputs == written


async def test_states_are_stored_as_their_lowercase_values(store: Store, tmp_path: Path) -> None:
    """``sqlite3`` users read the same words as before the columns were typed."""
    job_id = await finished(store)
    [(delivery, _)] = await store.deliveries(states=[DeliveryState.PENDING])
    await store.finish_attempt(
        delivery.id,
        state=DeliveryState.DEAD,
        now_s=NOW_S + 2,
        next_attempt_s=None,
        status_code=500,
        error="HTTP 500",
        response=None,
    )
    with sqlite3.connect(tmp_path / "db.sqlite") as conn:
        job = conn.execute("SELECT state, reason FROM jobs WHERE id = ?", (job_id,)).fetchone()
        dl = conn.execute("SELECT state FROM hook_deliveries").fetchone()
    assert (job, dl) == (("success", "finished"), ("dead",))
    assert await store.deliveries(states=[DeliveryState.PENDING]) == []
    stats = await store.stats()
    assert stats.jobs == {("local", JobState.SUCCESS): 1}
    assert stats.deliveries == {("notify", DeliveryState.DEAD): 1}


@pytest.mark.parametrize(
    ("out", "columns", "as_json"),
    [
        (
            OutputRecord("9", "images", 0, "a.png", "", "output", extra={"w": 1}),
            {"filename": "a.png", "value": None, "extra": {"w": 1}},
            {"filename": "a.png", "extra": {"w": 1}},
        ),
        (
            OutputRecord("9", "images", 1, "b.png", "sub", "temp"),
            {"filename": "b.png", "value": None, "extra": None},
            {"filename": "b.png"},
        ),
        (
            OutputRecord("3", "text", 0, value="hello"),
            {"filename": None, "value": "hello", "extra": None},
            {"filename": None, "value": "hello"},
        ),
    ],
)
def test_one_mapping_of_an_output_for_columns_and_json(
    out: OutputRecord, columns: dict[str, object], as_json: dict[str, object]
) -> None:
    """The JSON view is the stored columns less a file's value and an empty extra."""
    assert output_columns(out).items() >= columns.items()
    assert set(output_columns(out)) == {c.name for c in JobOutput.__table__.columns} - {
        "id",
        "job_id",
    }
    assert output_json(out).items() >= as_json.items()
    assert set(output_json(out)) == set(output_columns(out)) - (set(columns) - set(as_json))


def test_autogenerated_migrations_render_plain_column_types() -> None:
    """A new revision written by ``alembic revision --autogenerate`` imports no comfywatch
    type: states render as the VARCHARs they are, datetimes as DateTime(timezone=True)."""
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"render_item": render_type})
        code = render_python_code(
            produce_migrations(context, Base.metadata).upgrade_ops, render_item=render_type
        )
    engine.dispose()
    assert "comfywatch" not in code
    assert "sa.Column('state', sa.String(length=32), nullable=False)" in code
    assert "sa.Column('reason', sa.String(length=64), nullable=True)" in code
    assert "sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False)" in code
