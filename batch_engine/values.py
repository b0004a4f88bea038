"""The values that flow between stages and out of the journal: small frozen dataclasses."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch_engine.control import Slot
    from batch_engine.settings import InputsSettings


#: The id of an item the manifest gives none: ``auto-`` and 12 hex digits of its own request fields.
GENERATED_ID_PREFIX = "auto-"


class ItemState(enum.StrEnum):
    """Where one manifest item stands. Transitions: pending → submitting → submitted → succeeded | failed.

    ``submitting`` means the intent to submit was committed and the POST may be in flight: found at
    start-up it marks an ambiguous submit (the server may have accepted it). Every allowed change is
    named in `batch_engine.store.transitions`.
    """

    PENDING = "pending"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: not a state any write moves an item to: what a journal row reads as when it cannot be read (an edited
    #: or corrupted value); a run repairs such rows at start, and reports show them as they are
    DAMAGED = "damaged"

    @property
    def is_final(self) -> bool:
        return self in (ItemState.SUCCEEDED, ItemState.FAILED)


class ErrorKind(enum.StrEnum):
    """One word saying why an item failed; the report's ``error.kind``."""

    CONTENT_POLICY = "content_policy"
    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    NETWORK = "network"
    TIMEOUT = "timeout"
    INFERENCE_FAILED = "inference_failed"
    DOWNLOAD = "download"  #: the prediction completed but an output could not be fetched or verified
    AMBIGUOUS_SUBMIT = "ambiguous_submit"  #: answer lost and --no-resubmit-ambiguous was given
    INPUT = "input"  #: a local input file could not be read, or staged in the object store


#: A limit held a run back only when its stages waited on it this share of the run's time, at least.
HELD_BACK_MIN = 0.05


@dataclass(frozen=True)
class ItemError:
    """Why an item failed. ``status`` is the HTTP status when one was involved."""

    kind: str
    message: str
    status: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "status": self.status, "message": self.message}


@dataclass(frozen=True)
class OutputFile:
    """One downloaded output. ``path`` is relative to the out dir, e.g. ``images/sku-1-1.png``."""

    path: str
    sha256: str
    url: str | None = None  #: where it was downloaded from; None for b64_json outputs
    nsfw: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "url": self.url, "sha256": self.sha256, "nsfw": self.nsfw}


@dataclass(frozen=True)
class Prediction:
    """A parsed prediction envelope (submit and result answers alike), whatever variant it came in."""

    id: str
    status: str  #: lower-cased as received, e.g. ``created``, ``processing``, ``completed``, ``failed``
    outputs: tuple[str, ...] = ()  #: URLs, or base64 strings (maybe with a ``data:`` prefix)
    error: str | None = None  #: None when the server sent null or ""
    nsfw: tuple[bool | None, ...] = ()
    inference_ms: int | None = None
    model: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class RunMeta:
    """What the journal remembers of the manifest a run came from, for reports rebuilt without it."""

    name: str
    manifest_path: str
    model: str
    task: str
    base_url: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)  #: as written in the manifest
    started_at: float | None = None  #: unix seconds
    finished_at: float | None = None
    stopped_reason: str | None = None  #: None when the run finished; else e.g. "interrupted", "auth"
    stats: Mapping[str, Any] = field(default_factory=dict)  #: ``RunStats.as_dict()`` of the last run
    output: str | None = None  #: the manifest's output path template, when it set one
    #: input URL → why no copy of it could be made (for the page), over every run of the out dir
    inputs_not_copied: Mapping[str, str] = field(default_factory=dict)
    #: the out dir's runs, oldest first, the latest last (`run_entry` each); at most ``MAX_RUNS``
    runs: Sequence[Mapping[str, Any]] = field(default_factory=list)
    out: str | None = None  #: the out dir the run writes into, as its first worker named it

    def history(self) -> list[Mapping[str, Any]]:
        """The runs recorded; for a journal written before runs were listed, its last run alone."""
        if self.runs or self.started_at is None:
            return list(self.runs)
        return [run_entry(self.started_at, self.finished_at, self.stats)]


MAX_RUNS = 100  #: runs an out dir's history keeps; older ones are dropped


