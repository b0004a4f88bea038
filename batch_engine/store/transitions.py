"""Every change of an item's state, named, with the states it may start from: the one table journals obey.

An item moves ``pending → submitting → submitted → succeeded | failed``. Each journal write that changes a
state names one `Transition` below and is built from it (``WHERE state IN sources``), the bulk changes at
start-up included, so no path can move an item the table does not allow. A write whose item is not in one
of the sources is a bug in the caller: the journal raises `TransitionRefused` naming the item and both
states, and the engine stops as an internal error (never as a full disk).
"""

from __future__ import annotations

from dataclasses import dataclass

from batch_engine.errors import BatchEngineError
from batch_engine.values import ItemState

PENDING, SUBMITTING, SUBMITTED = ItemState.PENDING, ItemState.SUBMITTING, ItemState.SUBMITTED
SUCCEEDED, FAILED = ItemState.SUCCEEDED, ItemState.FAILED


@dataclass(frozen=True)
class Transition:
    """One named change of state: from any of ``sources`` to ``target``."""

    name: str
    sources: frozenset[ItemState]
    target: ItemState
    why: str

    def allows(self, state: ItemState) -> bool:
        return state in self.sources


def _t(name: str, sources: set[ItemState], target: ItemState, why: str) -> Transition:
    return Transition(name, frozenset(sources), target, why)


# -- during a run, one item at a time
#: A second intent from ``submitting`` is refused: it would hide that the first POST may have landed.
SUBMIT = _t("submit", {PENDING}, SUBMITTING, "the intent to submit, committed before the POST")
ACCEPTED = _t("accepted", {SUBMITTING}, SUBMITTED, "the server answered with a prediction id")
NOT_ACCEPTED = _t(
    "not_accepted",
    {SUBMITTING},
    PENDING,
    "the server certainly did not take it (429, 401, 403, a refused connection), or its answer was lost "
    "and it is sent again (marked possible_duplicate)",
)
SUCCEED = _t("succeed", {SUBMITTED}, SUCCEEDED, "every output was saved")
#: A synchronous route (the OpenAI-format images endpoint) has no prediction id: the row stays
#: ``submitting`` until its answer's outputs are saved, so a run killed in between resends it, flagged.
ANSWERED = _t(
    "answered", {SUBMITTING}, SUCCEEDED, "a synchronous route's answer carried the outputs, all saved"
)
FAIL = _t(
    "fail",
    {PENDING, SUBMITTING, SUBMITTED},
    FAILED,
    "its input could not be staged, the submit was refused (400), the prediction failed or timed out, or "
    "its outputs could not be fetched",
)

# -- at start-up, in bulk
RESEND_AMBIGUOUS = _t(
    "resend_ambiguous", {SUBMITTING}, PENDING, "a submit in flight when a run died: sent again, flagged"
)
FAIL_AMBIGUOUS = _t(
    "fail_ambiguous", {SUBMITTING}, FAILED, "a submit in flight when a run died, with resubmit_ambiguous off"
)
REPOLL_FAILED = _t(
    "repoll_failed",
    {FAILED},
    SUBMITTED,
    "--retry-failed: an accepted prediction that failed on our side is polled again, not paid again",
)
RESEND_FAILED = _t("resend_failed", {FAILED}, PENDING, "--retry-failed: the item is submitted again")
REQUEST_CHANGED = _t(
    "request_changed",
    set(ItemState),
    PENDING,
    "the manifest changed the item's request: it is done again",
)

TABLE: tuple[Transition, ...] = (
    SUBMIT,
    ACCEPTED,
    NOT_ACCEPTED,
    SUCCEED,
    ANSWERED,
    FAIL,
    RESEND_AMBIGUOUS,
    FAIL_AMBIGUOUS,
    REPOLL_FAILED,
    RESEND_FAILED,
    REQUEST_CHANGED,
)


class TransitionRefused(BatchEngineError):
    """A journal write asked for a change of state the table does not allow: a bug, never a user error."""

    def __init__(self, item_id: str, transition: Transition, state: ItemState | None) -> None:
        expected = " or ".join(sorted(source.value for source in transition.sources))
        found = "not in the journal" if state is None else f"{state.value}, not {expected}"
        super().__init__(
            f"internal error: item {item_id!r} cannot go to {transition.target.value} ({transition.name}): "
            f"it is {found}"
        )
        self.item_id = item_id
        self.transition = transition
        self.state = state
