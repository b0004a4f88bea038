"""The API simulator: a real aiohttp server on 127.0.0.1 that answers like GPTProto's prediction API.

Every knob is a named field of `SimConfig`, faults included. Decisions (faults, inference times, failures)
are drawn from a hash of ``(seed, what, key)`` — the key being the canonical request body and its attempt
number, or a prediction id and its poll number — never from one shared random stream, so the order
concurrent requests arrive in does not change what happens to each. `SimStats` counts what tests and
benchmarks assert on (billed submits, duplicates, 429s, key leaks, when each prediction finished); it is
also served as JSON at ``GET /_sim/stats``.

Routes on the API origin (`Simulator.base_url`):

    POST /api/v3/{provider}/{model}/{task}        submit
    GET  /api/v3/predictions/{id}/result          poll
    POST /v1/images/edits                         the OpenAI-format route: a multipart form with image[]
                                                  files, answered with the pictures when they are done
    GET  /_sim/outputs/{id}/{k}.png               an output image (no auth; an Authorization header is a leak)
    GET  /_sim/inputs/{name}.png                  a sample input image
    GET  /_sim/stats                              the counters

The foreign origin (`Simulator.foreign_url`) serves the poll route too: a client that follows
``data.urls.get`` there works, but every request it sends with an Authorization header counts as a key leak.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import heapq
import json
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from statistics import NormalDist
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
from aiohttp import web

from batch_engine.sim.config import MODELS, SIZE_PATTERN, PredictionRecord, SimConfig, SimStats
from batch_engine.sim.drawing import render_input, render_output
from batch_engine.sim.requests import images_form_problems, request_problems

logger = logging.getLogger(__name__)

_B64_PREFIX = "data:image/png;base64,"
_FETCH_TIMEOUT = 10.0  #: seconds one input fetch may take (``fetch_inputs``)
_MAX_INPUT_BYTES = 50 * 1024 * 1024  #: an input image, fetched or sent in a form
#: query parameters of a presigned URL: a resend signed again is the same request to the API
_SIGNING_PARAMS = ("x-amz-", "signature", "expires", "awsaccesskeyid")
_RENDER_CACHE_SIZE = 256
_SHUTDOWN_TIMEOUT = 0.5  #: seconds in-flight handlers (a slow answer) get when the simulator closes
_FAILURE_MESSAGE = "the model could not process the input image (simulated)"
_HTML_429 = (
    "<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    "<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


class _Gcra:
    """A strict GCRA (virtual scheduling, ITU-T I.371): ``burst`` requests at once, then one per 1/rate s.

    Invariant: ``_tat`` is the theoretical arrival time of the next request at the steady rate; a request
    earlier than ``_tat - (burst - 1) / rate`` is refused and changes nothing.
    """

    __slots__ = ("_tat",)

    def __init__(self) -> None:
        self._tat = -math.inf

    def allow(self, now: float, *, rate: float, burst: int) -> bool:
        interval = 1.0 / rate
        tat = max(self._tat, now)
        if tat - now > (burst - 1) * interval + 1e-9:
            return False
        self._tat = tat + interval
        return True

    def __repr__(self) -> str:
        return f"<_Gcra tat={self._tat:.3f} now={time.monotonic():.3f}>"


class _RenderCache:
    """Rendered PNGs by key, least recently used dropped first; renders run in a worker thread."""

    def __init__(self, size: int = _RENDER_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    async def get(self, key: tuple[str, int], render: Callable[[], bytes]) -> bytes:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        data = await anyio.to_thread.run_sync(render)
        self._items[key] = data
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return data


class Simulator:
    """The simulated API: ``async with Simulator(SimConfig(...)) as sim:``, then use ``sim.base_url``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._submit_bucket = _Gcra()
        self._poll_bucket = _Gcra()
        self._attempts: Counter[str] = Counter()  #: decision key → requests seen, per kind of request
        #: running predictions: time-driven ones as a heap of (completed_at, id), poll-driven ones by id
        self._running_until: list[tuple[float, str]] = []
        self._running_by_polls: set[str] = set()
        self._renders = _RenderCache()
        self._runners: list[web.AppRunner] = []
        self._urls: list[str] = []
        self._http: aiohttp.ClientSession | None = None  #: fetches inputs (``fetch_inputs``)

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, advertise: str | None = None) -> None:
        """Listen on ``host:port`` (0: a free port) and on a free port for the foreign origin; the URLs it
        hands out (outputs, results) name ``advertise`` (default: ``host``), the name clients reach it by
        when it listens on every address (``0.0.0.0`` in a container)."""
        if self._runners:
            raise RuntimeError("the simulator is already started")
        for app, app_port in ((self._api_app(), port), (self._foreign_app(), 0)):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, host, app_port).start()
            bound = runner.addresses[0]
            self._urls.append(f"http://{advertise or host}:{bound[1]}")
        logger.info("simulator listening on %s", self.base_url)
        # The second origin stands in for another company's host: a key sent there is counted as a leak.
        logger.debug("simulator's stand-in for another host: %s", self.foreign_url)

    async def close(self) -> None:
        """Stop both origins, closing keep-alive connections; in-flight handlers get a moment to finish."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    @property
    def base_url(self) -> str:
        return self._url(0)

    @property
    def foreign_url(self) -> str:
        return self._url(1)

    def input_url(self, name: str) -> str:
        """The URL of a sample input image this simulator serves."""
        return f"{self.base_url}/_sim/inputs/{name}.png"

    def configure(self, **changes: Any) -> None:
        """Change knobs mid-run; counters, predictions and rate buckets carry on."""
        self.config = dataclasses.replace(self.config, **changes)

    def __repr__(self) -> str:
        urls = ", ".join(self._urls) or "not started"
        return f"<Simulator {urls} accepted={self.stats.accepted} running={self._running_count()}>"

    def _url(self, which: int) -> str:
        if len(self._urls) <= which:
            raise RuntimeError("the simulator is not started: use `async with Simulator()` or `start()`")
        return self._urls[which]

    def _api_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v3/{provider}/{model}/{task}", self._submit)
        app.router.add_get("/api/v3/predictions/{id}/result", self._result)
        app.router.add_post("/v1/images/edits", self._images_edit)
        app.router.add_get(r"/_sim/outputs/{id}/{k:\d+}.png", self._output)
        app.router.add_get("/_sim/inputs/{name}.png", self._input)
        app.router.add_get("/_sim/stats", self._stats)
        return app

    def _foreign_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v3/predictions/{id}/result", self._foreign_result)
        return app

    # ---- decisions -------------------------------------------------------------------------------------

    def _chance(self, what: str, key: str) -> float:
        """A number in [0, 1) fixed by (seed, what, key)."""
        digest = hashlib.sha256(f"{self.config.seed}|{what}|{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def _happens(self, what: str, key: str, probability: float) -> bool:
        return probability > 0.0 and self._chance(what, key) < probability

    def _attempt_key(self, kind: str, subject: str) -> str:
        """``subject|n`` where n counts the requests of this kind about this subject so far (1-based)."""
        self._attempts[f"{kind}|{subject}"] += 1
        return f"{subject}|{self._attempts[f'{kind}|{subject}']}"

    def _inference_seconds(self, pred_id: str) -> float:
        median, spread = self.config.inference_median, self.config.inference_spread
        if spread <= 0.0:
            return median
        u = min(max(self._chance("inference", pred_id), 1e-9), 1.0 - 1e-9)
        return median * math.exp(spread * NormalDist().inv_cdf(u))

    # ---- answers -----------------------------------------------------------------------------------------

    def _error(
        self, status: int, message: str, *, type_: str, code: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self.stats.status_counts[status] = self.stats.status_counts.get(status, 0) + 1
        style = self.config.error_body_style
        if style == "text":
            return web.Response(status=status, text=message, headers=headers)
        body: dict[str, Any] = {"code": status, "message": message}
        if style == "openai":
            body = {"error": {"message": message, "type": type_, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    def _too_many(self, message: str, *, code: str, submit: bool) -> web.Response:
        self.stats.rate_limited += 1
        self.stats.rate_limited_submits += int(submit)
        if submit:
            self.stats.rate_limited_times.append(time.monotonic())
        headers = {}
        if self.config.retry_after is not None:
            headers["Retry-After"] = _format_seconds(self.config.retry_after)
        if not self.config.html_429:
            return self._error(429, message, type_="rate_limit_error", code=code, headers=headers)
        self.stats.status_counts[429] = self.stats.status_counts.get(429, 0) + 1
        return web.Response(status=429, text=_HTML_429, content_type="text/html", headers=headers)

    def _server_fault(self, what: str, key: str) -> web.Response | None:
        if self._happens(f"{what}-500", key, self.config.p_500):
            return self._error(500, "internal server error", type_="server_error", code="internal_error")
        if self._happens(f"{what}-503", key, self.config.p_503):
            return self._error(503, "service unavailable", type_="server_error", code="unavailable")
        return None

    def _drop(self, request: web.Request) -> web.Response:
        """Close the connection with no answer; the client sees the server disconnect."""
        self.stats.dropped += 1
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never sent: the transport is closed

    def _check_auth(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("Authorization", "").strip()
        key = self.config.api_key
        if not given:
            message = "missing API key: send it in the Authorization header"
        elif key is None or given in (key, f"Bearer {key}"):
            return None
        else:
            message = "invalid API key"
        return self._error(401, message, type_="authentication_error", code="invalid_api_key")

    def _check_rate(self, *, submit: bool) -> web.Response | None:
        cfg = self.config
        bucket, rate, burst = (
            (self._submit_bucket, cfg.submit_rate, cfg.submit_burst)
            if submit
            else (self._poll_bucket, cfg.poll_rate, cfg.poll_burst)
        )
        if rate is None or bucket.allow(time.monotonic(), rate=rate, burst=burst):
            return None
        message = "rate limit exceeded: too many requests"
        return self._too_many(message, code="rate_limit_exceeded", submit=submit)

    def _check_balance(self) -> web.Response | None:
        if self.config.balance is None or self.stats.accepted < self.config.balance:
            return None
        message = "insufficient balance: top up your account to continue"
        return self._error(403, message, type_="insufficient_quota", code="insufficient_balance")

    def _running_count(self) -> int:
        now = time.monotonic()
        while self._running_until and self._running_until[0][0] <= now:
            heapq.heappop(self._running_until)
        return len(self._running_until) + len(self._running_by_polls)

    def _finish(self, pred: PredictionRecord, now: float) -> None:
        """End a poll-driven prediction now; its reported inference time is the time it really took."""
        pred.completed_at = now
        pred.inference_seconds = now - pred.created_at
        self._running_by_polls.discard(pred.id)

    def _check_concurrency(self) -> web.Response | None:
        cap = self.config.max_concurrent
        if cap is None or self._running_count() < cap:
            return None
        message = f"too many concurrent tasks: at most {cap} may run at once"
        return self._too_many(message, code="too_many_concurrent_tasks", submit=True)

    def _check_model(self, model: str, task: str) -> web.Response | None:
        spec = MODELS.get(model)
        if spec is not None and task in spec.tasks:
            return None
        message = f"model not found: {model}/{task}"
        return self._error(404, message, type_="not_found_error", code="model_not_found")

    def _check_request(self, model: str, task: str, body: Any) -> web.Response | None:
        problem = next(iter(request_problems(MODELS[model], task, body, self.config)), None)
        if problem is None:
            return None
        return self._error(400, problem, type_="invalid_request_error", code="invalid_value")

    def _check_policy(self, body: Mapping[str, Any]) -> web.Response | None:
        if self.config.content_policy_marker not in body["prompt"]:
            return None
        message = (
            "Your request was rejected as a result of our safety system: "
            "the prompt may contain content that is not allowed by our content policy."
        )
        return self._error(400, message, type_="invalid_request_error", code="content_policy_violation")

    # ---- submit ------------------------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        self.stats.submit_requests += 1
        raw = await request.read()
        model = f"{request.match_info['provider']}/{request.match_info['model']}"
        task = request.match_info["task"]
        refused = (
            self._check_auth(request)
            or self._check_model(model, task)
            or self._check_rate(submit=True)
            or self._check_balance()
            or self._check_concurrency()
        )
        if refused is not None:
            return refused
        return await self._submit_checked(request, model, task, raw)

    async def _submit_checked(
        self, request: web.Request, model: str, task: str, raw: bytes
    ) -> web.StreamResponse:
        body, digest = _parse_body(raw, own_origin=self.base_url)
        key = self._attempt_key("submit", digest)
        if self._happens("drop-before", key, self.config.p_drop_before_accept):
            return self._drop(request)
        slow = self._happens("submit-slow", key, self.config.p_slow)
        answer = self._server_fault("submit", key)
        if answer is None:
            answer = self._check_request(model, task, body) or self._check_policy(body)
        images: tuple[str, ...] = ()
        if answer is None:
            images = tuple(_listed(body.get(MODELS[model].image_field)))
            answer, inputs = await self._fetch_inputs(images)
        if answer is None:
            pred = self._accept(model, task, body, digest)
            pred.images, pred.inputs_sha256 = images, inputs
            if self._happens("drop-after", key, self.config.p_drop_after_accept):
                return self._drop(request)
            answer = await self._accepted_answer(pred, sync=body.get("enable_sync_mode") is True)
        if slow:
            await asyncio.sleep(self.config.slow_seconds)
        return answer

    async def _fetch_inputs(self, urls: tuple[str, ...]) -> tuple[web.Response | None, tuple[str, ...]]:
        """With ``fetch_inputs``: GET each input as the real API does; a 400 naming the first that fails,
        else the sha256 of each. Without it, nothing is fetched."""
        if not self.config.fetch_inputs:
            return None, ()
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT))
        digests = []
        for k, url in enumerate(urls):
            try:
                async with self._http.get(url, allow_redirects=False) as resp:
                    data = await resp.content.read(_MAX_INPUT_BYTES + 1)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                status, data = 0, str(exc).encode()
            if status != 200 or len(data) > _MAX_INPUT_BYTES:
                why = f"HTTP {status}" if status else "no answer"
                message = f"Invalid 'images[{k}]': the image could not be downloaded ({why})"
                return self._error(400, message, type_="invalid_request_error", code="invalid_image_url"), ()
            digests.append(hashlib.sha256(data).hexdigest())
        return None, tuple(digests)

    def _accept(
        self,
        model: str,
        task: str,
        body: Mapping[str, Any],
        digest: str,
        *,
        timed: bool = False,
    ) -> PredictionRecord:
        """Bill a request: a new prediction (``timed``: it runs on inference time whatever the knobs)."""
        stats, now = self.stats, time.monotonic()
        previous = stats.body_counts.get(digest, 0)
        stats.body_counts[digest] = previous + 1
        stats.duplicate_bodies += int(previous > 0)
        stats.accepted += 1
        stats.accepted_times.append(now)
        pred = self._new_prediction(model, task, body, digest=digest, copy=previous, now=now, timed=timed)
        stats.predictions[pred.id] = pred
        if pred.completed_at is None:
            self._running_by_polls.add(pred.id)
        else:
            heapq.heappush(self._running_until, (pred.completed_at, pred.id))
        stats.max_concurrent_seen = max(stats.max_concurrent_seen, self._running_count())
        logger.debug("accepted prediction %s (%s/%s)", pred.id, model, task)
        return pred

    def _new_prediction(
        self,
        model: str,
        task: str,
        body: Mapping[str, Any],
        *,
        digest: str,
        copy: int,
        now: float,
        timed: bool = False,
    ) -> PredictionRecord:
        cfg = self.config
        pred_id = hashlib.sha256(f"{cfg.seed}|prediction|{digest}|{copy}".encode()).hexdigest()[:32]
        width, height = _output_size(str(body.get("size") or "1024x1024"), scale=cfg.image_scale)
        seconds = self._inference_seconds(pred_id)
        by_time = timed or cfg.inference_polls is None
        return PredictionRecord(
            id=pred_id,
            model=model,
            task=task,
            prompt=body["prompt"],
            n=int(body.get("n", 1)),
            width=width,
            height=height,
            response_format=str(body.get("response_format") or _default_format(model)),
            body_sha256=digest,
            created_at=now,
            created_wall=time.time(),
            inference_seconds=seconds,
            processing_at=now + seconds * cfg.processing_after if by_time else None,
            completed_at=now + seconds if by_time else None,
            polls_to_complete=None if by_time else cfg.inference_polls,
            failed=self._happens("failed", pred_id, cfg.p_failed),
        )

    async def _accepted_answer(self, pred: PredictionRecord, *, sync: bool) -> web.Response:
        if not sync:
            return web.json_response(await self._envelope(pred, "created"))
        if self.config.sync_early:
            return web.json_response(await self._envelope(pred, self.config.processing_status))
        if pred.completed_at is None:  # driven by poll count: a synchronous answer ends it now
            self._finish(pred, time.monotonic())
        await asyncio.sleep(max(0.0, pred.created_at + pred.inference_seconds - time.monotonic()))
        return web.json_response(await self._envelope(pred, self._seen(pred, time.monotonic())))

    # ---- the OpenAI-format route ---------------------------------------------------------------------------

    async def _images_edit(self, request: web.Request) -> web.StreamResponse:
        """A multipart edit, answered when its pictures are done (inference time; poll counts do not apply).

        Refused before billing as a submit is (auth, rate, balance, concurrency, faults, the form's rules,
        the content policy); once accepted it is billed, and a dropped connection loses the answer only.
        """
        self.stats.submit_requests += 1
        self.stats.images_requests += 1
        form = await _read_form(request)
        refused = (
            self._check_auth(request)
            or self._check_rate(submit=True)
            or self._check_balance()
            or self._check_concurrency()
        )
        if refused is not None:
            return refused
        if form is None:
            message = "expected a multipart/form-data body with model, prompt and image[] files"
            return self._error(400, message, type_="invalid_request_error", code="invalid_body")
        return await self._images_checked(request, *form)

    async def _images_checked(
        self, request: web.Request, fields: dict[str, str], images: list[tuple[str, bytes]]
    ) -> web.StreamResponse:
        shas = tuple(hashlib.sha256(data).hexdigest() for _, data in images)
        digest = _form_digest(fields, shas)
        key = self._attempt_key("submit", digest)
        if self._happens("drop-before", key, self.config.p_drop_before_accept):
            return self._drop(request)
        slow = self._happens("submit-slow", key, self.config.p_slow)
        answer = self._server_fault("submit", key)
        problem = next(iter(images_form_problems(fields, [data for _, data in images])), None)
        if answer is None and problem is not None:
            answer = self._error(400, problem, type_="invalid_request_error", code="invalid_value")
        if answer is None:
            answer = self._check_policy(fields)
        if answer is None:
            body = {
                "prompt": fields["prompt"],
                "size": fields.get("size", "auto"),
                "n": int(fields.get("n", "1")),
                "response_format": "b64_json",
            }
            names = tuple(name for name, _ in images)
            model = f"openai/{fields['model']}"
            pred = self._accept(model, "image-edit", body, digest, timed=True)
            pred.images, pred.inputs_sha256 = names, shas
            if self._happens("drop-after", key, self.config.p_drop_after_accept):
                return self._drop(request)
            answer = await self._images_answer(pred)
        if slow:
            await asyncio.sleep(self.config.slow_seconds)
        return answer

    async def _images_answer(self, pred: PredictionRecord) -> web.Response:
        await asyncio.sleep(max(0.0, pred.created_at + pred.inference_seconds - time.monotonic()))
        self._seen(pred, time.monotonic())
        if pred.failed:  # billed, and answered as the route answers trouble: a 500
            return self._error(500, _FAILURE_MESSAGE, type_="server_error", code="inference_failed")
        prefix = _B64_PREFIX if self.config.b64_data_prefix else ""
        pngs = [await self._output_png(pred, k) for k in range(pred.n)]
        data = [{"b64_json": prefix + _b64(png)} for png in pngs]
        return web.json_response({"data": data, "created": int(pred.created_wall)})

    # ---- poll --------------------------------------------------------------------------------------------

    async def _foreign_result(self, request: web.Request) -> web.StreamResponse:
        self._note_leak(request)
        return await self._result(request)

    async def _result(self, request: web.Request) -> web.StreamResponse:
        self.stats.polls += 1
        cfg = self.config
        refused = self._check_auth(request) or self._check_rate(submit=False)
        if refused is not None:
            return refused
        pred_id = request.match_info["id"]
        key = self._attempt_key("poll", pred_id)
        answer = self._server_fault("poll", key)
        if answer is None:
            answer = await self._poll_answer(pred_id)
        if self._happens("poll-slow", key, cfg.p_slow):
            await asyncio.sleep(cfg.slow_seconds)
        return answer

    async def _poll_answer(self, pred_id: str) -> web.Response:
        pred = self.stats.predictions.get(pred_id)
        if pred is None:
            message = f"prediction not found: {pred_id}"
            return self._error(404, message, type_="not_found_error", code="not_found")
        now = time.monotonic()
        pred.polls += 1
        self.stats.poll_counts[pred.id] = pred.polls
        if pred.completed_at is None and pred.polls >= (pred.polls_to_complete or math.inf):
            self._finish(pred, now)
        return web.json_response(await self._envelope(pred, self._seen(pred, now)))

    def _seen(self, pred: PredictionRecord, now: float) -> str:
        """The status a client is told now, noting the first time it is told the final one."""
        if pred.is_done(now) and pred.first_done_seen_at is None:
            pred.first_done_seen_at = now
        return self._status(pred, now)

    def _status(self, pred: PredictionRecord, now: float) -> str:
        if pred.is_done(now):
            return self.config.failed_status if pred.failed else "completed"
        if pred.polls_to_complete is not None:
            started = pred.polls >= max(1.0, pred.polls_to_complete * self.config.processing_after)
        else:
            started = pred.processing_at is not None and now >= pred.processing_at
        return self.config.processing_status if started else "created"

    async def _envelope(self, pred: PredictionRecord, status: str) -> dict[str, Any]:
        cfg = self.config
        done = status == "completed"
        outputs = await self._outputs(pred) if done else []
        nsfw: list[bool] | None = None if cfg.nsfw_null else [False] * len(outputs)
        error: str | None = "" if cfg.error_empty_string else None
        if status == cfg.failed_status and pred.failed:
            error = _FAILURE_MESSAGE
        inference_ms = round(pred.inference_seconds * 1000) if done or error else 0
        data: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model,
            "outputs": outputs,
            "urls": self._get_urls(pred.id),
            "status": status,
            "error": error,
            "executionTime": inference_ms,
            "timings": {"inference": inference_ms},
            "hasNsfwContents" if cfg.camel_case else "has_nsfw_contents": nsfw,
            "createdAt" if cfg.camel_case else "created_at": _timestamp(
                pred.created_wall, rfc3339=cfg.rfc3339_times
            ),
        }
        return {"data": data, "message": "success", "code": 200}

    def _get_urls(self, pred_id: str) -> dict[str, str] | list[dict[str, str]]:
        origin = self.foreign_url if self.config.foreign_get_url else self.base_url
        urls = {"get": f"{origin}/api/v3/predictions/{pred_id}/result"}
        return [urls] if self.config.urls_as_list else urls

    async def _outputs(self, pred: PredictionRecord) -> list[str]:
        if pred.response_format != "b64_json":
            return [f"{self.base_url}/_sim/outputs/{pred.id}/{k}.png" for k in range(pred.n)]
        prefix = _B64_PREFIX if self.config.b64_data_prefix else ""
        pngs = [await self._output_png(pred, k) for k in range(pred.n)]
        return [prefix + _b64(png) for png in pngs]

    async def _output_png(self, pred: PredictionRecord, k: int) -> bytes:
        seed = self.config.seed
        draw = partial(render_output, pred.width, pred.height, prompt=pred.prompt, index=k, seed=seed)
        return await self._renders.get((pred.id, k), draw)

    # ---- files -------------------------------------------------------------------------------------------

    def _note_leak(self, request: web.Request) -> None:
        if "Authorization" in request.headers:
            self.stats.key_leaks += 1
            logger.warning("key leak: %s %s carried an Authorization header", request.method, request.path)

    async def _output(self, request: web.Request) -> web.StreamResponse:
        self.stats.downloads += 1
        self._note_leak(request)
        pred = self.stats.predictions.get(request.match_info["id"])
        k = int(request.match_info["k"])
        now = time.monotonic()
        if pred is None or pred.failed or not pred.is_done(now) or k >= pred.n:
            return self._error(404, "no such output", type_="not_found_error", code="not_found")
        key = self._attempt_key("download", f"{pred.id}/{k}")
        if self._happens("download-500", key, self.config.p_download_500):
            return self._error(500, "internal server error", type_="server_error", code="internal_error")
        png = await self._output_png(pred, k)
        if self._happens("download-truncated", key, self.config.p_download_truncated):
            return await self._truncated(request, png)
        if self._happens("download-corrupt", key, self.config.p_download_corrupt):
            self.stats.corrupt_downloads += 1
            middle = len(png) // 2
            png = png[:middle] + bytes([png[middle] ^ 0xFF]) + png[middle + 1 :]
        return web.Response(body=png, content_type="image/png")

    async def _truncated(self, request: web.Request, data: bytes) -> web.StreamResponse:
        """Declare the full length, send the first half, close: the client sees a payload error."""
        self.stats.truncated_downloads += 1
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        if request.transport is not None:
            request.transport.close()
        return response

    async def _input(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.stats.inputs[name] = self.stats.inputs.get(name, 0) + 1
        self.stats.input_times.append(time.monotonic())
        if self.config.input_delay:
            await asyncio.sleep(self.config.input_delay)
        png = await self._renders.get((f"input:{name}", 0), partial(render_input, name))
        return web.Response(body=png, content_type="image/png")

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.as_dict())


# ---- small pure helpers ------------------------------------------------------------------------------------


def _parse_body(raw: bytes, *, own_origin: str) -> tuple[Any, str]:
    """The JSON body (None if it is not JSON) and the sha256 of its canonical form (sorted keys).

    The simulator's own origin is cut out of the canonical form: input URLs it serves carry a port that
    changes from run to run, and decisions must not. So are the signatures of presigned input URLs: a
    resend signed again is the same edit, paid again.
    """
    try:
        body = json.loads(raw)
    except ValueError:
        return None, hashlib.sha256(raw).hexdigest()
    plain = body
    if isinstance(body, dict):
        plain = {k: [_unsigned(u) for u in v] if k in _IMAGE_FIELDS else v for k, v in body.items()}
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    canonical = canonical.replace(own_origin, "")
    return body, hashlib.sha256(canonical.encode()).hexdigest()


_IMAGE_FIELDS = frozenset({"images", "image"})


def _listed(value: Any) -> list[str]:
    """A submit's input URLs (gpt-image-1 may send one bare); anything else is none."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [url for url in values if isinstance(url, str) and url.startswith(("http://", "https://"))]


