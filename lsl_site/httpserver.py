"""daphne, with request bodies bounded before they are read.

daphne (on Twisted) receives a whole request body before the application sees the request, then
queues all of it in memory at once: one anonymous 1 GiB POST grew the web process, which holds
every terminal, by 1 GiB and never gave it back. We keep daphne (its websockets, its shutdown
hooks, everything issue 11 measured) and replace the one class it uses per HTTP request.
`install()` swaps `daphne.http_protocol.WebRequest`, the name daphne's HTTP factory instantiates;
daphne is pinned in requirements.txt and tests/test_body_limits.py checks the behaviour for real.

What the replacement does, from the moment the headers are in:

* A body declared (Content-Length) or found (chunked) to be larger than LSL_MAX_REQUEST_BYTES
  gets a 413 in the API's JSON error shape at once, and the connection is closed: the rest of the
  body is never read.
* The file-transfer endpoint (`PUT /api/v1/environments/<id>/files/`) may send up to
  LSL_MAX_UPLOAD_BYTES (0: no limit). Its body is not read either until the credentials it
  presents (API token or session) are checked, off the event loop: anonymous or bad credentials
  get a 401 before a byte of a large body is accepted.
* A large body (Twisted spools it to a temporary file, never RAM) is handed to the application a
  chunk at a time, only as fast as the application takes it, instead of all at once.
* Errors daphne itself produces (bad header, application crash, time-out) are JSON under /api/.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from daphne import http_protocol
from daphne.utils import HEADER_NAME_RE, INVALID_HEADER_VALUE_BYTES, parse_x_forwarded_for
from django.conf import settings
from django.urls import Resolver404, resolve
from twisted.internet.defer import inlineCallbacks, maybeDeferred

log = logging.getLogger(__name__)

UPLOAD_ROUTE = "environment-files"
# Chunks handed to the application, and how many may wait in its queue: at most 1 MiB in memory.
CHUNK = 256 * 1024
QUEUED_CHUNKS = 4
# Bodies up to this size go through daphne's own code path (queued at once: bounded and small).
PACE_ABOVE = 1024 * 1024
REASONS = {400: b"Bad Request", 401: b"Unauthorized", 413: b"Payload Too Large", 500: b"Internal Server Error",
           503: b"Service Unavailable"}


def error_body(status: int, code: str, detail: str) -> bytes:
    return json.dumps({"error": {"code": code, "detail": detail}}).encode()


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}" if unit == "bytes" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024  # type: ignore[assignment]
    return f"{size} bytes"  # unreachable


def is_upload(method: bytes, target: bytes) -> bool:
    """Whether this request line is the file-transfer upload (the one endpoint allowed a large body)."""
    if method != b"PUT":
        return False
    try:
        return resolve(unquote(urlsplit(target.decode("ascii")).path)).url_name == UPLOAD_ROUTE
    except (Resolver404, UnicodeDecodeError, ValueError):
        return False


def body_limit(upload: bool) -> int:
    """The largest body a request may send (0: no limit)."""
    return settings.LSL_MAX_UPLOAD_BYTES if upload else settings.LSL_MAX_REQUEST_BYTES


def credentials_valid(authorization: str | None, session_key: str | None) -> bool:
    """Whether the request's API token or session names an active user. Runs on a database thread."""
    from django.contrib.auth import get_user
    from django.http import HttpRequest

    from accounts.auth import parse_authorization, user_for_key

    if authorization:
        key = parse_authorization(authorization)
        return key is not None and user_for_key(key) is not None
    if session_key:
        from importlib import import_module

        request = HttpRequest()
        request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        user = get_user(request)
        return bool(user.is_authenticated and user.is_active)
    return False


