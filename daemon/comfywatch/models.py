"""SQLAlchemy models: the tables people query (names and columns are a public interface)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Job(Base):
    """One tracked prompt: a (server, prompt_id) pair and everything learnt about it."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("server", "prompt_id"),
        Index("ix_jobs_state_server", "state", "server"),
        Index("ix_jobs_finished_at", "finished_at"),
        Index("ix_jobs_prompt_id", "prompt_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    server: Mapped[str] = mapped_column(String(255))
    prompt_id: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(64))
    status_str: Mapped[str | None] = mapped_column(String(64))
    completed: Mapped[bool | None] = mapped_column(Boolean)
    number: Mapped[int | None] = mapped_column(BigInteger)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hooks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    source: Mapped[str | None] = mapped_column(Text)

    registered_at: Mapped[datetime]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    detected_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    comfy_created_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    comfy_started_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    comfy_finished_at_ms: Mapped[int | None] = mapped_column(BigInteger)

    error_node_id: Mapped[str | None] = mapped_column(Text)
    error_node_type: Mapped[str | None] = mapped_column(Text)
    error_exception_type: Mapped[str | None] = mapped_column(Text)
    error_exception_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)

    #: Up to 1 MB per job: loaded only when asked for (``Store.jobs(with_history=True)``).
    history: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), deferred=True)


class JobOutput(Base):
    """One output record of a finished job: a file (image, video, ...) or a plain value."""

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "node_id", "kind", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    node_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str | None] = mapped_column(Text)
    subfolder: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(Text)
    value: Mapped[Any | None] = mapped_column(JSON(none_as_null=True))
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class HookDelivery(Base):
    """One completion hook owed for one terminal job (the outbox)."""

    __tablename__ = "hook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "hook"),
        Index("ix_hook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    hook: Mapped[str] = mapped_column(String(255))
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
