"""What every stage is handed: the client, the ledger, the run control, the retry policy and the clocks."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from batch_engine.api.client import ApiClient
from batch_engine.control import RunControl
from batch_engine.ledger import Ledger
from batch_engine.timing.backoff import DEFAULT_POLICY, RetryPolicy, full_jitter


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """Shared by every worker of every stage; time and chance are parameters so tests never wait."""

    client: ApiClient
    ledger: Ledger
    control: RunControl
    retry: RetryPolicy = DEFAULT_POLICY  #: polls, downloads, refused and lost submits
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    rand: Callable[[], float] = random.random
    clock: Callable[[], float] = time.time  #: unix seconds: deadlines survive a resume
    monotonic: Callable[[], float] = time.monotonic  #: the due queue's clock

    def backoff(self, attempt: int) -> float:
        """The jittered delay before retry number ``attempt`` under this run's retry policy."""
        policy = self.retry
        return full_jitter(attempt, initial=policy.initial, maximum=policy.maximum, rand=self.rand())
