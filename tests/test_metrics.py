"""Prometheus `/metrics`: who may scrape (a bearer token or a staff session, never an address), and
what a scrape says about a real running environment.

Scrapes go through Django's test client and are parsed with prometheus_client's
own parser, so a malformed exposition fails here rather than in Prometheus.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

from environments import metrics, runtime
from environments.models import Environment, Node, Status, Template
from sessions.models import Participation, TerminalSession

ENV_LABELS = ("environment", "owner", "template")


TOKEN = "s3cret-metrics-token"


@pytest.fixture(autouse=True)
def _metrics_token(settings: Any) -> None:
    """Scrapes here authenticate like Prometheus does; the access tests change or drop the token themselves."""
    settings.LSL_METRICS_TOKEN = TOKEN


def scrape(remote_addr: str = "127.0.0.1", token: str | None = TOKEN, *, client: Client | None = None) -> Any:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    return (client or Client(REMOTE_ADDR=remote_addr)).get("/metrics", REMOTE_ADDR=remote_addr, **headers)


def assert_refused(response: Any, status: int, *phrases: bytes) -> None:
    """A refusal is plain text that says why, and never carries a metric."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("text/plain")
    assert b"lsl_" not in response.content
    for phrase in phrases:
        assert phrase in response.content, response.content


