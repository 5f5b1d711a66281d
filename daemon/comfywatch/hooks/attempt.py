"""One delivery attempt: the event sent to its hook (a webhook or a command) and the retry
policy's verdict on it. No database here: the outcome goes back to the dispatcher, which
records it together with others in one transaction.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from comfywatch.config import HookSettings, WebhookHookSettings
from comfywatch.hooks.command import command_env, run_command
from comfywatch.hooks.payload import encode_payload, event_payload
from comfywatch.hooks.policy import JITTER, AttemptResult, Verdict, next_attempt
from comfywatch.hooks.webhook import WebhookSender
from comfywatch.store import DueDelivery, FinishedAttempt

NOT_CONFIGURED = "hook not configured"


@dataclass(frozen=True, slots=True)
class Outcome:
    """An attempt made: what it gave, and the verdict to record."""

    due: DueDelivery
    result: AttemptResult
    verdict: Verdict
    finished_at_s: float
    duration_s: float

    @property
    def delivery_id(self) -> int:
        return self.due.delivery.id

    @property
    def hook(self) -> str:
        return self.due.delivery.hook

    def finished(self) -> FinishedAttempt:
        """What the store records for this attempt."""
        return FinishedAttempt(
            delivery_id=self.delivery_id,
            attempt=self.due.delivery.attempts + 1,
            state=self.verdict.state,
            finished_at_s=self.finished_at_s,
            next_attempt_s=self.verdict.next_attempt_s,
            status_code=self.result.status_code,
            error=self.result.error,
            response=self.result.response,
        )

    def log_fields(self) -> dict[str, Any]:
        """The fields of this attempt's log line (no URL, header or secret)."""
        delivery, job = self.due.delivery, self.due.job.job
        return {
            "hook": delivery.hook,
            "server": job.server,
            "prompt_id": job.prompt_id,
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "attempt": delivery.attempts + 1,
            "status": self.result.status_code,
            "error": self.result.error,
        }


class Attempts:
    """Makes attempts: webhooks over one HTTP session, commands as child processes."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._webhooks = WebhookSender()
        self._clock = clock

    async def close(self) -> None:
        """Close the HTTP session (a later attempt opens a new one)."""
        await self._webhooks.close()

    async def make(self, due: DueDelivery, hooks: Mapping[str, HookSettings]) -> Outcome:
        """Send ``due`` once with ``hooks`` (the settings when it starts); its outcome."""
        started = time.monotonic()
        hook = hooks.get(due.delivery.hook)
        if hook is None:
            result = AttemptResult(ok=False, error=NOT_CONFIGURED, final=True)
            schedule_s: tuple[float, ...] = ()
        else:
            result = await self._send(due, hook, hooks)
            schedule_s = hook.retry_schedule_s
        now_s = self._clock()
        verdict = next_attempt(
            result,
            attempt=due.delivery.attempts + 1,
            schedule_s=schedule_s,
            now_s=now_s,
            jitter=random.uniform(1 - JITTER, 1 + JITTER),  # noqa: S311 - jitter, not crypto
        )
        return Outcome(due, result, verdict, now_s, time.monotonic() - started)

    async def _send(
        self, due: DueDelivery, hook: HookSettings, hooks: Mapping[str, HookSettings]
    ) -> AttemptResult:
        delivery = due.delivery
        body = encode_payload(event_payload(delivery, due.job))
        if isinstance(hook, WebhookHookSettings):
            return await self._webhooks.post(hook, delivery.event_id, body)
        hidden = [
            other.secret_env
            for other in hooks.values()
            if isinstance(other, WebhookHookSettings) and other.secret_env
        ]
        env = command_env(os.environ, delivery, due.job.job, hidden=hidden)
        return await run_command(hook, env=env, body=body)
