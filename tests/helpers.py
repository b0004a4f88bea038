"""Shared factories for the end-to-end tests: write a manifest, run it in-process against the simulator.

A test module loads the fixtures with ``pytest_plugins = ("tests.helpers",)``; they clean up what they
make (simulators and servers closed, logging reset), as arq's ``tests/conftest.py`` does.
``tests/__init__.py`` registers this module for assertion rewriting, so its checks explain failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from batch_engine.api.client import ClientConfig
from batch_engine.engine import RunOptions, RunResult, run_manifest
from batch_engine.images import verify_image
from batch_engine.manifest import load_manifest
from batch_engine.settings import RunSettings
from batch_engine.sim import SimConfig, Simulator
from batch_engine.timing import backoff
from batch_engine.ui.logs import reset_logging, setup_logging
from batch_engine.ui.progress import ProgressView, make_view

#: A key distinctive enough that finding it anywhere means it leaked.
KEY = "sk-live-Q7xVb3nK9pLm2RtZ8wYc4HdF"
#: Outputs are rendered at 1/16 of the requested size: 1024x1024 becomes 64x64, fast to draw and decode.
SCALE = 1 / 16
EDIT_MODEL = "openai/gpt-image-2-plus"

#: Small timings: the simulator answers in milliseconds, so the engine polls it that fast too.
FAST = RunSettings(
    rate=200.0,
    rate_min=20.0,
    max_in_flight=50,
    timeout=30.0,
    poll_after=0.05,
    poll_interval=0.05,
    poll_interval_max=0.2,
    poll_rate=500.0,
)
#: Predictions end on their second poll: inference is driven by poll counts, not by time.
BASE_SIM = SimConfig(inference_polls=2, image_scale=SCALE)
#: Retries of polls, downloads and lost submits in milliseconds, not seconds.
FAST_RETRY = backoff.RetryPolicy(initial=0.01, maximum=0.05)
FAST_PAUSE = 0.02  #: the first pause after a 429 without Retry-After (1 s in real runs)


def fast_settings(**changes: Any) -> RunSettings:
    """The run settings the tests use, with ``changes`` applied (validated as any RunSettings)."""
    return dataclasses.replace(FAST, **changes)


def expected_size(size: str = "1024x1024") -> tuple[int, int]:
    """The pixel size the simulator renders for a requested ``size`` under SCALE."""
    width, height = (1024, 1024) if size == "auto" else map(int, size.split("x"))
    return max(16, round(width * SCALE)), max(16, round(height * SCALE))


def edit_item(sim: Simulator, item_id: str, **fields: Any) -> dict[str, Any]:
    """An image-edit item with a prompt of its own (so no two items share a body) and one input."""
    return {"id": item_id, "prompt": f"edit {item_id}", "images": [sim.input_url("cat")], **fields}


def edit_items(sim: Simulator, count: int, prefix: str = "item", **fields: Any) -> list[dict[str, Any]]:
    return [edit_item(sim, f"{prefix}-{k}", **fields) for k in range(count)]


@dataclass(frozen=True)
class Outcome:
    """What a run left behind, read back as a user would: the result and the files in the out dir."""

    result: RunResult
    out_dir: Path
    report: dict[str, Any]
    results: list[dict[str, Any]]
    failures: dict[str, Any] | None

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def entries(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.report["items"]
        return items

    def entry(self, item_id: str) -> dict[str, Any]:
        return next(e for e in self.entries if e["id"] == item_id)

    @property
    def statuses(self) -> dict[str, str]:
        return {e["id"]: e["status"] for e in self.entries}

    @property
    def kinds(self) -> dict[str, str | None]:
        """Item id → ``error.kind`` (None for items without an error)."""
        return {e["id"]: (e["error"] or {}).get("kind") for e in self.entries}

    def ids(self, status: str) -> list[str]:
        return [e["id"] for e in self.entries if e["status"] == status]

    def duplicates(self) -> list[str]:
        return [e["id"] for e in self.entries if e["possible_duplicate"]]


def read_outcome(result: RunResult, out_dir: Path) -> Outcome:
    report = yaml.safe_load((out_dir / "report.yaml").read_text(encoding="utf-8"))
    lines = (out_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    failures_path = out_dir / "failures.yaml"
    failures = yaml.safe_load(failures_path.read_text(encoding="utf-8")) if failures_path.exists() else None
    return Outcome(result, out_dir, report, [json.loads(line) for line in lines], failures)


def check_outputs(outcome: Outcome, entry: Mapping[str, Any], size: tuple[int, int]) -> None:
    """Every output of ``entry`` is a file inside the out dir, with its sha256, decoding at ``size``."""
    assert entry["outputs"], f"{entry['id']} has no outputs"
    for output in entry["outputs"]:
        path = (outcome.out_dir / output["path"]).resolve()
        assert outcome.out_dir.resolve() / "images" in path.parents
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
        assert verify_image(data) == size


def check_settled(
    outcome: Outcome, ids: Sequence[str], sizes: Mapping[str, tuple[int, int]] | None = None
) -> None:
    """Nothing is lost: each item is in report.yaml, succeeded (outputs on disk at its size: ``sizes``,
    else 1024x1024 scaled) or failed with a kind, and results.jsonl has one line per item, the same."""
    assert [e["id"] for e in outcome.entries] == list(ids)
    for entry in outcome.entries:
        assert entry["status"] in ("succeeded", "failed"), entry
        if entry["status"] == "failed":
            assert entry["error"]["kind"], entry
            assert entry["error"]["message"], entry
        else:
            check_outputs(outcome, entry, (sizes or {}).get(entry["id"], expected_size()))
    assert sorted(line["id"] for line in outcome.results) == sorted(ids)
    assert {line["id"]: line["status"] for line in outcome.results} == outcome.statuses


class Harness:
    """Makes simulators, manifests and runs under one tmp dir; closes every simulator at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._sims: list[Simulator] = []
        self._manifests = 0

    async def sim(self, **knobs: Any) -> Simulator:
        """A started simulator: BASE_SIM with ``knobs`` applied."""
        sim = Simulator(dataclasses.replace(BASE_SIM, **knobs))
        await sim.start()
        self._sims.append(sim)
        return sim

    def manifest(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        model: str = EDIT_MODEL,
        task: str = "image-edit",
        defaults: Mapping[str, Any] | None = None,
        model_unlisted: bool = False,
    ) -> Path:
        """Write a manifest file of ``items`` and return its path."""
        self._manifests += 1
        doc: dict[str, Any] = {"version": 1, "name": "job", "model": model, "task": task}
        if model_unlisted:
            doc["model_unlisted"] = True
        if defaults:
            doc["defaults"] = dict(defaults)
        doc["items"] = [dict(item) for item in items]
        path = self.tmp_path / f"manifest-{self._manifests}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return path

    async def run(
        self,
        manifest: Path,
        api: Simulator | ScriptedServer,
        *,
        out: str = "out",
        settings: RunSettings = FAST,
        key: str = KEY,
        client: Mapping[str, Any] | None = None,
        copy_inputs: bool = False,
        view: ProgressView | None = None,
        **options: Any,
    ) -> Outcome:
        """Run ``manifest`` against ``api`` into ``tmp_path/out``; return what it left behind."""
        out_dir = self.tmp_path / out
        config = ClientConfig(base_url=api.base_url, api_key=key, **(client or {}))
        timing: dict[str, Any] = {"retry": FAST_RETRY, "pause_initial": FAST_PAUSE} | options
        run_options = RunOptions(
            out_dir=out_dir, settings=settings, client=config, copy_inputs=copy_inputs, **timing
        )
        view = view or make_view(mode="quiet", stream=io.StringIO(), log_every=1)
        result = await run_manifest(load_manifest(manifest), run_options, view=view)
        return read_outcome(result, out_dir)

    async def aclose(self) -> None:
        sims, self._sims = self._sims, []
        for sim in sims:
            await sim.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A Harness under this test's tmp dir; its simulators are closed at teardown."""
    made = Harness(tmp_path)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Everything ``batch_engine`` logs, at DEBUG, redacting KEY, into a buffer; logging reset after."""
    buffer = io.StringIO()
    setup_logging(verbose=True, json_lines=False, stream=buffer, secrets=[KEY])
    try:
        yield buffer
    finally:
        reset_logging()
        logging.getLogger("batch_engine").setLevel(logging.NOTSET)


@dataclass(frozen=True)
class Reply:
    """One canned HTTP answer of a ScriptedServer."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, **headers: str) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})

    @classmethod
    def text(cls, text: str, status: int, content_type: str = "text/html", **headers: str) -> Reply:
        return cls(status, text.encode(), {"Content-Type": content_type, **headers})


@dataclass(frozen=True)
class Seen:
    """One request a ScriptedServer received."""

    method: str
    path: str
    headers: Mapping[str, str]


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that answers each path with the Replies set for it, in order, the
    last one repeating (404 when none), and records every request, headers included: for what the
    simulator never sends."""

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def base_url(self) -> str:
        return self.url

    def reply(self, path: str, *replies: Reply) -> None:
        self.replies[path] = list(replies)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(Seen(request.method, request.path, dict(request.headers)))
        queue = self.replies.get(request.path) or [Reply.text("not scripted", 404, "text/plain")]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))


#: What the ``scripted`` fixture gives: call it for another started server.
Scripted = Callable[[], Awaitable[ScriptedServer]]


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    """A factory of started ScriptedServers; each is closed at teardown."""
    servers: list[ScriptedServer] = []

    async def make() -> ScriptedServer:
        server = ScriptedServer()
        await server.start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()
