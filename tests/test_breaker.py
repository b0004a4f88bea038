"""The run-wide breaker: submits refused alike, in a row, for a reason no item can fix stop the run."""

from __future__ import annotations

import pytest
import yaml

from batch_engine.manifest import load_manifest
from batch_engine.stages.breaker import DEFAULT_THRESHOLD, Breaker
from tests.helpers import Harness, edit_item, edit_items

pytest_plugins = ("tests.helpers",)

NOT_FOUND = (404, "model not found: acme/painter/image-edit")


def refuse(breaker: Breaker, times: int, *, accepted: int = 0, kind: str = "invalid_request") -> list[bool]:
    return [breaker.refused(kind, *NOT_FOUND, accepted=accepted) for _ in range(times)]


def test_the_breaker_trips_on_the_threshold_th_identical_refusal() -> None:
    """Refusals alike with nothing accepted in between are the items' own until the threshold-th one."""
    breaker = Breaker(threshold=3)
    assert refuse(breaker, 4) == [False, False, True, True]
    assert breaker.detail == "404: model not found: acme/painter/image-edit"


def test_an_accepted_submit_or_another_error_breaks_the_streak() -> None:
    """An accepted submit between two refusals, or a refusal of another kind, starts the count again."""
    breaker = Breaker(threshold=3)
    assert refuse(breaker, 2, accepted=0) == [False, False]
    assert refuse(breaker, 2, accepted=1) == [False, False]
    assert not breaker.refused("invalid_request", 400, "size 10x10 is too small", accepted=1)
    assert refuse(breaker, 2, accepted=1) == [False, False]
    assert breaker.tripped is None


def test_content_policy_refusals_never_trip_it() -> None:
    """Content-policy refusals are each about one prompt: however many in a row, the run goes on."""
    breaker = Breaker(threshold=2)
    assert refuse(breaker, 5, kind="content_policy") == [False] * 5


def test_once_tripped_only_the_same_refusal_is_the_runs() -> None:
    """After the trip, the same refusal is the run's, while another one is still its item's."""
    breaker = Breaker(threshold=1)
    assert refuse(breaker, 1) == [True]
    assert not breaker.refused("invalid_request", 400, "bad image", accepted=0)
    assert refuse(breaker, 1, accepted=5) == [True]


@pytest.mark.anyio
async def test_an_unknown_model_stops_the_run_after_a_streak_of_404s(harness: Harness) -> None:
    """A model the API does not know (sent with model_unlisted) gets 404 for every submit: the run stops
    submitting after the breaker's threshold, exits 3 quoting the error, and leaves the rest pending."""
    sim = await harness.sim()
    count = DEFAULT_THRESHOLD * 3
    manifest = harness.manifest(edit_items(sim, count), model="acme/painter", model_unlisted=True)

    outcome = await harness.run(manifest, sim)

    assert outcome.exit_code == 3
    assert outcome.report["stopped_reason"] == "refused"
    assert outcome.report["counts"]["failed"] == DEFAULT_THRESHOLD - 1
    assert outcome.report["unfinished_by_state"]["pending"] == count - (DEFAULT_THRESHOLD - 1)
    assert set(outcome.kinds.values()) == {"invalid_request", None}
    assert sim.stats.submit_requests < count
    assert sim.stats.accepted == 0
    assert outcome.result.stats.stop_detail == "404: model not found: acme/painter/image-edit"


@pytest.mark.anyio
async def test_refusals_about_content_or_between_accepted_submits_never_stop(harness: Harness) -> None:
    """Content-policy refusals, however many in a row, and identical refusals with accepted submits
    between them are each about their item: every item is tried, the run finishes (exit 1)."""
    sim = await harness.sim(accept_data_uris=False)
    count = DEFAULT_THRESHOLD + 5
    policy = [edit_item(sim, f"bad-{k}", prompt=f"draw {k} FORBIDDEN") for k in range(count)]
    mixed = []
    for k in range(count):
        mixed.append({"id": f"inline-{k}", "prompt": f"edit {k}", "images": ["data:image/png;base64,AAAA"]})
        mixed.append(edit_item(sim, f"ok-{k}"))
    outcome = await harness.run(harness.manifest([*policy, *mixed]), sim)

    assert outcome.exit_code == 1
    assert outcome.report["stopped_reason"] is None
    counts = outcome.report["counts"]
    assert (counts["succeeded"], counts["failed"], counts["unfinished"]) == (count, 2 * count, 0)


@pytest.mark.anyio
async def test_failures_of_an_unlisted_model_rerun_as_they_are(harness: Harness) -> None:
    """failures.yaml of a run of an unlisted model carries model_unlisted, so it validates as it is."""
    sim = await harness.sim()
    manifest = harness.manifest(edit_items(sim, DEFAULT_THRESHOLD), model="acme/painter", model_unlisted=True)

    outcome = await harness.run(manifest, sim)

    failures = outcome.out_dir / "failures.yaml"
    assert yaml.safe_load(failures.read_text(encoding="utf-8"))["model_unlisted"] is True
    assert load_manifest(failures).model == "acme/painter"
