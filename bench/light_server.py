"""A prediction API that is never the bottleneck: just enough of the simulator's wire shapes, at once.

The overhead figure measures the client's cost, so the server must cost less than either client. This app
keeps one dict of prediction ids and precomputed bytes: a submit answers ``created``, the first poll answers
``completed`` with one output URL, the output and the input images are the same tiny PNGs every time. No
auth check, limits, faults, or rendering. ``python -m bench.light_server`` prints its base URL on one line and
serves until its stdin closes (as `bench.simproc` does), so it also ends when the benchmark dies.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sys
from types import TracebackType
from typing import Any

from aiohttp import web

from batch_engine.sim.drawing import render_input, render_output

_OUTPUT_SIDE = 64
_INPUT_SIDE = 64


class LightServer:
    """The app: submit, poll, output download, input images (GET and HEAD)."""

    def __init__(self) -> None:
        self.base_url = ""
        self._ids = itertools.count()
        self._output = render_output(_OUTPUT_SIDE, _OUTPUT_SIDE, prompt="light", index=0)
        self._input = render_input("light", _INPUT_SIDE, _INPUT_SIDE)
        self._model: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v3/{provider}/{model}/{task}", self._submit)
        app.router.add_get("/api/v3/predictions/{id}/result", self._result)
        app.router.add_get("/_sim/outputs/{id}/{k}.png", self._png_output)
        app.router.add_get("/_sim/inputs/{name}.png", self._png_input)  # GET answers HEAD too
        return app

    def _envelope(self, pred_id: str, status: str) -> bytes:
        done = status == "completed"
        data: dict[str, Any] = {
            "id": pred_id,
            "model": self._model.get(pred_id, ""),
            "outputs": [f"{self.base_url}/_sim/outputs/{pred_id}/0.png"] if done else [],
            "urls": {"get": f"{self.base_url}/api/v3/predictions/{pred_id}/result"},
            "status": status,
            "error": None,
            "executionTime": 1 if done else 0,
            "timings": {"inference": 1 if done else 0},
            "has_nsfw_contents": [False] if done else [],
            "created_at": "2026-01-01T00:00:00.000000Z",
        }
        return json.dumps({"data": data, "message": "success", "code": 200}).encode()

    async def _submit(self, request: web.Request) -> web.Response:
        await request.read()
        pred_id = f"light-{next(self._ids):08d}"
        self._model[pred_id] = f"{request.match_info['provider']}/{request.match_info['model']}"
        return web.Response(body=self._envelope(pred_id, "created"), content_type="application/json")

    async def _result(self, request: web.Request) -> web.Response:
        pred_id = request.match_info["id"]
        if pred_id not in self._model:
            return web.json_response({"code": 404, "message": "no such prediction"}, status=404)
        return web.Response(body=self._envelope(pred_id, "completed"), content_type="application/json")

    async def _png_output(self, request: web.Request) -> web.Response:
        return web.Response(body=self._output, content_type="image/png")

    async def _png_input(self, request: web.Request) -> web.Response:
        return web.Response(body=self._input, content_type="image/png")


class LightServerProcess:
    """``with LightServerProcess() as server:`` — a light server child serving at ``server.base_url``."""

    def __init__(self) -> None:
        import subprocess

        self._subprocess = subprocess
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> LightServerProcess:
        from bench.simproc import ROOT

        cmd = [sys.executable, "-m", "bench.light_server"]
        proc = self._proc = self._subprocess.Popen(
            cmd, stdin=self._subprocess.PIPE, stdout=self._subprocess.PIPE, text=True, cwd=ROOT
        )
        assert proc.stdout is not None
        self.base_url = proc.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the light server did not start (exit code {proc.returncode})")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except self._subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _serve() -> None:
    server = LightServer()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    await web.SockSite(runner, sock).start()
    print(server.base_url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # EOF: the parent closed stdin
    await runner.cleanup()


def main() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(_serve())
    else:
        uvloop.run(_serve())


if __name__ == "__main__":
    main()
