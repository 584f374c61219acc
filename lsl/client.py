"""HTTP client for the LSL REST API (`/api/v1/`).

Every failure becomes an `LslError` subclass whose exit code says what kind of
failure it was, with the server's own message from its error JSON
(`{"error": {"code", "detail", "fields"?}}`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import requests

from lsl import __version__
from lsl.errors import AuthError, Conflict, LslError, NotFound, ServerError, Unreachable, UsageFailure

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
# Connect quickly (a dead server should fail fast); reads may wait on the Docker engine.
DEFAULT_TIMEOUT = (5.0, 300.0)


def error_message(response: requests.Response) -> str:
    """The server's error JSON as one line; falls back to the HTTP reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        detail = body.get("detail") if isinstance(body, dict) else None
        return str(detail or f"HTTP {response.status_code} {response.reason}")
    message = str(error.get("detail") or error.get("code") or f"HTTP {response.status_code}")
    fields = error.get("fields")
    if isinstance(fields, dict) and fields:
        parts = [f"{name}: {'; '.join(map(str, problems)) if isinstance(problems, list) else problems}"
                 for name, problems in fields.items()]
        message = "; ".join(parts) if message == "The request has invalid fields." else f"{message} ({'; '.join(parts)})"
    return message


def error_fields(response: requests.Response) -> dict[str, Any]:
    """`error.fields` of the server's error JSON ({} when there are none)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    fields = error.get("fields") if isinstance(error, dict) else None
    return fields if isinstance(fields, dict) else {}


def error_code(response: requests.Response) -> str:
    """`error.code` of the server's error JSON ("" when there is none)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def raise_for_status(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    message = error_message(response)
    status = response.status_code
    fields = error_fields(response)
    if status in (401, 403):
        raise AuthError(message, fields=fields)
    if status == 404:
        raise NotFound(message)
    if status == 409:
        raise Conflict(message, code=error_code(response))
    if status in (400, 405, 413, 415, 422):
        raise UsageFailure(message, fields=fields)
    if status == 429:
        raise LslError(f"rate limited: {message}")
    if status >= 500:
        raise ServerError(f"server error: {message}" if message != f"HTTP {status} {response.reason}"
                          else f"server error (HTTP {status} {response.reason})")
    raise LslError(message)


class Client:
    """A thin `requests.Session` wrapper bound to one server and token."""

    def __init__(self, url: str, token: str = "", timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"lsl-cli/{__version__}"
        if token:
            self.session.headers["Authorization"] = f"Token {token}"
        self._me: dict[str, Any] | None = None

    def api(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.url}/api/v1/{path.lstrip('/')}"

    def request(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, self.api(path), stream=stream, **kwargs)
        except requests.ConnectionError as exc:
            raise Unreachable(f"cannot reach the server at {self.url} ({_reason(exc)})") from None
        except requests.Timeout:
            raise Unreachable(f"the server at {self.url} did not answer in time") from None
        except requests.RequestException as exc:  # bad URL and the like
            raise LslError(f"request to {self.url} failed: {exc}") from None
        raise_for_status(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"the server sent a non-JSON answer to {method} {path}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.json("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.json("POST", path, json=body if body is not None else {})

    def delete(self, path: str, **params: Any) -> None:
        self.request("DELETE", path, params=params or None)

    def get_all(self, path: str, **params: Any) -> list[Any]:
        """Every item of a list endpoint, following LimitOffset pagination (`next`) if present."""
        return list(self.iter_all(path, **params))

    def iter_all(self, path: str, **params: Any) -> Iterator[Any]:
        page: Any = self.get(path, **params)
        while True:
            if isinstance(page, list):
                yield from page
                return
            yield from page.get("results", [])
            if not page.get("next"):
                return
            page = self.json("GET", page["next"])

    # --- domain helpers ------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        if self._me is None:
            self._me = self.get("me/")
        return self._me

    def find_environment(self, ref: str) -> dict[str, Any]:
        """Resolve a name or UUID; for a shared name prefer the caller's own environment."""
        if UUID_RE.match(ref):
            try:
                return self.get(f"environments/{ref}/")
            except NotFound:
                raise NotFound(f"no environment with id {ref}") from None
        matches = self.get_all("environments/", name=ref)
        if not matches:
            raise NotFound(f"no environment named {ref!r}")
        if len(matches) == 1:
            return matches[0]
        mine = [env for env in matches if env.get("owner") == self.me().get("username")]
        if len(mine) == 1:
            return mine[0]
        owners = ", ".join(sorted({str(env.get("owner")) for env in matches}))
        raise UsageFailure(f"{ref!r} is ambiguous (owned by {owners}), use the id")


def _reason(exc: requests.ConnectionError) -> str:
    """The innermost cause ('Connection refused'), not urllib3's three-level repr."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip()
    return "connection failed"