def run_entry(
    started_at: float, finished_at: float | None = None, stats: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One run of the out dir as its history lists it; ``stats`` is its ``RunStats.as_dict()`` once done."""
    done = stats or {}
    return {
        "started_at": started_at,
        "finished_at": finished_at,
        "elapsed": done.get("elapsed"),
        "submits": done.get("submits", 0),
        "succeeded": done.get("run_succeeded"),
        "failed": done.get("run_failed"),
        "images": done.get("images", 0),
        "stopped_reason": done.get("stopped_reason"),
    } | ({"workers": done["workers"]} if "workers" in done else {})


@dataclass(frozen=True)
class ItemRecord:
    """One journal row: everything known of one manifest item."""

    index: int  #: position in the manifest (0-based); the report's order
    item_id: str
    fingerprint: str
    spec: Mapping[str, Any]  #: the item as written in the manifest (id and its own fields, no defaults)
    request: Mapping[str, Any]  #: the request body sent, defaults applied (manifest field names)
    state: ItemState = ItemState.PENDING
    prediction_id: str | None = None
    attempts: int = 0  #: submits sent for this item, across runs
    possible_duplicate: bool = False  #: resubmitted after an answer was lost: may be billed twice
    outputs: tuple[OutputFile, ...] = ()
    error: ItemError | None = None
    submitted_at: float | None = None  #: unix seconds of the accepted submit
    completed_at: float | None = None  #: unix seconds the engine saw the prediction finish
    inference_ms: int | None = None
    damage: str | None = None  #: what could not be read of a damaged row (state ``damaged``)


@dataclass(frozen=True)
class Item:
    """One validated manifest item."""

    index: int  #: 0-based position in the manifest's ``items``
    id: str  #: unique in the manifest; ``item-<index>`` when the manifest gives none
    spec: Mapping[str, Any]  #: the item as written (its ``id`` included when given), no defaults
    request: Mapping[str, Any]  #: request fields with defaults applied (manifest names, e.g. ``images``)
    fingerprint: str  #: sha256 hex of model, task and ``request``, canonical JSON


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: what ``manifest.load_manifest`` returns."""

    path: str  #: as given on the command line
    name: str
    model: str  #: ``provider/model``, e.g. ``openai/gpt-image-2-plus``
    task: str  #: e.g. ``image-edit``
    defaults: Mapping[str, Any]
    settings: Mapping[str, Any]  #: as written (validated); see ``settings.RunSettings``
    #: a fresh iterator of every item, in manifest order; read from the source again each time it is called
    #: (an items file is streamed, never held whole)
    item_source: Callable[[], Iterator[Item]]
    count: int  #: items in the manifest
    warnings: tuple[str, ...] = ()  #: not errors, e.g. quality ignored by a -plus model
    notes: tuple[str, ...] = ()  #: worth knowing, e.g. how many ids were generated from the items' contents
    output: str = "images/{id}-{k}.{ext}"  #: the output path template (``store.files.OutputTemplate``)
    inputs: InputsSettings | None = None  #: how local input files reach the API; None: no local files
    sync_mode: bool = False  #: some item asks for enable_sync_mode (its submit is held open longer)

    def iter_items(self) -> Iterator[Item]:
        """Every item in manifest order, one at a time."""
        return self.item_source()


@dataclass(frozen=True)
class Snapshot:
    """Live counts of a run, for the progress display and the periodic log line.

    Counts are this run's, but for ``total``, ``done_before`` and ``finished``, which take the out dir's
    items as they stand (a resumed run shows how far the whole job is).
    """

    total: int  #: items in the manifest
    done_before: int  #: items already final when this run started (resume)
    submitted: int  #: accepted submits in this run
    in_flight: int  #: predictions submitted and not yet finished
    succeeded: int  #: items that succeeded in this run
    failed: int  #: items that failed in this run
    rate: float  #: current submit rate, per second
    rate_ceiling: float
    rate_limited: int  #: 429 answers so far (submits and polls)
    polls: int
    elapsed: float  #: seconds since the run started
    images: int  #: output files written in this run
    finish_rate: float | None = None  #: items finished per second over the last minute; None until known

    @property
    def finished(self) -> int:
        """Items final in the out dir: before this run and in it."""
        return self.done_before + self.succeeded + self.failed


@dataclass(frozen=True)
class RunStats:
    """What a run did, for the final summary, ``report.yaml`` and ``index.html``."""

    total: int
    by_state: Mapping[str, int]  #: item counts by ``ItemState`` value
    by_error_kind: Mapping[str, int]
    images: int  #: output files written in this run
    elapsed: float  #: seconds
    submits: int  #: accepted (billed) submits in this run
    submit_attempts: int  #: submit requests sent in this run, 429s included
    rate_limited: int  #: 429 answers in this run
    polls: int
    predictions_resolved: int  #: predictions whose final status was seen in this run
    rate_final: float
    rate_ceiling: float
    possible_duplicates: int
    stopped_reason: str | None = None
    stop_detail: str | None = None  #: what is known of the stop, e.g. the refusal quoted (``refused``)
    #: counts per ``timeline_step`` seconds since the start: ``{"submitted": [...], "finished": [...],
    #: "rate_limited": [...]}``
    timeline: Mapping[str, list[int]] = field(default_factory=dict)
    timeline_step: float = 60.0
    run_succeeded: int = 0  #: items that succeeded in this run (``by_state`` counts every run)
    run_failed: int = 0  #: items that failed in this run
    submit_rate: float | None = None  #: accepted submits per second while submitting; None below two
    in_flight_cap: int = 0  #: the in-flight cap at the end (the user's, or the auto cap as it last was)
    in_flight_auto: bool = False  #: True when the cap followed rate x latency (no max_in_flight set)
    in_flight_max: int = 0  #: the most slots held at once
    #: seconds waited, by limit: ``rate``, ``in_flight``, ``rate_limits``, ``polls`` (see `held_back`)
    waited: Mapping[str, float] = field(default_factory=dict)

    @property
    def held_back(self) -> tuple[str, float] | None:
        """The limit waited on most, with its share of all waiting; None when nothing waited for as long
        as ``HELD_BACK_MIN`` of the run."""
        total = sum(self.waited.values())
        if total <= 0:
            return None
        kind = max(self.waited, key=lambda k: self.waited[k])
        if self.waited[kind] < HELD_BACK_MIN * self.elapsed:
            return None  # a few polls waiting their turn for a moment held nothing back
        return kind, self.waited[kind] / total

    @property
    def run_finished(self) -> int:
        return self.run_succeeded + self.run_failed

    @property
    def polls_per_prediction(self) -> float:
        return self.polls / self.predictions_resolved if self.predictions_resolved else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_state": dict(self.by_state),
            "by_error_kind": dict(self.by_error_kind),
            "images": self.images,
            "elapsed": round(self.elapsed, 3),
            "submits": self.submits,
            "submit_attempts": self.submit_attempts,
            "rate_limited": self.rate_limited,
            "polls": self.polls,
            "predictions_resolved": self.predictions_resolved,
            "polls_per_prediction": round(self.polls_per_prediction, 2),
            "submit_rate": None if self.submit_rate is None else round(self.submit_rate, 3),
            "run_succeeded": self.run_succeeded,
            "run_failed": self.run_failed,
            "rate_final": round(self.rate_final, 3),
            "rate_ceiling": self.rate_ceiling,
            "possible_duplicates": self.possible_duplicates,
            "stopped_reason": self.stopped_reason,
            "stop_detail": self.stop_detail,
            "timeline": {k: list(v) for k, v in self.timeline.items()},
            "timeline_step": self.timeline_step,
            "in_flight_cap": self.in_flight_cap,
            "in_flight_auto": self.in_flight_auto,
            "in_flight_max": self.in_flight_max,
            "waited": {k: round(v, 3) for k, v in self.waited.items()},
            "held_back_by": None if self.held_back is None else self.held_back[0],
        }


@dataclass(frozen=True)
class Tracked:
    """A prediction waiting for its next poll. It holds its in-flight ``slot`` until it resolves."""

    item_id: str
    prediction_id: str
    submitted_at: float  #: unix seconds, from the journal, so deadlines survive a resume
    deadline: float  #: unix seconds after which the item fails with kind ``timeout``
    polls: int = 0  #: polls answered "not done yet"
    errors: int = 0  #: consecutive polls that failed (5xx, network)
    running_at: float = 0.0  #: seconds after submit of the last poll that found it unfinished
    probe: bool = False  #: one of the poll planner's probes: polled early, at doubling times
    slot: Slot = field(kw_only=True, compare=False)


@dataclass(frozen=True)
class Resolved:
    """A prediction that completed, on its way to the sink to have its outputs saved."""

    item_id: str
    prediction: Prediction
    #: a synchronous route's answer (no prediction id): the journal row is still ``submitting``
    answered: bool = False
