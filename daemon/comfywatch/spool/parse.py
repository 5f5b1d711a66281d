"""One spool file to jobs: ``[[jobs]]`` tables only, validated as the main file's are.

The rules and the wording of every mistake are those of :mod:`comfywatch.config.jobs`
(file, line, key), checked against the running configuration's servers and hooks. A file
may not name the same job twice; the same job in two files is a re-registration. Only a
regular file of at most :data:`MAX_SPOOL_BYTES` is read: a named pipe, a symbolic link or
a huge file dropped by mistake is refused, never waited on or loaded whole.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from comfywatch.config import JobSpec, Settings
from comfywatch.config.document import Document, Problems, os_reason, parse_document
from comfywatch.config.jobs import JOBS_FILE_KIND, check_jobs_file, job_specs
from comfywatch.errors import ConfigError

__all__ = ["MAX_SPOOL_BYTES", "parse_spool_bytes", "read_spool_file"]

#: The largest spool file read (about 100,000 jobs): split bigger batches.
MAX_SPOOL_BYTES = 16 * 1024 * 1024


def read_spool_file(path: Path, settings: Settings) -> list[JobSpec]:
    """The jobs of the spool file at ``path``. Raises ConfigError, and only ConfigError."""
    return parse_spool_bytes(path, _read_regular_file(path), settings)


def parse_spool_bytes(path: Path, raw: bytes, settings: Settings) -> list[JobSpec]:
    """The jobs of ``raw``, the text of a spool file about to be written at ``path``."""
    doc = parse_document(path, raw, kind=JOBS_FILE_KIND)
    problems = Problems()
    problems.check(check_jobs_file, doc)
    jobs = problems.check(_jobs, doc, settings)
    problems.raise_all()
    assert jobs is not None  # no problem: the jobs were read
    return jobs


def _jobs(doc: Document, settings: Settings) -> list[JobSpec]:
    located = job_specs(
        doc,
        servers=settings.servers,
        hooks=settings.hooks,
        default_hooks=settings.daemon.default_hooks,
    )
    return [where.job for where in located]


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (not followed if a symbolic link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        problem = "is a symbolic link, not a file" if exc.errno == errno.ELOOP else os_reason(exc)
    else:
        try:
            problem, raw = _read_open_file(fd)
        except OSError as exc:
            problem = os_reason(exc)
        finally:
            os.close(fd)
        if not problem:
            return raw
    raise ConfigError(f"cannot read {JOBS_FILE_KIND}: {problem}", file=str(path))


def _read_open_file(fd: int) -> tuple[str, bytes]:
    """(what is wrong, or "", the bytes) of the open file ``fd``."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not a file", b""
    if not stat.S_ISREG(mode):
        return "is not a regular file", b""
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_SPOOL_BYTES:
            return f"is larger than {MAX_SPOOL_BYTES // (1024 * 1024)} MiB: split it", b""
    return "", b"".join(chunks)
