"""One job's state and progress on stderr, as ``submit --wait`` follows it: a ``rich``
progress bar on a terminal, one line per change otherwise (logs, pipes). It shows what
the database says (the daemon's record of the ``progress`` messages), so it looks the same
whoever submitted the prompt."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple

from comfywatch.cli.output import printable
from comfywatch.cli.wait import Look

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class Status(NamedTuple):
    """What is shown of one job."""

    state: str
    value: int | None = None
    max: int | None = None
    node: str | None = None

    def text(self) -> str:
        if self.value is None or self.max is None:
            return self.state
        node = f" (node {self.node})" if self.node else ""
        return f"{self.state} {self.value}/{self.max}{node}"


def status_of(look: Look, prompt_id: str) -> Status:
    """The job's state and last recorded progress, as one look found them."""
    rows = look.jobs.get(prompt_id)
    if prompt_id in look.rejected:
        return Status("rejected")
    if not rows:
        return Status("registering" if prompt_id in look.spooled else "unknown")
    row = rows[0]
    return Status(row.state.value, row.progress_value, row.progress_max, row.progress_node)


class ProgressView:
    """``with ProgressView(prompt_id) as view: ... view.show(look)``."""

    def __init__(self, prompt_id: str) -> None:
        from rich.console import Console

        self._prompt_id = prompt_id
        self._console = Console(stderr=True, highlight=False)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last: Status | None = None

    def __enter__(self) -> ProgressView:
        if self._console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[node]}", markup=False),
                TimeElapsedColumn(),
                console=self._console,
            )
            self._task = self._progress.add_task("registering", total=None, node="")
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def show(self, look: Look) -> None:
        status = status_of(look, self._prompt_id)
        if status == self._last:
            return
        self._last = status
        if self._progress is None or self._task is None:
            print(printable(status.text()), file=sys.stderr, flush=True)
            return
        self._progress.update(
            self._task,
            description=printable(status.state),
            total=status.max,
            completed=status.value or 0,
            node=printable(f"node {status.node}") if status.node else "",
        )