class BoundedWebRequest(http_protocol.WebRequest):
    """daphne's WebRequest with the body limits above (see the module docstring)."""

    _refused = False
    _received = 0
    _limit = 0
    _lost = False
    _upload = False  # the request line names the upload route (resolved once, in gotLength)

    # --- Twisted callbacks, in the order they arrive -------------------------------------------

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)  # Twisted's body store: BytesIO when small, a temporary file otherwise
        self._upload = is_upload(self.channel._command, self.channel._path)
        self._limit = body_limit(self._upload)
        if self._limit and length is not None and length > self._limit:
            self._refuse(413, "request_too_large", self._too_large_message(length))
            return
        if self._upload and (length is None or length > settings.LSL_MAX_REQUEST_BYTES):
            self._check_credentials_first()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._limit and self._received > self._limit:
            self._refuse(413, "request_too_large", self._too_large_message(None))
            return
        super().handleContentChunk(data)

    def connectionLost(self, reason: Any) -> None:
        self._lost = True  # stops a body feed (_feed) and a pending credentials check
        super().connectionLost(reason)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    # --- refusing before the body is read ---------------------------------------------------------

    def _too_large_message(self, length: int | None) -> str:
        size = f" ({_human(length)})" if length is not None else ""
        what = "an upload" if self._upload else "this endpoint"
        setting = "LSL_MAX_UPLOAD_BYTES" if what == "an upload" else "LSL_MAX_REQUEST_BYTES"
        return f"The request body{size} is larger than {what} accepts: at most {_human(self._limit)} ({setting})."

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer now, in the JSON error shape, and close: whatever else the client sends is never read."""
        self._refused = True
        # Twisted answers `Expect: 100-continue` right after gotLength: there is nothing to continue.
        self.requestHeaders.removeHeader(b"Expect")
        body = error_body(status, code, detail)
        head = [f"HTTP/1.1 {status} ".encode() + REASONS.get(status, b"Error"),
                b"Content-Type: application/json", f"Content-Length: {len(body)}".encode(), b"Connection: close"]
        if status == 401:
            head.append(b"WWW-Authenticate: Token")
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        transport.loseConnection()
        log.info("refused a request body before reading it: %s %s: %d %s", self.channel._command.decode(errors="replace"),
                 self.channel._path[:200].decode(errors="replace"), status, detail)

    def _check_credentials_first(self) -> None:
        """Stop reading until the caller's token or session is known good (checked on a database thread)."""
        from lsl_site import dbpool

        transport = self.channel.transport
        transport.pauseProducing()
        # `Expect: 100-continue` is answered only once the credentials are good (Twisted would answer it now).
        expect = (self.requestHeaders.getRawHeaders(b"Expect") or [b""])[0].lower() == b"100-continue"
        self.requestHeaders.removeHeader(b"Expect")
        authorization = (self.requestHeaders.getRawHeaders(b"Authorization") or [b""])[0].decode("latin-1")
        session_key = self.received_cookies.get(settings.SESSION_COOKIE_NAME.encode(), b"").decode("latin-1")

        async def check() -> None:
            try:
                valid = await dbpool.run(credentials_valid, authorization or None, session_key or None)
            except Exception:  # the database is down: refuse rather than accept an unbounded body blind
                log.exception("could not check an upload's credentials")
                valid = False
            if self._lost:
                return
            if not valid:
                self._refuse(401, "not_authenticated", "Authentication credentials were not provided or are not valid: "
                             "a large upload needs a valid API token or session before its body is read.")
                return
            if expect and self.channel._version == b"HTTP/1.1":
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            transport.resumeProducing()

        asyncio.ensure_future(check())

    # --- handing a large body over a chunk at a time -------------------------------------------------

    @inlineCallbacks
    def process(self) -> Any:
        content_size = self.content.seek(0, 2)
        self.content.seek(0, 0)
        if content_size <= PACE_ABOVE or self.requestHeaders.hasHeader(b"Upgrade"):
            return (yield super().process())
        # daphne's own process() for plain HTTP, up to where it would queue the whole body.
        try:
            self.request_start = time.time()
            for name, values in self.requestHeaders.getAllRawHeaders():
                if not HEADER_NAME_RE.fullmatch(name) or any(INVALID_HEADER_VALUE_BYTES.intersection(v) for v in values):
                    self.basic_error(400, b"Bad Request", "Invalid header")
                    return
            if hasattr(self.client, "host") and hasattr(self.client, "port"):
                self.client_addr = [str(self.client.host), self.client.port]
                self.server_addr = [str(self.host.host), self.host.port]
            self.client_scheme = "https" if self.isSecure() else "http"
            if self.server.proxy_forwarded_address_header:
                self.client_addr, self.client_scheme = parse_x_forwarded_for(
                    self.requestHeaders, self.server.proxy_forwarded_address_header,
                    self.server.proxy_forwarded_port_header, self.server.proxy_forwarded_proto_header,
                    self.client_addr, self.client_scheme)
            try:
                path = unquote(self.path.decode("ascii"))
                self.query_string = self.uri.split(b"?", 1)[1] if b"?" in self.uri else b""
                self.query_string.decode("ascii")
            except UnicodeDecodeError:
                self.basic_error(400, b"Bad Request", "Invalid characters in the path or query string")
                return
            self.root_path = self.server.root_path
            headers = [(name.lower(), value) for name, values in self.requestHeaders.getAllRawHeaders()
                       if b"_" not in name for value in values]  # underscores: CVE-2015-0219, as daphne
            self.application_queue = yield maybeDeferred(self.server.create_application, self, {
                "type": "http", "http_version": self.clientproto.split(b"/")[-1].decode("ascii"),
                "method": self.method.decode("ascii"), "path": path, "raw_path": self.path,
                "root_path": self.root_path, "scheme": self.client_scheme, "query_string": self.query_string,
                "headers": headers, "client": self.client_addr, "server": self.server_addr,
            })
            if self.application_queue is None or self.content.closed:
                return
            asyncio.ensure_future(self._feed(self.application_queue))
        except Exception:
            log.exception("daphne HTTP processing error")
            self.basic_error(500, b"Internal Server Error", "HTTP processing error")

    async def _feed(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Queue the body CHUNK by CHUNK, never more than QUEUED_CHUNKS ahead of the application."""
        content = self.content
        while True:
            while queue.qsize() >= QUEUED_CHUNKS:
                if self._lost or self.finished:
                    return
                # asyncio.Queue has no "an item was taken" event; a short poll costs nothing next to an upload.
                await asyncio.sleep(0.002)
            if self._lost or self.finished or content.closed:
                return
            chunk = content.read(CHUNK)  # from Twisted's temporary file (page cache), not the network
            more = len(chunk) == CHUNK
            queue.put_nowait({"type": "http.request", "body": chunk, "more_body": more})
            if not more:
                return

    # --- daphne's own errors, in the API's shape ---------------------------------------------------

    def basic_error(self, status: int, status_text: bytes, body: str) -> None:
        if not self.path.startswith(b"/api/"):
            super().basic_error(status, status_text, body)
            return
        code = {400: "bad_request", 500: "server_error", 503: "timeout"}.get(status, "error")
        payload = error_body(status, code, body)
        self.handle_reply({"type": "http.response.start", "status": status,
                           "headers": [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(payload))]})
        self.handle_reply({"type": "http.response.body", "body": payload})


def install() -> None:
    """Make daphne build BoundedWebRequest for every HTTP request (called from lsl_site/asgi.py)."""
    http_protocol.WebRequest = BoundedWebRequest  # type: ignore[misc]
