"""Local input files staged in the user's object store: a real S3 server (moto, on loopback), the simulator.

The S3 server's log is its own view of what was uploaded; the simulator fetches every input URL it is sent
(``fetch_inputs``), as the real API does, and keeps the sha256 of what it got.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
import yaml
from PIL import Image

from batch_engine.errors import UsageError
from batch_engine.sim import Simulator
from batch_engine.sim.drawing import render_output
from batch_engine.staging.s3 import sign_get
from tests.helpers import KEY, Harness, Outcome
from tests.procs import wait_until
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, Bucket

pytest_plugins = ("tests.helpers", "tests.s3_server")
pytestmark = pytest.mark.anyio


def write_png(path: Path, label: str) -> bytes:
    data = render_output(48, 32, prompt=label, index=0)
    path.write_bytes(data)
    return data


def write_jpeg(path: Path, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), colour).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged_manifest(
    harness: Harness, items: Sequence[Mapping[str, Any]], inputs: Mapping[str, Any], name: str = "job.yaml"
) -> Path:
    """A manifest of ``items`` (local paths relative to the tmp dir) staging them as ``inputs`` says."""
    doc = {
        "version": 1,
        "name": "staged",
        "settings": {"inputs": dict(inputs)},
        "items": [dict(item) for item in items],
    }
    path = harness.tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def inputs_seen(sim: Simulator) -> dict[str, tuple[str, ...]]:
    """Prompt → the sha256 of each input the simulator fetched for it (its last accepted submit)."""
    return {pred.prompt: pred.inputs_sha256 for pred in sim.stats.predictions.values()}


def signed_query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


async def test_each_file_is_uploaded_once_and_the_api_fetches_the_same_bytes(
    harness: Harness, bucket: Bucket
) -> None:
    """Two items sharing a file and one with its own upload two objects, keyed by content, once each; the
    API fetches exactly the files' bytes; tomorrow's run finds them there and uploads nothing."""
    cat = write_png(harness.tmp_path / "cat.png", "cat")
    dog = write_jpeg(harness.tmp_path / "dog.jpg", (200, 40, 40))
    sim = await harness.sim(fetch_inputs=True)
    items = [
        {"id": "a", "prompt": "a cat", "images": ["cat.png"]},
        {"id": "b", "prompt": "the cat again", "images": ["cat.png"]},
        {"id": "c", "prompt": "cat and dog", "images": ["cat.png", "dog.jpg"]},
    ]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})

    first = await harness.run(manifest, sim)

    assert first.exit_code == 0, first.report
    objects = {f"/{bucket.name}/inputs/{sha(cat)}.png", f"/{bucket.name}/inputs/{sha(dog)}.jpg"}
    assert dict(bucket.server.puts()) == dict.fromkeys(objects, 1)
    assert bucket.object(f"inputs/{sha(cat)}.png") == cat
    assert bucket.object(f"inputs/{sha(dog)}.jpg") == dog
    seen = inputs_seen(sim)
    assert seen == {"a cat": (sha(cat),), "the cat again": (sha(cat),), "cat and dog": (sha(cat), sha(dog))}

    bucket.server.reset()
    tomorrow = staged_manifest(harness, [{**items[0], "id": "d", "prompt": "a cat, tomorrow"}], {
        "upload": bucket.upload_url
    }, name="tomorrow.yaml")
    second = await harness.run(tomorrow, sim, out="out-tomorrow")

    assert second.exit_code == 0, second.report
    assert not bucket.server.puts()
    assert bucket.server.count("HEAD") == 1
    assert inputs_seen(sim)["a cat, tomorrow"] == (sha(cat),)


async def test_every_post_carries_urls_signed_for_it_valid_for_the_ttl(
    harness: Harness, bucket: Bucket
) -> None:
    """A submit whose answer is lost is resent with URLs signed again just before it (never the first
    POST's, which may have expired by then), each valid for url_ttl; the resend is marked
    possible_duplicate."""
    cat = write_png(harness.tmp_path / "cat.png", "cat")
    sim = await harness.sim(fetch_inputs=True, p_drop_after_accept=1.0)
    signed: list[tuple[timedelta, list[str]]] = []

    async def watched(store: Any, keys: Sequence[str], expires_in: timedelta) -> Sequence[str]:
        urls = list(await sign_get(store, keys, expires_in))
        signed.append((expires_in, urls))
        return urls

    async def lost_once(delay: float) -> None:  # the engine's wait before resending: the fault is over
        sim.configure(p_drop_after_accept=0.0)

    items = [{"id": "a", "prompt": "a cat", "images": ["cat.png"]}]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url, "url_ttl": 3600})

    outcome = await harness.run(manifest, sim, sign_inputs=watched, sleep=lost_once)

    assert outcome.statuses == {"a": "succeeded"}
    assert outcome.duplicates() == ["a"]
    assert sim.stats.duplicate_bodies == 1  # the same edit, billed twice: the report says so
    posts = sorted(sim.stats.predictions.values(), key=lambda pred: pred.created_at)
    assert [pred.images for pred in posts] == [tuple(urls) for _, urls in signed]
    assert [expires for expires, _ in signed] == [timedelta(seconds=3600)] * 2
    first, again = (signed_query(pred.images[0]) for pred in posts)
    assert first["X-Amz-Expires"] == again["X-Amz-Expires"] == "3600"
    assert again["X-Amz-Date"] >= first["X-Amz-Date"]
    assert [pred.inputs_sha256 for pred in posts] == [(sha(cat),)] * 2


async def test_a_public_bucket_gets_plain_urls_and_nothing_signed(harness: Harness, bucket: Bucket) -> None:
    """With public_base_url the API gets that URL and the object key, unsigned, and fetches the file."""
    cat = write_png(harness.tmp_path / "cat.png", "cat")
    bucket.make_public()
    sim = await harness.sim(fetch_inputs=True)
    public = f"{bucket.server.endpoint}/{bucket.name}/"
    items = [{"id": "a", "prompt": "a cat", "images": ["cat.png"]}]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url, "public_base_url": public})

    outcome = await harness.run(manifest, sim)

    assert outcome.exit_code == 0, outcome.report
    [pred] = sim.stats.predictions.values()
    assert pred.images == (f"{public}inputs/{sha(cat)}.png",)
    assert pred.inputs_sha256 == (sha(cat),)


async def test_a_file_that_cannot_be_read_any_more_fails_only_its_item(
    harness: Harness, bucket: Bucket
) -> None:
    """A file gone between validation and its upload fails its item as input, nothing sent for it; the
    items before and after it succeed."""
    write_png(harness.tmp_path / "cat.png", "cat")
    write_png(harness.tmp_path / "gone.png", "gone")
    sim = await harness.sim(fetch_inputs=True, p_slow=1.0, slow_seconds=1.0)
    items = [
        {"id": "a", "prompt": "a cat", "images": ["cat.png"]},
        {"id": "b", "prompt": "gone", "images": ["gone.png"]},
        {"id": "c", "prompt": "a cat again", "images": ["cat.png"]},
    ]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})
    outcomes: list[Outcome] = []

    async def run() -> None:  # one submitter: item b is staged only once a's slow answer has come back
        outcomes.append(await harness.run(manifest, sim, submit_workers=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: sim.stats.accepted == 1, what="item a accepted")
        (harness.tmp_path / "gone.png").unlink()
        sim.configure(p_slow=0.0)

    [outcome] = outcomes
    assert outcome.statuses == {"a": "succeeded", "b": "failed", "c": "succeeded"}
    error = outcome.entry("b")["error"]
    assert error["kind"] == "input"
    assert "gone.png cannot be read" in error["message"]
    assert outcome.entry("b")["attempts"] == 0
    assert sim.stats.submit_requests == 2
    assert sorted(pred.prompt for pred in sim.stats.predictions.values()) == ["a cat", "a cat again"]


async def test_an_upload_that_keeps_failing_fails_only_its_item_and_nothing_secret_is_written(
    harness: Harness, bucket: Bucket, debug_log: io.StringIO
) -> None:
    """A file the store refuses to take (500 after every retry) fails its item as input; the others
    succeed; no credential, signature or presigned URL is in the log, the reports or the journal."""
    cat = write_png(harness.tmp_path / "cat.png", "cat")
    bad = write_png(harness.tmp_path / "bad.png", "bad")
    bucket.server.faults.fail_puts.add(sha(bad))
    sim = await harness.sim(fetch_inputs=True)
    items = [
        {"id": "a", "prompt": "a cat", "images": ["cat.png"]},
        {"id": "b", "prompt": "bad", "images": ["bad.png"]},
        {"id": "c", "prompt": "a cat FORBIDDEN", "images": ["cat.png"]},
    ]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})

    outcome = await harness.run(manifest, sim, copy_inputs=True)

    assert outcome.kinds == {"a": None, "b": "input", "c": "content_policy"}
    message = outcome.entry("b")["error"]["message"]
    assert f"could not upload {sha(bad)}.png" in message
    assert "8 attempts" in message
    assert f"{sha(cat)}.png" in debug_log.getvalue()  # the log says what was staged, by key
    written = [debug_log.getvalue().encode()]
    written += [path.read_bytes() for path in outcome.out_dir.rglob("*") if path.is_file()]
    for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID, "X-Amz-Signature", "X-Amz-Credential", KEY):
        assert not [blob[:80] for blob in written if secret.encode() in blob], secret


async def test_refused_credentials_stop_the_run_and_a_rerun_resumes(harness: Harness, bucket: Bucket) -> None:
    """A store that refuses the credentials (403) stops the run as 'staging' (exit 3) with every item
    pending and nothing billed; once it takes them, the same command finishes the run."""
    write_png(harness.tmp_path / "cat.png", "cat")
    write_png(harness.tmp_path / "dog.png", "dog")
    bucket.server.faults.deny = True
    sim = await harness.sim(fetch_inputs=True)
    items = [
        {"id": "a", "prompt": "a cat", "images": ["cat.png"]},
        {"id": "b", "prompt": "a dog", "images": ["dog.png"]},
    ]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})

    stopped = await harness.run(manifest, sim)

    assert stopped.exit_code == 3
    assert stopped.report["stopped_reason"] == "staging"
    assert set(stopped.statuses.values()) == {"pending"}
    assert sim.stats.submit_requests == 0
    bucket.server.faults.deny = False
    resumed = await harness.run(manifest, sim)
    assert resumed.exit_code == 0, resumed.report
    assert sim.stats.accepted == 2


async def test_the_first_submit_does_not_wait_for_the_last_upload(harness: Harness, bucket: Bucket) -> None:
    """While one file's upload is held back, the items whose files are in go on being submitted: the held
    upload goes through only once the API has accepted a submit, and the run completes."""
    names = [f"p{k}.png" for k in range(4)]
    data = [write_png(harness.tmp_path / name, name) for name in names]
    bucket.server.faults.hold_puts = sha(data[-1])
    sim = await harness.sim(fetch_inputs=True)
    items = [{"id": f"i{k}", "prompt": f"edit {k}", "images": [name]} for k, name in enumerate(names)]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})
    outcomes: list[Outcome] = []

    async def run() -> None:
        outcomes.append(await harness.run(manifest, sim))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: sim.stats.accepted >= 1, what="a submit accepted while an upload is held")
        bucket.server.faults.release.set()

    assert (bucket.server.faults.held, bucket.server.faults.held_too_long) == (1, False)
    assert outcomes[0].exit_code == 0, outcomes[0].report
    assert len(bucket.server.puts()) == 4


async def test_a_profile_is_read_through_boto3(
    harness: Harness, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AWS_PROFILE and no keys in the environment, the profile's keys and region are used (through
    boto3), as the AWS tools do."""
    write_png(harness.tmp_path / "cat.png", "cat")
    credentials = harness.tmp_path / "credentials"
    credentials.write_text(
        "[nightly]\naws_access_key_id = AKIAFROMPROFILE0001\naws_secret_access_key = profile-secret\n"
    )
    config = harness.tmp_path / "config"
    config.write_text("[profile nightly]\nregion = ap-south-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_PROFILE", "nightly")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    sim = await harness.sim(fetch_inputs=True)
    items = [{"id": "a", "prompt": "a cat", "images": ["cat.png"]}]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})

    outcome = await harness.run(manifest, sim)

    assert outcome.exit_code == 0, outcome.report
    [pred] = sim.stats.predictions.values()
    assert signed_query(pred.images[0])["X-Amz-Credential"].startswith("AKIAFROMPROFILE0001/")
    assert "/ap-south-1/s3/" in signed_query(pred.images[0])["X-Amz-Credential"]


async def test_without_the_s3_extra_the_run_says_what_to_install(
    harness: Harness, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without obstore installed, a manifest that stages files is refused before anything is sent, naming
    the extra to install."""
    write_png(harness.tmp_path / "cat.png", "cat")
    for name in ("obstore", "obstore.store", "obstore.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does for a module that is not there
    sim = await harness.sim()
    items = [{"id": "a", "prompt": "a cat", "images": ["cat.png"]}]
    manifest = staged_manifest(harness, items, {"upload": bucket.upload_url})

    with pytest.raises(UsageError, match=r"pip install 'batch-engine\[s3\]'"):
        await harness.run(manifest, sim)
    assert sim.stats.submit_requests == 0