def parse(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    """The one sample of family `name` (sample name `sample`, default the family's) whose labels include `labels`."""
    found = [s for s in families[name].samples
             if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found or families[name].samples}"
    return found[0].value


def env_labels(env: Environment) -> dict[str, str]:
    return {"environment": env.name, "owner": env.owner.username, "template": env.template.slug}


# --- access -------------------------------------------------------------------------------

LOCAL_ADDRESSES = ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1")


@pytest.mark.django_db
def test_loopback_alone_is_never_enough(settings: Any) -> None:
    """Every process on the host, a host-network environment included, connects from loopback."""
    for token in (TOKEN, ""):
        settings.LSL_METRICS_TOKEN = token
        for address in (*LOCAL_ADDRESSES, "10.1.2.3", ""):
            denied = scrape(address, token=None)
            assert_refused(denied, 401, b"LSL_METRICS_TOKEN", b"staff")
            assert denied["WWW-Authenticate"].startswith("Bearer")
    assert Client(REMOTE_ADDR="127.0.0.1").post("/metrics").status_code == 405


@pytest.mark.django_db
def test_wrong_tokens_are_refused() -> None:
    assert scrape("127.0.0.1").status_code == 200
    assert scrape("10.1.2.3").status_code == 200  # the address plays no part either way
    for wrong in ("wrong", "", TOKEN + "-and-more", TOKEN[:-1], TOKEN.upper(), f"{TOKEN} {TOKEN}"):
        assert_refused(scrape("127.0.0.1", token=wrong), 403, b"wrong bearer token")
    # Another scheme (an API token, Basic) is not a bearer token.
    for header in (f"Token {TOKEN}", f"Basic {TOKEN}", TOKEN):
        other = Client(REMOTE_ADDR="127.0.0.1").get("/metrics", HTTP_AUTHORIZATION=header)
        assert_refused(other, 401, b"Bearer")
    assert b"lsl_build_info" in scrape("127.0.0.1").content


@pytest.mark.django_db
def test_no_token_is_accepted_while_none_is_configured(settings: Any) -> None:
    """An unset LSL_METRICS_TOKEN must not turn into "any (or the empty) token matches"."""
    settings.LSL_METRICS_TOKEN = ""
    for token in ("", "anything", TOKEN):
        assert_refused(scrape("127.0.0.1", token=token), 403, b"LSL_METRICS_TOKEN is not set")


@pytest.mark.django_db
def test_staff_sessions_may_scrape_and_members_may_not(people: Any, settings: Any) -> None:
    for token in (TOKEN, ""):
        settings.LSL_METRICS_TOKEN = token
        staff = Client()
        staff.force_login(people.staff)
        assert b"lsl_build_info" in scrape("10.1.2.3", token=None, client=staff).content
        for user in (people.owner, people.outsider):
            member = Client()
            member.force_login(user)
            assert_refused(scrape("127.0.0.1", token=None, client=member), 403, b"is not staff",
                           user.username.encode())
        # Staff no more: the session stops working at once.
        type(people.staff).objects.filter(pk=people.staff.pk).update(is_staff=False)
        assert_refused(scrape("127.0.0.1", token=None, client=staff), 403, b"is not staff")
        type(people.staff).objects.filter(pk=people.staff.pk).update(is_staff=True)


@pytest.mark.django_db
def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"  # Prometheus' header
    response = Client(REMOTE_ADDR="127.0.0.1").get("/metrics", HTTP_ACCEPT=accept, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200 and response["Content-Type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_openmetrics(response.content.decode())}
    assert families["lsl_environment_network_receive_bytes"].type == "counter"
    assert families["lsl_build_info"].samples[0].labels == {"version": settings.LSL_VERSION}


# --- content ------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_metrics_describe_a_running_environment(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, name="metered")
    assert env.status == "running", env.last_error
    # A row without a container: a scrape reports what the database says (the worker reconciles, not reads).
    template = Template.objects.get(slug="busybox")
    Environment.objects.create(name="ghost", owner=people.teammate, template=template, image=template.image,
                               status=Status.STOPPED, cpus=1, memory_mb=64, pids=64)
    session = TerminalSession.objects.create(environment=env, environment_name=env.name, name="pair", creator=people.owner)
    Participation.objects.create(session=session, user=people.owner, role="admin", client_kind="web")
    Participation.objects.create(session=session, user=people.viewer, role="viewer", client_kind="cli")
    Participation.objects.create(session=session, user=people.member, role="member", client_kind="web",
                                 left_at=session.created_at)  # left already: not counted
    ended = TerminalSession.objects.create(environment=env, environment_name=env.name, creator=people.owner,
                                           ended_at=session.created_at)
    Participation.objects.create(session=ended, user=people.owner, role="admin")  # its session is over: not counted

    # Container figures come from the worker's sampling (every LSL_STATS_INTERVAL), never from the scrape.
    deadline = time.monotonic() + 25
    while Environment.objects.get(pk=env.pk).stats_at is None:
        assert time.monotonic() < deadline, "the worker never sampled the container"
        time.sleep(0.2)
    started = time.monotonic()
    families = parse(scrape())
    assert time.monotonic() - started < 2

    assert value(families, "lsl_engine_up") == 1
    assert value(families, "lsl_build_info", version=settings.LSL_VERSION) == 1
    assert value(families, "lsl_environments", status="running") == 1
    assert value(families, "lsl_environments", status="stopped") == 1
    assert value(families, "lsl_environments", status="creating") == 0
    assert {s.labels["status"] for s in families["lsl_environments"].samples} == set(Status.values)

    labels = env_labels(env)
    assert set(families["lsl_environment_cpu_usage_ratio"].samples[0].labels) == set(ENV_LABELS)
    assert 0 <= value(families, "lsl_environment_cpu_usage_ratio", **labels) <= 0.6  # limited to 0.5 CPU
    memory = value(families, "lsl_environment_memory_usage_bytes", **labels)
    assert 0 < memory < 256 * 1024 * 1024
    assert value(families, "lsl_environment_memory_limit_bytes", **labels) == 256 * 1024 * 1024
    assert value(families, "lsl_environment_pids", **labels) >= 1
    assert 0 <= value(families, "lsl_environment_uptime_seconds", **labels) < 300
    for direction in ("receive", "transmit"):
        name = f"lsl_environment_network_{direction}_bytes"
        assert families[name].type == "counter"
        assert value(families, name, sample=f"{name}_total", **labels) >= 0
    assert value(families, "lsl_sessions_live", **labels) == 1
    assert value(families, "lsl_session_participants", **labels) == 2
    # The environment without a container has session figures but no container figures.
    ghost = {"environment": "ghost", "owner": "bob", "template": "busybox"}
    assert value(families, "lsl_sessions_live", **ghost) == 0
    assert not [s for s in families["lsl_environment_memory_usage_bytes"].samples if s.labels["environment"] == "ghost"]
    assert not [s for s in families["lsl_environment_uptime_seconds"].samples if s.labels["environment"] == "ghost"]

    assert 0 <= value(families, "lsl_host_cpu_usage_ratio") <= 1
    assert 0 < value(families, "lsl_host_memory_used_bytes") <= value(families, "lsl_host_memory_total_bytes")
    assert 0 < value(families, "lsl_host_disk_used_bytes") <= value(families, "lsl_host_disk_total_bytes")
    for name, family in families.items():
        if name.startswith("lsl_"):
            assert family.documentation, f"{name} has no HELP"


@pytest.mark.django_db
def test_engine_down_still_serves_metrics(people: Any, catalog: None) -> None:
    template = Template.objects.get(slug="busybox")
    Environment.objects.create(name="stranded", owner=people.owner, template=template, image=template.image,
                               status=Status.RUNNING, container_id="0123456789ab", cpus=1, memory_mb=64, pids=64)
    with override_settings(LSL_DOCKER_HOST="unix:///nonexistent.sock"):
        with pytest.raises(runtime.EngineError):
            runtime.local().ping()
        families = parse(scrape())
    assert value(families, "lsl_engine_up") == 0  # no worker sample in this database says otherwise
    # Nothing reconciled by a read: the row keeps its last known status.
    assert value(families, "lsl_environments", status="running") == 1
    assert families["lsl_environment_cpu_usage_ratio"].samples == []
    assert value(families, "lsl_sessions_live", environment="stranded", owner="alice", template="busybox") == 0
    assert value(families, "lsl_host_memory_total_bytes") > 0


# --- sampling ------------------------------------------------------------------------------

def test_container_stats_are_sampled_concurrently_within_a_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stats call takes about a second on a real engine: a scrape must not add them up."""
    active, peak = 0, 0
    lock = threading.Lock()

    def slow_stats(container_id: str) -> dict[str, Any]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(5 if container_id == "stuck" else 0.4)
            if container_id == "broken":
                raise runtime.ContainerNotFound("gone")
            return {"cpu_percent": 1.0, "container": container_id}
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(runtime.Engine, "container_stats", lambda self, container_id: slow_stats(container_id))
    node = Node(name="local", available=True)  # unsaved: no database in this test
    envs = [Environment(id=uuid.uuid4(), status=Status.RUNNING, container_id=f"c{i}", node=node) for i in range(10)]
    envs.append(Environment(id=uuid.uuid4(), status=Status.STOPPED, container_id="stopped", node=node))
    envs.append(Environment(id=uuid.uuid4(), status=Status.RUNNING, container_id="broken", node=node))
    envs.append(Environment(id=uuid.uuid4(), status=Status.RUNNING, container_id="stuck", node=node))

    started = time.monotonic()
    stats = metrics.sample_container_stats(envs, budget=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"took {elapsed:.1f}s"
    assert peak > 1, "stats calls ran one at a time"
    assert {stats[env.pk]["container"] for env in envs[:10]} == {f"c{i}" for i in range(10)}
    assert envs[10].pk not in stats  # not running: not sampled
    assert "error" in stats[envs[11].pk]
    assert envs[12].pk not in stats  # over budget: left out rather than holding up the scrape
