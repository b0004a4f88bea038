"""The run-wide breaker: many submits in a row refused alike means the run is wrong, not the items.

A typo in the model gets ``404 model not found`` for every item, and a parameter the API rejects for every
item gets the same 400 each time: without a breaker a night of 10,000 items sends 10,000 doomed requests.
`Breaker` counts refusals that are not about one item (anything but ``content_policy``) with the same status
and message, with no accepted submit in between; at ``threshold`` in a row it trips, and from then on every
refusal with that status and message is the run's, not its item's: the submit stage leaves the item pending
and the run stops submitting (`StopReason.REFUSED`), resumable once the manifest or the account is fixed.
Item-specific refusals differ in their message (an input URL that cannot be fetched names the URL), so they
never make a streak; neither do content-policy refusals, which are each about a prompt.
"""

from __future__ import annotations

from batch_engine.values import ErrorKind

DEFAULT_THRESHOLD = 20  #: refusals in a row, all alike, that stop the run


class Breaker:
    """A pure counter of consecutive identical non-item refusals. Not thread-safe; one per run.

    Invariant: ``_streak`` refusals with status and message ``_key`` arrived with ``_accepted`` accepted
    submits counted before each, none in between; ``tripped`` is that key once the streak reached
    ``threshold``, and it never changes afterwards.
    """

    __slots__ = ("_accepted", "_key", "_streak", "threshold", "tripped")

    def __init__(self, threshold: int = DEFAULT_THRESHOLD) -> None:
        if threshold < 1:
            raise ValueError(f"the breaker's threshold must be at least 1, got {threshold}")
        self.threshold = threshold
        self.tripped: tuple[int | None, str] | None = None  #: the (status, message) that tripped it
        self._key: tuple[int | None, str] | None = None
        self._streak = 0
        self._accepted = -1

    def __repr__(self) -> str:
        return f"<Breaker streak={self._streak}/{self.threshold} tripped={self.tripped!r}>"

    def refused(self, kind: str, status: int | None, message: str, *, accepted: int) -> bool:
        """Count one refused submit; True when it is the run's fault (the breaker is, or now goes, off).

        ``accepted`` is how many submits the run has had accepted so far: a change means one got through
        since the last refusal, which breaks the streak.
        """
        key = (status, message)
        if self.tripped is not None:
            return key == self.tripped
        if kind == ErrorKind.CONTENT_POLICY:
            return False
        if key != self._key or accepted != self._accepted:
            self._key, self._streak, self._accepted = key, 0, accepted
        self._streak += 1
        if self._streak >= self.threshold:
            self.tripped = key
        return self.tripped is not None

    @property
    def detail(self) -> str:
        """The tripping refusal as a stop message quotes it, e.g. ``404: model not found: a/b/image-edit``."""
        if self.tripped is None:
            return ""
        status, message = self.tripped
        return f"{status}: {message}" if status is not None else message
