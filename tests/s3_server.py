"""A real S3-compatible server for the tests: moto's, on 127.0.0.1, behind a layer that sees every request.

moto's standalone server (the werkzeug app its ``ThreadedMotoServer`` runs) serves in a thread for the
whole session; each test gets a fresh bucket and the standard AWS variables pointing at it. The layer in
front counts requests (the server's view: which objects were PUT, how often) and injects faults one knob at
a time, as the simulator does: PUTs that answer 500, every request refused with 403, a PUT held until the
test lets it through. Load it with ``pytest_plugins = ("tests.s3_server",)``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

#: Test credentials distinctive enough that finding one anywhere means it leaked.
ACCESS_KEY_ID = "AKIATESTSTAGING7Q4X"
SECRET_ACCESS_KEY = "s3cr3t-Staging-Do-Not-Leak-9f2Kq8Zp"
REGION = "eu-west-3"
HOLD_TIMEOUT = 20.0  #: seconds a held PUT waits for the test at most
WSGI = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str  #: ``/bucket/key``, as sent (path style)
    query: str


@dataclass
class Faults:
    """What the layer does instead of passing a request to moto; all off by default."""

    fail_puts: set[str] = field(default_factory=set)  #: a PUT whose path contains one of these gets 500
    deny: bool = False  #: every request is refused with 403 AccessDenied
    hold_puts: str | None = None  #: a PUT whose path contains this waits for ``release`` first
    release: threading.Event = field(default_factory=threading.Event)
    held: int = 0  #: PUTs that were held
    held_too_long: bool = False  #: a held PUT gave up waiting (HOLD_TIMEOUT)


class S3Server:
    """moto's S3 on 127.0.0.1:<free port>, in a thread, with `Faults` and a request log in front."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.faults = Faults()
        self._lock = threading.Lock()
        self._moto: WSGI = DomainDispatcherApplication(create_backend_app)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    def reset(self) -> None:
        self.faults = Faults()
        with self._lock:
            self.requests.clear()

    def create_bucket(self) -> str:
        name = f"inputs-{uuid.uuid4().hex[:12]}"
        with urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")):
            pass
        return name

    def puts(self) -> Counter[str]:
        """Object path → PUTs that reached moto (faults excluded)."""
        with self._lock:
            return Counter(r.path for r in self.requests if r.method == "PUT" and r.path.count("/") > 1)

    def count(self, method: str) -> int:
        with self._lock:
            return sum(r.method == method for r in self.requests)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        faults = self.faults
        if method == "PUT" and faults.hold_puts and faults.hold_puts in path:
            faults.held += 1
            faults.held_too_long |= not faults.release.wait(HOLD_TIMEOUT)
        refusal = self._refusal(method, path)
        if refusal is not None:
            _drain(environ)
            status, code = refusal
            body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code></Error>'.encode()
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        with self._lock:
            self.requests.append(Request(method, path, environ.get("QUERY_STRING", "")))
        return self._moto(environ, start_response)

    def _refusal(self, method: str, path: str) -> tuple[str, str] | None:
        if self.faults.deny:
            return "403 Forbidden", "AccessDenied"
        if method == "PUT" and any(part in path for part in self.faults.fail_puts):
            return "500 Internal Server Error", "InternalError"
        return None


def _drain(environ: dict[str, Any]) -> None:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)


@dataclass(frozen=True)
class Bucket:
    """A fresh bucket on the session's server, with the AWS variables pointing at it."""

    server: S3Server
    name: str

    @property
    def upload_url(self) -> str:
        """What ``settings.inputs.upload`` names: ``s3://<bucket>/inputs/``."""
        return f"s3://{self.name}/inputs/"

    def object(self, key: str) -> bytes:
        """An object's bytes, read with the test's credentials (obstore, as the engine uploads)."""
        import obstore
        from obstore.store import S3Store

        store = S3Store.from_url(f"s3://{self.name}", client_options={"allow_http": True})
        return bytes(obstore.get(store, key).bytes())

    def make_public(self) -> None:
        """Let anyone read the bucket's objects (a bucket policy, as a user makes a bucket public)."""
        resource = f"arn:aws:s3:::{self.name}/*"
        statement = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": resource}
        policy = {"Version": "2012-10-17", "Statement": [statement]}
        request = urllib.request.Request(
            f"{self.server.endpoint}/{self.name}?policy",
            data=json.dumps(policy).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request):
            pass


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on loopback for the whole session (bound to 127.0.0.1, never 0.0.0.0)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A fresh bucket, the server's log and faults reset, and only the test's AWS_* in the environment."""
    for name in list(os.environ):
        if name.startswith("AWS_"):  # no real profile, key or CA bundle of this machine leaks in
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    made = Bucket(s3_server, s3_server.create_bucket())
    s3_server.reset()
    try:
        yield made
    finally:
        s3_server.faults.release.set()  # a test that failed while a PUT was held lets it go
        s3_server.reset()
