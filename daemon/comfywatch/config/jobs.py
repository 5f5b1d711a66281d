"""``[[jobs]]`` tables: validated into :class:`JobSpec` values against the known servers and hooks.

Shared by the main file (:mod:`comfywatch.config.loader`) and the spool files of
``jobs_dir`` (:mod:`comfywatch.spool`), so that a mistake reads the same in both: file,
line, key. :func:`job_specs` reports every mistake of a file at once, and refuses the
same (server, prompt_id) twice in one set of tables, naming both places.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from comfywatch.config.document import Document, Problems, check_top_level, validate_table
from comfywatch.config.keylines import KeyPath, format_key
from comfywatch.config.schema import suggest
from comfywatch.config.settings import JobSpec
from comfywatch.errors import ConfigError, config_errors

__all__ = [
    "JOBS_FILE_KIND",
    "LocatedJob",
    "check_hook_names",
    "check_jobs_file",
    "check_unique",
    "job_specs",
]

#: How a file of ``[[jobs]]`` only (a spool file) is named in errors.
JOBS_FILE_KIND = "jobs file"
_JOBS_FILE_KEYS = ("jobs",)


@dataclass(frozen=True, slots=True)
class LocatedJob:
    """A validated job and where it was written, for the duplicate-job error."""

    job: JobSpec
    source: str
    line: int | None
    key: str


def check_jobs_file(doc: Document) -> None:
    """``doc`` holds nothing but ``[[jobs]]`` tables."""
    check_top_level(doc, _JOBS_FILE_KEYS, hint="; jobs files may only hold [[jobs]] tables")


def check_hook_names(
    doc: Document, loc: KeyPath, names: tuple[str, ...], hooks: Collection[str] | None
) -> None:
    """Every name in ``names`` is a configured hook (unless ``hooks`` is None: unknown,
    the ``[hooks]`` table being broken), and none is listed twice."""
    seen: set[str] = set()
    problems: list[ConfigError] = []
    for index, name in enumerate(names):
        if hooks is not None and name not in hooks:
            known = ", ".join(hooks) or "none are configured"
            problems.append(
                doc.error(
                    (*loc, index),
                    f"unknown hook {name!r}{suggest(name, tuple(hooks))}; hooks: {known}",
                )
            )
        elif name in seen:
            problems.append(doc.error((*loc, index), f"hook {name!r} is listed twice"))
        seen.add(name)
    if problems:
        raise config_errors(problems)


def job_specs(
    doc: Document,
    *,
    servers: Collection[str] | None,
    hooks: Collection[str] | None,
    default_hooks: tuple[str, ...],
) -> list[LocatedJob]:
    """The ``[[jobs]]`` tables of ``doc`` validated, each named once; raises every problem.

    ``servers`` and ``hooks`` are the configured names (None: unknown, their table being
    broken, so not checked); a job that names no hooks gets ``default_hooks`` (checked
    with ``[daemon]``, not here).
    """
    tables = doc.data.get("jobs", [])
    if not isinstance(tables, list):
        raise doc.error(("jobs",), "must be an array of tables: write each job as [[jobs]]")
    problems = Problems()
    jobs: list[LocatedJob] = []
    for index, table in enumerate(tables):
        job = problems.check(
            _job, doc, index, table, servers=servers, hooks=hooks, default_hooks=default_hooks
        )
        if job is not None:
            jobs.append(job)
    problems.check(check_unique, jobs)
    problems.raise_all()
    return jobs


def _job(
    doc: Document,
    index: int,
    table: object,
    *,
    servers: Collection[str] | None,
    hooks: Collection[str] | None,
    default_hooks: tuple[str, ...],
) -> LocatedJob:
    loc: KeyPath = ("jobs", index)
    job = validate_table(
        doc,
        JobSpec,
        table,
        loc,
        given={"source": str(doc.path)},
        defaults={"hooks": default_hooks},
    )
    if servers is not None and job.server not in servers:
        known = ", ".join(servers) or "none are configured"
        raise doc.error(
            (*loc, "server"),
            f"unknown server {job.server!r}{suggest(job.server, tuple(servers))}; servers: {known}",
        )
    if isinstance(table, dict) and "hooks" in table:
        check_hook_names(doc, (*loc, "hooks"), job.hooks, hooks)
    line = doc.line_of((*loc, "prompt_id"))
    return LocatedJob(job, str(doc.path), line, format_key(loc))


def check_unique(jobs: list[LocatedJob]) -> None:
    """No (server, prompt_id) twice; each error names both places."""
    first: dict[tuple[str, str], LocatedJob] = {}
    problems: list[ConfigError] = []
    for where in jobs:
        key = (where.job.server, where.job.prompt_id)
        previous = first.setdefault(key, where)
        if previous is where:
            continue
        place = f"{previous.source}:{previous.line}" if previous.line else previous.source
        problems.append(
            ConfigError(
                f"duplicate job: server {key[0]!r} prompt_id {key[1]!r} "
                f"is already registered at {place} ({previous.key})",
                file=where.source,
                key=f"{where.key}.prompt_id",
                line=where.line,
            )
        )
    if problems:
        raise config_errors(problems)
