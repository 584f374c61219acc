"""/ws/events/ against a live daphne and worker: permission first, resumable, never a leak.

Each client runs in a thread of its own and collects every frame; the assertions read what it got.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from environments.models import Role
from environments.services import grant_access, revoke_access
from tests.conftest import make_token, wait_for_status

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


class Listener:
    """An event-stream client collecting frames until closed."""

    def __init__(self, ws_url: str, token: str, since: int | None = None) -> None:
        self.url = f"{ws_url}/ws/events/" + (f"?since={since}" if since is not None else "")
        self.token, self.frames = token, []
        self.hello = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.hello.wait(10), "no hello"

    async def _run(self) -> None:
        async with connect(self.url, additional_headers={"Authorization": f"Token {self.token}"}, open_timeout=10) as ws:
            while not self.stop.is_set():
                try:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                except asyncio.TimeoutError:
                    continue
                self.frames.append(frame)
                if frame["type"] == "hello":
                    self.hello.set()

    def about(self, env_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("environment") == env_id
                or (isinstance(f.get("environment"), dict) and f["environment"]["id"] == env_id)]

    def wait_for(self, predicate: Any, timeout: float = 10, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in list(self.frames):
                if predicate(frame):
                    return frame
            time.sleep(0.05)
        raise AssertionError(f"no frame for {what}; got {[f['type'] for f in self.frames]}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def changed_to(env_id: str, status: str) -> Any:
    return lambda f: f["type"] == "environment.changed" and f["environment"]["id"] == env_id and f["environment"]["status"] == status


def test_events_go_only_to_who_may_see_them(people: Any, live_server_proc: Any) -> None:
    url = live_server_proc.url
    tokens = {u.username: make_token(u) for u in (people.owner, people.teammate, people.outsider, people.viewer, people.staff)}
    listeners = {name: Listener(live_server_proc.ws_url, token) for name, token in tokens.items()}
    try:
        # alice creates a personal and a team environment (bob is in her team).
        post = lambda body: requests.post(f"{url}/api/v1/environments/", json=body,  # noqa: E731
                                          headers={"Authorization": f"Token {tokens['alice']}"}, timeout=30)
        personal = post({"name": "mine", "template": "busybox"}).json()["id"]
        shared = post({"name": "ours", "template": "busybox", "team": people.team.slug}).json()["id"]
        for env_id in (personal, shared):
            listeners["alice"].wait_for(changed_to(env_id, "running"), 30, f"{env_id} running for alice")
        listeners["bob"].wait_for(changed_to(shared, "running"), 10, "the team environment for bob")
        listeners["steve"].wait_for(changed_to(personal, "running"), 10, "staff sees everything")

        # victor gets a grant: from then on he hears about it; revoked, he is told, then hears nothing.
        from environments.models import Environment

        env = Environment.objects.get(pk=personal)
        grant_access(env, role=Role.VIEWER, user=people.viewer)
        listeners["victor"].wait_for(lambda f: f["type"] == "access.changed" and f["role"] == "viewer", 10, "his grant")
        requests.post(f"{url}/api/v1/environments/{personal}/stop/", headers={"Authorization": f"Token {tokens['alice']}"},
                      timeout=30).raise_for_status()
        listeners["victor"].wait_for(changed_to(personal, "stopped"), 10, "a stop he may now see")
        revoke_access(env, f"user-{people.viewer.pk}")
        listeners["victor"].wait_for(lambda f: f["type"] == "access.changed" and f["role"] is None, 10, "his revocation")
        seen_by_victor = len(listeners["victor"].about(personal))
        requests.post(f"{url}/api/v1/environments/{personal}/start/", headers={"Authorization": f"Token {tokens['alice']}"},
                      timeout=30).raise_for_status()
        listeners["alice"].wait_for(changed_to(personal, "running"), 10, "the restart")
        time.sleep(0.5)
        assert len(listeners["victor"].about(personal)) == seen_by_victor, "events after the revocation leaked"

        # mallory, an outsider, never heard of either environment, and bob never of alice's own.
        assert listeners["mallory"].about(personal) == [] and listeners["mallory"].about(shared) == []
        assert listeners["bob"].about(personal) == []
    finally:
        for listener in listeners.values():
            listener.close()


def test_a_client_resumes_after_the_last_id_it_saw(people: Any, make_env: Any, live_server_proc: Any) -> None:
    env = make_env(people.owner)
    token = make_token(people.owner)
    first = Listener(live_server_proc.ws_url, token)
    last_id = first.frames[0]["last_id"]
    first.close()
    # While nobody listens: stop it.
    requests.post(f"{live_server_proc.url}/api/v1/environments/{env.id}/stop/", headers={"Authorization": f"Token {token}"},
                  timeout=30).raise_for_status()
    wait_for_status(env.id, "stopped")
    resumed = Listener(live_server_proc.ws_url, token, since=last_id)
    try:
        resumed.wait_for(changed_to(str(env.id), "stopped"), 10, "the missed stop, replayed")
        old = Listener(live_server_proc.ws_url, token, since=0)  # older than what is kept? here: everything replays
        old.close()
    finally:
        resumed.close()


def test_anonymous_and_bad_tokens_are_refused(live_server_proc: Any) -> None:
    async def attempt(headers: dict[str, str]) -> int:
        try:
            async with connect(f"{live_server_proc.ws_url}/ws/events/", additional_headers=headers, open_timeout=10):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(attempt({})) == 403
    assert asyncio.run(attempt({"Authorization": "Token lsl_nope_nope"})) == 403
