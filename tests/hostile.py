"""A small hostile HTTP server for the tests: one handler per way a server (or an output host) misbehaves.

The simulator stays faithful to the API; what no honest server does lives here, in the spirit of scrapy's
``tests/mockserver``: each behaviour is a small function returning an aiohttp handler, mounted on a path
with ``HostileServer.route`` (a ScriptedServer underneath, so canned Replies work too). The server counts,
per path, the requests it got and the body bytes it managed to send, so a test can tell that the client
stopped reading.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import pytest
from aiohttp import web

from batch_engine.sim.drawing import render_output
from tests.helpers import ScriptedServer, Seen

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EDIT_PATH = "/api/v3/openai/gpt-image-2-plus/image-edit"
BLOCK = 64 * 1024


class HostileServer(ScriptedServer):
    """A ScriptedServer whose paths may also answer as a behaviour mounted on them (``route``); a path with
    neither answers 404. ``hits`` counts the requests per path."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()  #: requests per path
        self.sent: Counter[str] = Counter()  #: body bytes written per path, by the streaming behaviours
        self.auth_seen: list[str] = []  #: every Authorization header received

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A behaviour that never ends (a trickle) must not hold the teardown for aiohttp's default minute.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        if "Authorization" in request.headers:
            self.auth_seen.append(request.headers["Authorization"])
        handler = self.routes.get(request.path)
        if handler is None:
            return await super()._answer(request)
        self.seen.append(Seen(request.method, request.path, dict(request.headers)))
        return await handler(request)


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[], Awaitable[HostileServer]]]:
    """A factory of started HostileServers; each is closed at teardown."""
    servers: list[HostileServer] = []

    async def make() -> HostileServer:
        server = HostileServer()
        await server.start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()


# ---- canned answers -----------------------------------------------------------------------------------


def raw(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> Handler:
    """Always the same bytes (JSON, unless ``headers`` say otherwise)."""
    answer_headers = {"Content-Type": "application/json", **(headers or {})}

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, body=body, headers=answer_headers)

    return handler


def envelope(**data: Any) -> Handler:
    """A 200 success envelope with ``data``."""
    return raw(json.dumps({"data": data, "message": "success", "code": 200}).encode())


def png(width: int = 64, height: int = 64) -> Handler:
    """A real, whole PNG."""
    picture = render_output(width, height, prompt="hostile", index=0)
    return raw(picture, headers={"Content-Type": "image/png"})


def by_prompt(choices: Mapping[str, Handler], default: Handler) -> Handler:
    """The behaviour of the first word of ``choices`` found in the submitted prompt."""

    async def handler(request: web.Request) -> web.StreamResponse:
        prompt = str((await request.json()).get("prompt", ""))
        chosen = next((h for word, h in choices.items() if word in prompt), default)
        return await chosen(request)

    return handler


def echo_auth(server: HostileServer, where: str) -> Handler:
    """A 200 answer that puts the request's own Authorization header (``Bearer <key>``) into ``where``:
    a failed prediction's error and model, the prediction id, or an output URL on ``server``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        auth = request.headers.get("Authorization", "")
        data: dict[str, Any] = {"id": "p-echo", "status": "failed", "error": None, "outputs": []}
        if where == "error":
            data |= {"error": f"invalid token: {auth}", "model": auth, "created_at": auth}
        elif where == "id":
            data |= {"id": auth.removeprefix("Bearer "), "status": "created"}
        else:
            data |= {"status": "completed", "outputs": [f"{server.url}/out/{auth.split()[-1]}.png"]}
        body = json.dumps({"data": data, "code": 200}).encode()
        return web.Response(body=body, headers={"Content-Type": "application/json"})

    return handler


# ---- bodies that never end, or end far too late -------------------------------------------------------


def endless(server: HostileServer, total: int, status: int = 200) -> Handler:
    """A chunked body (no Content-Length) of ``total`` bytes; ``server.sent`` says how far it got."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"\x89PNG\r\n\x1a\n" + bytes(BLOCK - 8)
        try:
            while server.sent[request.path] < total:
                await response.write(block)
                server.sent[request.path] += len(block)
        except ConnectionError:
            pass  # the client hung up: what a cap should make it do
        return response

    return handler


def gzip_bomb(inflated: int, *, answer: bool = False) -> Handler:
    """A small gzip body (Content-Encoding: gzip, its Content-Length the compressed size) that inflates
    to ``inflated`` bytes: zeros, or, with ``answer``, a JSON envelope padded with spaces."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b'{"data": {"id": "p-1", "status": "created"}, "pad": "' if answer else b""
    parts = [packer.compress(head)]
    zeros = (b" " if answer else b"\x00") * (1024 * 1024)
    for _ in range(inflated // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.compress(b'"}' if answer else b""))
    parts.append(packer.flush())
    body = b"".join(parts)
    content_type = "application/json" if answer else "image/png"
    return raw(body, headers={"Content-Encoding": "gzip", "Content-Type": content_type})


def trickle(server: HostileServer, every: float = 0.05, *, drain: bool = False) -> Handler:
    """A 200 that sends its body one byte every ``every`` seconds, for as long as the client listens."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if drain:
            await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while True:
                await response.write(b" ")
                server.sent[request.path] += 1
                await anyio.sleep(every)
        except ConnectionError:
            pass
        return response

    return handler


def accepted(server: HostileServer, *outputs: str, status: str = "completed", **data: Any) -> Handler:
    """A submit accepted as a new prediction (p-1, p-2, ...) of ``status`` with ``outputs`` (paths on
    ``server``, or whole URLs) and any other ``data`` fields."""
    count = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal count
        await request.read()
        count += 1
        urls = [o if "://" in o else server.url + o for o in outputs]
        body = {"data": {"id": f"p-{count}", "status": status, "outputs": urls, **data}, "code": 200}
        return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    return handler


def rate_limited(retry_after: str = "0") -> Handler:
    """A 429, with a Retry-After."""
    body = json.dumps({"error": {"message": "rate limit exceeded", "type": "rate_limit"}}).encode()
    return raw(body, 429, {"Retry-After": retry_after})


def delayed(handler: Handler, seconds: float) -> Handler:
    """``handler``'s answer, given only after ``seconds``."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await anyio.sleep(seconds)
        return await handler(request)

    return slow
