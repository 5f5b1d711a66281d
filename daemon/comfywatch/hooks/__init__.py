"""Completion hooks: the outbox (``hook_deliveries``) and what empties it.

Deliveries are written by :meth:`Store.record` in the same transaction as the job's
terminal state. :class:`HookDispatcher` sends the due ones, concurrently and independently of
polling (claimed in batches, at most ``hook_concurrency`` at once per hook), and records
attempts' results after them, in batches: a crash before a result is recorded means the
attempt is made again (at least once; a webhook keeps its ``webhook-id`` so receivers can
de-duplicate). A result the database cannot take yet is kept and recorded later, not sent
again.

- ``webhook``: POST ``{"type": "job.<state>", "timestamp": ..., "data": <job>}`` signed per
  Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``). A 2xx
  answer is a success; 410 Gone gives up at once; any other answer (redirects included: they
  are not followed), a timeout or a connection error is retried.
- ``command``: ``argv`` run without a shell in a session of its own, the same JSON on stdin,
  the daemon's environment plus ``COMFYWATCH_SERVER``, ``COMFYWATCH_PROMPT_ID``,
  ``COMFYWATCH_STATE`` and ``COMFYWATCH_EVENT_ID`` (``COMFYWATCH_TEST=1`` for the sample
  events of ``comfywatch hooks test``; minus the variables that hold webhook secrets),
  stdout and stderr captured together (capped). Exit status 0 is a success; anything else
  is retried. On timeout the whole process group is killed.

Failed attempt number *n* is retried after ``retry_schedule_s[n-1]`` (±10% jitter); when the
schedule is used up the delivery is ``dead`` (``comfywatch hooks retry`` revives it). A
delivery whose hook is no longer configured is marked dead at once with the error "hook not
configured" (leaving it pending would keep ``--until-done`` waiting forever); revive it after
adding the hook back.

The event's ``timestamp`` is when the job's end was recorded (the same on every retry); the
``webhook-timestamp`` is the real time of the attempt, whatever clock drives the schedule,
since receivers check it against their own clocks.

Secrets, header values and webhook URLs (which often embed tokens) are never logged or
stored. aiohttp and OS errors are turned into short error texts and go no further.

Modules: ``policy`` (the pure retry policy), ``payload`` (event body and signature),
``webhook`` and ``command`` (one attempt of each kind), ``attempt`` (one attempt and its
verdict, no database), ``lanes`` (claimed and running deliveries, per hook), ``recorder``
(outcomes recorded in batches) and ``dispatcher`` (the loop).
"""

from __future__ import annotations

from comfywatch.hooks.attempt import NOT_CONFIGURED
from comfywatch.hooks.dispatcher import HookDispatcher
from comfywatch.hooks.payload import encode_payload, event_payload, sign
from comfywatch.hooks.policy import AttemptResult, Verdict, next_attempt
from comfywatch.hooks.webhook import RESPONSE_EXCERPT_BYTES

__all__ = [
    "NOT_CONFIGURED",
    "RESPONSE_EXCERPT_BYTES",
    "AttemptResult",
    "HookDispatcher",
    "Verdict",
    "encode_payload",
    "event_payload",
    "next_attempt",
    "sign",
]
