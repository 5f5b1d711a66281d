"""The spool: jobs registered by renaming a file into ``jobs_dir``.

- ``inbox``: the directory (what waits, ``done/``, ``rejected/`` with ``.error`` files,
  pruning them); blocking calls only.
- ``parse``: one file to jobs, with the main file's ``[[jobs]]`` rules and messages.
- ``ingest``: :class:`Spool`, which the daemon asks once per pass to register what waits.
- ``register``: writing a spool file for ``comfywatch register``, and waiting for the
  daemon's verdict.
"""

from __future__ import annotations

from comfywatch.spool.inbox import DONE, REJECTED, is_spool_name
from comfywatch.spool.ingest import Spool

__all__ = ["DONE", "REJECTED", "Spool", "is_spool_name"]