def _unsigned(url: Any) -> Any:
    """A presigned URL without its query (signatures change at each signing); anything else as it is."""
    if not isinstance(url, str) or "?" not in url:
        return url
    base, _, query = url.partition("?")
    keys = [pair.partition("=")[0].lower() for pair in query.split("&")]
    return base if any(key.startswith(_SIGNING_PARAMS) for key in keys) else url


async def _read_form(request: web.Request) -> tuple[dict[str, str], list[tuple[str, bytes]]] | None:
    """A multipart form's text fields and its ``image[]`` files (name, bytes); None if it is not one."""
    if not request.content_type.startswith("multipart/"):
        await request.read()
        return None
    fields: dict[str, str] = {}
    images: list[tuple[str, bytes]] = []
    try:
        async for part in await request.multipart():
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            data = bytes(await part.read())
            if part.name in ("image[]", "image"):
                images.append((part.filename or "", data))
            elif part.name:
                fields[part.name] = data.decode("utf-8", errors="replace")
    except (ValueError, aiohttp.ClientError, OSError, AssertionError):  # OSError: the client went away
        return None
    return fields, images


def _form_digest(fields: Mapping[str, str], shas: tuple[str, ...]) -> str:
    """The sha256 of an images form as the simulator compares them: its fields and its images' bytes."""
    canonical = json.dumps({"fields": dict(fields), "images": list(shas)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _default_format(model: str) -> str:
    spec = MODELS.get(model)
    return spec.default_format if spec is not None else "b64_json"


def _output_size(size: str, *, scale: float) -> tuple[int, int]:
    match = SIZE_PATTERN.match(size)
    width, height = (int(match[1]), int(match[2])) if match else (1024, 1024)
    return max(16, round(width * scale)), max(16, round(height * scale))


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _timestamp(unix: float, *, rfc3339: bool) -> str:
    moment = datetime.fromtimestamp(unix, tz=UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z") if rfc3339 else moment.strftime("%Y-%m-%d %H:%M:%S")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def serve(config: SimConfig, host: str, port: int, advertise: str | None = None) -> None:
    """Run a simulator on ``host:port`` until cancelled (``batch-engine simulate``)."""
    sim = Simulator(config)
    await sim.start(host, port, advertise=advertise)
    logger.info("simulator serving at %s; stats at %s/_sim/stats", sim.base_url, sim.base_url)
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await sim.close()
