"""A minimal Chrome DevTools Protocol client: run headless Chromium, open a page, send commands, keep events.

Only aiohttp (already a dependency) speaks the websocket; no browser-automation package is needed. One
websocket carries every session ("flattened" sessions: each message names its ``sessionId``), as described
in https://chromedevtools.github.io/devtools-protocol/ under Target.attachToTarget.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

#: What this machine's Chromium needs to start headless as root and stay off the (closed) network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
_LISTENING = "DevTools listening on "


class CdpError(Exception):
    """Raised when the browser answers a command with an error, dies, or a page expression throws."""


@dataclass(frozen=True)
class Event:
    """One protocol event, as the browser sent it."""

    method: str
    params: dict[str, Any]
    session_id: str | None


class Connection:
    """The browser websocket: commands matched to answers by id; every event kept in order in ``events``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[Event]]] = []
        self.events: list[Event] = []  #: every event received, oldest first

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None
    ) -> dict[str, Any]:
        """Send one command and return its ``result``; raise CdpError on an error answer or a timeout."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        answer = asyncio.get_running_loop().create_future()
        self._pending[message_id] = answer
        await self._ws.send_str(json.dumps(message))
        try:
            return await asyncio.wait_for(answer, COMMAND_TIMEOUT)
        except TimeoutError:
            raise CdpError(f"{method}: no answer within {COMMAND_TIMEOUT:.0f}s") from None
        finally:
            self._pending.pop(message_id, None)

    def expect(self, method: str) -> asyncio.Future[Event]:
        """A future for the next event named ``method``; ask for it before the command that causes it."""
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, waiter))
        return waiter

    async def read_forever(self) -> None:
        """Dispatch answers and events until the socket closes; then fail whatever still waits."""
        async for frame in self._ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                self._dispatch(json.loads(frame.data))
        closed = CdpError("the browser closed the DevTools connection")
        waiting: list[asyncio.Future[Any]] = [*self._pending.values(), *(w for _, w in self._waiters)]
        for future in waiting:
            if not future.done():
                future.set_exception(closed)

    def _dispatch(self, message: dict[str, Any]) -> None:
        future = self._pending.get(message.get("id", -1))
        if future is not None and not future.done():
            if "error" in message:
                future.set_exception(CdpError(f"{message['error'].get('message')} ({message['error']})"))
            else:
                future.set_result(message.get("result", {}))
        elif "method" in message:
            self._event(Event(message["method"], message.get("params", {}), message.get("sessionId")))

    def _event(self, event: Event) -> None:
        self.events.append(event)
        for method, waiter in list(self._waiters):
            if method == event.method and not waiter.done():
                waiter.set_result(event)
                self._waiters.remove((method, waiter))


class Page:
    """One page target: commands in its session, and JavaScript evaluated in it."""

    def __init__(self, connection: Connection, session_id: str) -> None:
        self.connection = connection
        self.session_id = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.connection.send(method, params, session_id=self.session_id)

    def events(self, method: str) -> list[Event]:
        """The events of this page named ``method`` so far."""
        return [e for e in self.connection.events if e.method == method and e.session_id == self.session_id]

    async def evaluate(self, expression: str) -> Any:
        """Evaluate ``expression`` (awaiting a promise) and return its JSON value; raise if it throws."""
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        result = await self.send("Runtime.evaluate", params)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"page script threw: {text}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        loaded = self.connection.expect("Page.loadEventFired")
        answer = await self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"could not open {url}: {answer['errorText']}")
        try:
            await asyncio.wait_for(loaded, COMMAND_TIMEOUT)
        except TimeoutError:
            raise CdpError(f"{url} did not finish loading within {COMMAND_TIMEOUT:.0f}s") from None


@contextlib.asynccontextmanager
async def open_page(executable: str, *, user_data_dir: Path) -> AsyncIterator[Page]:
    """Start Chromium with a fresh profile; yield a blank page, its Page, Runtime, Log, Network domains on."""
    async with (
        chromium(executable, user_data_dir=user_data_dir) as ws_url,
        aiohttp.ClientSession() as http,
        # Screenshots arrive as one base64 message of several MB.
        http.ws_connect(ws_url, max_msg_size=0) as ws,
    ):
        connection = Connection(ws)
        reader = asyncio.create_task(connection.read_forever())
        try:
            target = await connection.send("Target.createTarget", {"url": "about:blank"})
            attach = {"targetId": target["targetId"], "flatten": True}
            session = await connection.send("Target.attachToTarget", attach)
            page = Page(connection, session["sessionId"])
            for domain in ("Page", "Runtime", "Log", "Network"):
                await page.send(f"{domain}.enable")
            yield page
            with contextlib.suppress(CdpError):
                await connection.send("Browser.close")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@contextlib.asynccontextmanager
async def chromium(executable: str, *, user_data_dir: Path) -> AsyncIterator[str]:
    """Run Chromium in a process group of its own; yield its DevTools websocket URL; end the group after."""
    process = await asyncio.create_subprocess_exec(
        executable,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stderr is not None
    log: deque[str] = deque(maxlen=40)
    try:
        url = await _devtools_url(process.stderr, log)
        # Keep reading stderr so a chatty browser never blocks on a full pipe.
        drain = asyncio.create_task(_drain(process.stderr, log))
        yield url
        drain.cancel()
    finally:
        await _stop(process)


async def _devtools_url(stderr: asyncio.StreamReader, log: deque[str]) -> str:
    async def find() -> str:
        while line := (await stderr.readline()).decode(errors="replace"):
            log.append(line.rstrip())
            if line.startswith(_LISTENING):
                return line[len(_LISTENING) :].strip()
        raise CdpError("Chromium exited before it listened")

    try:
        return await asyncio.wait_for(find(), START_TIMEOUT)
    except (CdpError, TimeoutError) as exc:
        lines = "\n".join(log)
        raise CdpError(f"Chromium did not start ({exc or 'timed out'}); its last lines:\n{lines}") from None


async def _drain(stderr: asyncio.StreamReader, log: deque[str]) -> None:
    while line := await stderr.readline():
        log.append(line.decode(errors="replace").rstrip())


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Give Chromium a moment to exit after Browser.close, then kill its process group (renderers too)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
