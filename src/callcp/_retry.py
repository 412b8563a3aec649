"""Retries: the policy (:class:`Retry`), and one request's budget of tries
(:class:`Attempts`), shared by both adapters and both pools.  The adapters
only decide how to wait (``time.sleep`` or ``asyncio.sleep``).

What may be tried again (docs/reliability.md):

- opening a connection (connect, handshake): always, on a
  :class:`~callcp.RetryableError` -- no request has been sent;
- a request whose ``send()`` raised: the message never reached the peer's
  application (a message is delivered only whole, and a failed send leaves
  its end unwritten);
- a request answered by :class:`~callcp.ServerBusy`: the server's proof that
  it declined before it could read anything (protocol §4.10), or by a
  :class:`~callcp.ServerGoingAway` whose count of delivered messages leaves
  it out (``unread``, protocol §8);
- any other request that failed after it was sent (the reply lost, the
  connection reset, the server gone): only when the caller said it is
  idempotent, because the server may have acted on it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional

from ._core.errors import CallcpError, ServerBusy, ServerGoingAway

__all__ = ["Retry", "Attempts"]


@dataclass(frozen=True)
class Retry:
    """How often, and how patiently, to try again after a transient failure.

    ``attempts`` tries in all (the first included); before try *n* + 1 the
    wait is ``backoff * 2**(n-1)`` seconds, at most ``max_backoff``; with
    ``jitter`` it is drawn uniformly from [wait/2, wait], so clients that
    failed together do not come back together.  Only
    :class:`~callcp.RetryableError` failures are retried.

    ``Retry()`` tries 5 times over about 1.5 s; for a server restart or a
    network partition of several seconds, give it more, e.g.
    ``Retry(attempts=10, max_backoff=2.0)`` (about 10 s).
    """

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"attempts must be a whole number >= 1, not {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be a whole number >= 1, not {self.attempts!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < float("inf")
            ):
                raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
        if self.max_backoff < self.backoff:
            raise ValueError(
                f"max_backoff ({self.max_backoff}) must not be below backoff ({self.backoff})"
            )
        if not isinstance(self.jitter, bool):
            raise ValueError(f"jitter must be True or False, not {self.jitter!r}")

    def wait(self, tries: int) -> float:
        """The wait after ``tries`` failed tries (1, 2, ...)."""
        wait = float(min(self.max_backoff, self.backoff * 2 ** min(tries - 1, 62)))
        if self.jitter:
            wait = random.uniform(wait / 2, wait)  # noqa: S311 (timing, not secrets)
        return wait


class Attempts:
    """One operation's tries under a :class:`Retry` (None: one try)."""

    __slots__ = ("retry", "log", "what", "tries")

    def __init__(self, retry: Optional[Retry], log: logging.Logger, what: str) -> None:
        self.retry = retry
        self.log = log
        self.what = what
        self.tries = 0

    def again(
        self,
        exc: BaseException,
        *,
        sent: bool = False,
        idempotent: bool = False,
        reused: bool = False,
    ) -> Optional[float]:
        """After a failed try: the wait before the next one, or None (give
        up: the caller raises ``exc``).  ``sent``: the request may have
        reached the peer's application (its ``send()`` returned).
        ``reused``: the connection came from a pool's idle ones; dead before
        the request left, it is replaced at once, without counting a try."""
        if reused and not sent and isinstance(exc, CallcpError) and exc.retryable:
            return 0.0
        self.tries += 1
        retry = self.retry
        if retry is None or self.tries >= retry.attempts:
            return None
        if not isinstance(exc, CallcpError) or not exc.retryable:
            return None
        if sent and not idempotent and not _unread(exc):
            return None  # (the server may have acted on it: never a duplicate)
        wait = retry.wait(self.tries)
        self.log.info(
            "%s failed (%s: %s); trying again in %.2f s (try %d of %d)",
            self.what, type(exc).__name__, exc, wait, self.tries + 1, retry.attempts,
        )  # fmt: skip
        return wait


def _unread(exc: CallcpError) -> bool:
    """The server proved that it never read the last message sent."""
    return isinstance(exc, ServerBusy) or (isinstance(exc, ServerGoingAway) and exc.unread > 0)
