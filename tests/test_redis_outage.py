"""Redis dies under a running LSL (web with LSL_REDIS_URL): the API keeps answering, events keep flowing.

Real processes: redis-server is killed with -9 and started again on the same port, while daphne
and the worker run. Throttling fails open (logged) instead of turning every call into an HTML 500,
sign-in still works, and the event stream falls back to local wake-ups and polling.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import requests
from websockets.asyncio.client import connect

from tests.conftest import RedisServer, make_token, start_daphne, stop_daphne

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


async def wait_for_event(url: str, token: str, kind: str, status: str, started: asyncio.Event, timeout: float) -> dict[str, Any]:
    async with connect(url, additional_headers={"Authorization": f"Token {token}"}, open_timeout=10) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["type"] == "hello"
        started.set()
        deadline = time.monotonic() + timeout
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            if frame["type"] == kind and frame["environment"]["status"] == status:
                return frame


def test_api_and_events_survive_a_redis_outage(people: Any, make_env: Any, redis_server: RedisServer) -> None:
    env = make_env(people.owner)
    server = start_daphne({"LSL_REDIS_URL": redis_server.url}, name="daphne-redis")
    token = make_token(people.owner)
    headers = {"Authorization": f"Token {token}"}
    try:
        assert requests.get(f"{server.url}/api/v1/environments/", headers=headers, timeout=10).status_code == 200
        redis_server.stop()  # kill -9

        listed = requests.get(f"{server.url}/api/v1/environments/", headers=headers, timeout=10)
        assert listed.status_code == 200, listed.text[:500]
        assert listed.json()["results"][0]["id"] == str(env.id)
        anonymous = requests.get(f"{server.url}/api/v1/environments/", timeout=10)
        assert anonymous.status_code in (401, 403) and anonymous.json()["error"]["code"]  # JSON, not an HTML 500
        login_page = requests.Session()
        page = login_page.get(f"{server.url}/login/", timeout=10)
        refused = login_page.post(f"{server.url}/login/", data={"username": "alice", "password": "wrong",
                                                              "csrfmiddlewaretoken": login_page.cookies["csrftoken"]},
                                  headers={"Referer": f"{server.url}/login/"}, timeout=10)
        assert page.status_code == 200 and refused.status_code == 200 and "Please enter a correct" in refused.text

        async def scenario() -> dict[str, Any]:
            started = asyncio.Event()
            waiter = asyncio.create_task(wait_for_event(f"{server.ws_url}/ws/events/", token, "environment.changed",
                                                        "stopped", started, timeout=10))
            await asyncio.wait_for(started.wait(), 10)
            stopped = await asyncio.to_thread(requests.post, f"{server.url}/api/v1/environments/{env.id}/stop/",
                                              headers=headers, timeout=30)
            assert stopped.status_code == 200, stopped.text[:500]
            return await waiter

        frame = asyncio.run(scenario())
        assert frame["environment"]["stop_reason"] == "stopped"

        redis_server.start()  # back on the same port: everything carries on
        assert requests.get(f"{server.url}/api/v1/environments/", headers=headers, timeout=10).status_code == 200
        assert "throttling is off" in server.log_tail(200_000)
    finally:
        stop_daphne(server)
