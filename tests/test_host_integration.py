"""Issue 6 against the real engine: the environment user, host mounts, setup hooks, team volumes,
snapshots and environment files."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from django.test.utils import override_settings

from accounts.models import Profile
from environments import runtime, services
from environments.models import Environment, Role, Template
from tests.conftest import api_client, docker_cli, make_token, read_streaming, wait_for_status
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


def run(env: Environment, *command: str, user: Any = None) -> tuple[int, str]:
    """Run a command through the exec API as `user` (default: the owner), like `lsl exec` does."""
    response = api_client(user or env.owner).post(f"/api/v1/environments/{env.id}/exec/", {"command": list(command)}, format="json")
    assert response.status_code == 200, response.content
    lines = [json.loads(line) for line in read_streaming(response).splitlines()]
    output = b"".join(base64.b64decode(line["o"]) for line in lines if "o" in line).decode()
    return lines[-1]["exit_code"], output


def nosudo_template() -> Template:
    debian = Template.objects.get(slug="debian")
    return Template.objects.create(slug="debian-nosudo", image=debian.image, shell=debian.shell, cpus=1, memory_mb=512,
                                   pids=256, network_modes=["bridge"], allow_sudo=False)


def field_errors(response: Any, field: str) -> str:
    assert response.status_code == 400, response.content
    return " ".join(str(m) for m in response.json()["error"]["fields"][field])


# --- your identity inside -------------------------------------------------------------------

def test_shells_run_as_the_owner_with_sudo_only_where_allowed(people: Any, make_env: Any) -> None:
    profile = Profile.for_user(people.owner)
    assert (profile.uid, profile.gid, profile.shell_name) == (10000 + people.owner.pk, 10000 + people.owner.pk, "alice")

    env = make_env(people.owner, template="debian")
    assert env.status == "running", env.last_error
    code, out = run(env, "id")
    assert code == 0 and out.startswith(f"uid={profile.uid}(alice) gid={profile.gid}(alice)"), out
    code, out = run(env, "sh", "-c", 'echo "$HOME $USER"; pwd; touch /workspace/mine && stat -c %u /workspace/mine /workspace ~')
    assert out.split() == ["/home/alice", "alice", "/workspace", str(profile.uid), str(profile.uid), str(profile.uid)], out
    assert run(env, "sudo", "-n", "true")[0] == 0
    assert run(env, "sudo", "-n", "id", "-u") == (0, "0\n")
    assert "no-new-privileges:true" not in (runtime.local().inspect_container(env.container_id)["HostConfig"]["SecurityOpt"] or [])

    locked = make_env(people.owner, template=nosudo_template().slug)
    assert locked.status == "running", locked.last_error
    assert run(locked, "id", "-un") == (0, "alice\n")
    code, out = run(locked, "sudo", "-n", "true")
    assert code != 0, out
    assert "no-new-privileges:true" in runtime.local().inspect_container(locked.container_id)["HostConfig"]["SecurityOpt"]

    # BusyBox has neither useradd nor adduser: the user is still created (by editing /etc/passwd).
    tiny = make_env(people.owner, template="busybox")
    assert run(tiny, "id") == (0, f"uid={profile.uid}(alice) gid={profile.gid}(alice) groups={profile.gid}(alice)\n")
    # A teammate running a command in alice's environment runs it as alice.
    services.grant_access(tiny, role=Role.MEMBER, user=people.teammate)
    assert run(tiny, "id", "-un", user=people.teammate) == (0, "alice\n")


def test_identity_is_configurable_and_sanitised(people: Any, make_env: Any) -> None:
    from django.contrib.auth import get_user_model

    odd = get_user_model().objects.create_user("Dr.Who+1@example.org", "who@example.org", "pw-who-123")
    assert Profile.for_user(odd).shell_name == "dr_who_1_example_org"
    root = get_user_model().objects.create_user("root", "r@example.org", "pw-root-123")
    assert Profile.for_user(root).shell_name == f"u{Profile.for_user(root).uid}"

    Profile.objects.filter(user=people.teammate).delete()
    Profile.objects.create(user=people.teammate, uid=4242, gid=4300, shell_name="robert")
    env = make_env(people.teammate, template="busybox")
    assert run(env, "id") == (0, "uid=4242(robert) gid=4300(robert) groups=4300(robert)\n")
    assert env.identity == {"name": "robert", "uid": 4242, "gid": 4300, "home": "/home/robert"}


def test_a_session_shell_is_the_owners_user_for_every_participant(people: Any, make_env: Any, live_server_proc: Any) -> None:
    env = make_env(people.owner, template="busybox")
    services.grant_access(env, role=Role.MEMBER, user=people.teammate)
    tokens = {u.username: make_token(u) for u in (people.owner, people.teammate)}
    uid = Profile.for_user(people.owner).uid

    def open_session(username: str) -> dict[str, Any]:
        response = requests.post(f"{live_server_proc.url}/api/v1/environments/{env.id}/sessions/",
                                 headers={"Authorization": f"Token {tokens[username]}"}, json={}, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()

    session = open_session("alice")
    alice = TermClient(session["ws_url"], token=tokens["alice"])
    bob = TermClient(session["ws_url"], token=tokens["bob"])
    for client in (alice, bob):
        client.wait_event("snapshot")
    bob.send_input("echo \"who=$(id -un):$(id -u):$HOME\"\r")
    alice.wait_output(f"who=alice:{uid}:/home/alice".encode())
    # bob's own session in alice's environment is alice's user too (one shared identity per environment).
    own = TermClient(open_session("bob")["ws_url"], token=tokens["bob"])
    own.wait_event("snapshot")
    own.send_input("echo \"who=$(id -un)\"\r")
    own.wait_output(b"who=alice")
    for client in (alice, bob, own):
        client.close()


# --- host directories -------------------------------------------------------------------------

def test_files_made_in_a_bind_mount_belong_to_the_owner_on_the_host(people: Any, make_env: Any, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    profile = Profile.for_user(people.owner)
    os.chown(project, profile.uid, profile.gid)  # the owner's own directory on the host
    template = Template.objects.get(slug="busybox")
    template.mounts = [{"source": f"{tmp_path}/homes/{{user}}", "target": "/home-dir", "read_only": False, "create": True}]
    template.save()
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        env = make_env(people.owner, template="busybox", mounts=({"source": str(project), "target": "/src", "read_only": False},))
    assert env.status == "running", env.last_error
    assert {m["target"]: m["source"] for m in env.mounts} == {"/home-dir": str(tmp_path / "homes" / "alice"), "/src": str(project)}

    assert run(env, "sh", "-c", "echo hi > /src/made-inside && mkdir /src/dir && echo x > /home-dir/note")[0] == 0
    for path in (project / "made-inside", project / "dir", tmp_path / "homes" / "alice" / "note", tmp_path / "homes" / "alice"):
        stat = path.stat()
        assert (stat.st_uid, stat.st_gid) == (profile.uid, profile.gid), path
    assert (project / "made-inside").read_text() == "hi\n"


def test_mount_escapes_are_refused_with_a_clear_message(people: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "to-etc").symlink_to("/etc")
    client = api_client(people.owner)

    def create(mount: str) -> Any:
        return client.post("/api/v1/environments/", {"name": "m", "template": "busybox", "mounts": [mount]}, format="json")

    with override_settings(LSL_HOST_MOUNT_ROOTS=[root]):
        assert "'..' is not allowed in a host path" in field_errors(create(f"{root}/ok/../../etc:/x"), "mounts")
        message = field_errors(create(f"{root}/to-etc:/x"), "mounts")
        assert "resolves to /etc" in message and "outside the allowed host roots" in message
        assert f"outside the allowed host roots: {root}" in field_errors(create("/etc:/x"), "mounts")
        assert "cannot mount over /proc" in field_errors(create(f"{root}/ok:/proc/x"), "mounts")
    with override_settings(LSL_HOST_MOUNT_ROOTS=[]):
        assert "host mounts are disabled" in field_errors(create(f"{root}/ok:/x"), "mounts")
    assert Environment.objects.count() == 0


def test_host_network_needs_the_template_and_the_users_role(people: Any, make_env: Any) -> None:
    client = api_client(people.owner)
    refused = client.post("/api/v1/environments/", {"name": "h", "template": "busybox", "network_mode": "host"}, format="json")
    assert "host networking is only for staff" in field_errors(refused, "network_mode")
    profile = Profile.for_user(people.owner)
    profile.allow_host_network = True
    profile.save()
    env = make_env(people.owner, template="busybox", network_mode="host")
    assert runtime.local().inspect_container(env.container_id)["HostConfig"]["NetworkMode"] == "host"
    # ...but never where the template does not allow it, whoever asks.
    Template.objects.filter(slug="busybox").update(network_modes=["bridge"])
    refused = api_client(people.staff).post("/api/v1/environments/", {"name": "h2", "template": "busybox", "network_mode": "host"}, format="json")
    assert "allows bridge, not 'host'" in field_errors(refused, "network_mode")


# --- setup hooks -------------------------------------------------------------------------------

def test_setup_hooks_run_once_and_stream_their_output(people: Any, live_server_proc: Any) -> None:
    Template.objects.filter(slug="busybox").update(
        setup=["echo hello-from-setup; id -u", "sleep 1; touch /workspace/made-by-root"],
        user_setup=["id -un > /workspace/whoami"])
    token = make_token(people.owner)
    headers = {"Authorization": f"Token {token}"}
    created = requests.post(f"{live_server_proc.url}/api/v1/environments/", headers=headers,
                            json={"name": "hooked", "template": "busybox"}, timeout=30)
    assert created.status_code == 202, created.text
    assert created.json()["setup_status"] == "pending"
    # The creator follows the output while it runs; the stream ends when setup does.
    with requests.get(f"{live_server_proc.url}/api/v1/environments/{created.json()['id']}/setup-log/?follow=1",
                      headers=headers, stream=True, timeout=60) as followed:
        assert followed.status_code == 200
        log = b"".join(followed.iter_content(None)).decode()
    assert "# echo hello-from-setup; id -u\nhello-from-setup\n0\n" in log
    assert "$ id -un > /workspace/whoami" in log and "[setup finished: 3 steps]" in log

    env = wait_for_status(created.json()["id"], "running")
    assert env.setup_status == "succeeded"
    assert run(env, "cat", "/workspace/whoami") == (0, "alice\n")
    uid = str(Profile.for_user(people.owner).uid)
    assert run(env, "stat", "-c", "%u", "/workspace/made-by-root") == (0, f"{uid}\n"), "setup output is handed to the user"
    # Start/stop does not run setup again.
    services.stop_environment(env)
    services.start_environment(env)
    env.refresh_from_db()
    assert env.setup_log.count("hello-from-setup") == 2  # the echoed command line and its output, once


def test_failed_setup_is_an_error_with_its_log_kept(people: Any) -> None:
    Template.objects.filter(slug="busybox").update(setup=["echo before-failure", "echo oops >&2; exit 3", "echo never-runs"])
    client = api_client(people.owner)
    created = client.post("/api/v1/environments/", {"name": "broken", "template": "busybox"}, format="json")
    env = wait_for_status(created.json()["id"], {"error", "running"})
    assert env.status == "error"
    assert env.setup_status == "failed"
    assert "setup step 2 ('echo oops >&2; exit 3') failed with exit status 3" in env.last_error
    assert runtime.local().container_state(env.container_id).running is False

    response = client.get(f"/api/v1/environments/{env.id}/setup-log/")
    assert response.status_code == 200 and response["X-LSL-Setup-Status"] == "failed"
    text = response.content.decode()
    assert "before-failure\n" in text and "oops\n" in text and "[setup step 2 exited with status 3]" in text
    assert "never-runs" not in text.replace("# echo never-runs", "")
    assert "# echo never-runs" not in text

    # Reconciling does not turn it into a stopped (or running) environment: it stays an error.
    from environments.reconcile import reconcile

    reconcile()
    assert Environment.objects.get(pk=env.pk).status == "error"
    assert client.get(f"/api/v1/environments/{env.id}/").json()["status"] == "error"
    assert api_client(people.outsider).get(f"/api/v1/environments/{env.id}/setup-log/").status_code == 404


def test_hung_setup_is_stopped_at_the_deadline(people: Any) -> None:
    """A hook that never ends (here `sleep`; in life a prompt or a stalled download) must not leave the
    environment `creating` forever: past its deadline (LSL_SETUP_TIMEOUT, stored on the row when setup
    starts, enforced by the worker) its container is stopped and it is an error."""
    import time

    from django.utils import timezone

    from environments.provisioning import setup_timeout_reason

    Template.objects.filter(slug="busybox").update(setup=["echo waiting-for-nothing; sleep 600", "echo never-runs"])
    client = api_client(people.owner)
    created = client.post("/api/v1/environments/", {"name": "hung", "template": "busybox"}, format="json")
    deadline = time.monotonic() + 30
    while "waiting-for-nothing\n" not in Environment.objects.get(pk=created.json()["id"]).setup_log:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    Environment.objects.filter(pk=created.json()["id"]).update(setup_deadline_at=timezone.now())  # time is up
    env = wait_for_status(created.json()["id"], {"error", "running"}, timeout=15)
    assert env.status == "error" and env.setup_status == "failed"
    assert env.last_error == setup_timeout_reason()
    deadline = time.monotonic() + 15
    while "the container was stopped]" not in env.setup_log:  # the provisioning worker's last words
        assert time.monotonic() < deadline, env.setup_log
        time.sleep(0.05)
        env.refresh_from_db()
    assert "waiting-for-nothing\n" in env.setup_log
    assert "[setup timed out after" in env.setup_log and "the container was stopped]" in env.setup_log
    assert "# echo never-runs" not in env.setup_log
    while runtime.local().container_state(env.container_id).running:  # the hook died with the stop; the engine says so a moment later
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- team volumes ------------------------------------------------------------------------------

def test_team_volume_is_shared_by_the_team_and_refused_to_outsiders(people: Any, make_env: Any) -> None:
    from accounts.services import create_team

    alice, bob, mallory = api_client(people.owner), api_client(people.teammate), api_client(people.outsider)
    created = alice.post("/api/v1/volumes/", {"team": "platform", "name": "shared"}, format="json")
    assert created.status_code == 201, created.content
    volume = created.json()
    assert runtime.local().volume_exists(volume["volume_name"])
    # A team mallory is not in is, to her, a team that does not exist: 400, never a 403 saying it does.
    assert mallory.post("/api/v1/volumes/", {"team": "platform", "name": "mine"}, format="json").status_code == 400
    assert [v["name"] for v in bob.get("/api/v1/volumes/").json()["results"]] == ["shared"]
    assert mallory.get("/api/v1/volumes/").json()["results"] == []

    first = make_env(people.owner, template="busybox", team=people.team, mounts=("volume:shared:/shared",))
    second = make_env(people.teammate, template="busybox", team=people.team, mounts=({"volume": "shared", "target": "/data"},))
    assert first.status == second.status == "running", (first.last_error, second.last_error)
    assert run(first, "sh", "-c", "echo from-alice > /shared/a.txt")[0] == 0
    assert run(second, "cat", "/data/a.txt") == (0, "from-alice\n")
    assert run(second, "sh", "-c", "echo from-bob > /data/b.txt")[0] == 0
    assert run(first, "cat", "/shared/b.txt") == (0, "from-bob\n")

    def refused(client: Any, **payload: Any) -> str:
        response = client.post("/api/v1/environments/", {"name": "steal", "template": "busybox", **payload}, format="json")
        assert response.status_code == 400, response.content
        return json.dumps(response.json()["error"]["fields"])

    assert "team volumes can only be mounted into a team environment" in refused(mallory, mounts=["volume:shared:/x"])
    assert "you are not a member of team 'platform'" in refused(mallory, team="platform", mounts=["volume:shared:/x"])
    create_team("Evil", owner=people.outsider)
    assert "team 'evil' has no such volume" in refused(mallory, team="evil", mounts=["volume:shared:/x"])
    assert not Environment.objects.filter(owner=people.outsider).exists()

    # Moving an environment that mounts a team volume to another team is refused; so is deleting a mounted volume.
    assert alice.patch(f"/api/v1/environments/{first.id}/", {"team": None}, format="json").status_code == 400
    in_use = alice.delete(f"/api/v1/volumes/{volume['id']}/")
    assert in_use.status_code == 400 and "is mounted by" in json.dumps(in_use.json())
    for env in (first, second):
        services.delete_environment(Environment.objects.get(pk=env.pk), purge=True)
    assert mallory.delete(f"/api/v1/volumes/{volume['id']}/").status_code == 404
    assert alice.delete(f"/api/v1/volumes/{volume['id']}/").status_code == 204
    assert not runtime.local().volume_exists(volume["volume_name"])


# --- snapshots and environment files -------------------------------------------------------------

def test_snapshot_becomes_a_template_for_chosen_teams(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, template="debian")
    assert run(env, "sh", "-c", "echo snapshotted > /workspace/snap.txt && chmod 640 /workspace/snap.txt "
                                "&& sudo sh -c 'echo system-wide > /opt/system.txt'")[0] == 0
    alice, bob = api_client(people.owner), api_client(people.teammate)
    assert api_client(people.teammate).post(f"/api/v1/environments/{env.id}/snapshot/", {"slug": "x"}, format="json").status_code == 404
    assert alice.post(f"/api/v1/environments/{env.id}/snapshot/", {"slug": "debian"}, format="json").status_code == 400
    response = alice.post(f"/api/v1/environments/{env.id}/snapshot/", {"slug": "alice-setup", "teams": ["platform"]}, format="json")
    assert response.status_code == 201, response.content
    template = response.json()
    try:
        assert template["image"].startswith("lsl-snapshots/alice-setup:") and template["public"] is False
        assert template["teams"] == ["platform"] and template["setup"] == [] and template["allow_sudo"] is True
        assert "alice-setup" in [t["slug"] for t in bob.get("/api/v1/templates/").json()["results"]]
        assert "alice-setup" not in [t["slug"] for t in api_client(people.outsider).get("/api/v1/templates/").json()["results"]]
        labels = json.loads(docker_cli("image", "inspect", "-f", "{{json .Config.Labels}}", template["image"]).stdout)
        assert labels["lsl.managed"] == "0" and labels["lsl.snapshot.of"] == str(env.id)

        created = bob.post("/api/v1/environments/", {"name": "from-snap", "template": "alice-setup"}, format="json")
        assert created.status_code == 202, created.content
        copy = wait_for_status(created.json()["id"], {"running", "error"})
        assert copy.status == "running", copy.last_error
        assert run(copy, "cat", "/workspace/snap.txt", "/opt/system.txt") == (0, "snapshotted\nsystem-wide\n")
        bob_uid = Profile.for_user(people.teammate).uid
        assert run(copy, "stat", "-c", "%a %u", "/workspace/snap.txt") == (0, f"640 {bob_uid}\n")
        assert run(copy, "id", "-un") == (0, "bob\n")
        # The original environment is untouched by the snapshot.
        assert run(Environment.objects.get(pk=env.pk), "cat", "/workspace/snap.txt") == (0, "snapshotted\n")
    finally:
        for leftover in Environment.objects.filter(template__slug="alice-setup"):
            services.delete_environment(leftover, purge=True)
        runtime.local().remove_image(template["image"])


def test_export_then_create_from_yaml_reproduces_the_environment(people: Any, make_env: Any, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    alice = api_client(people.owner)
    assert alice.post("/api/v1/volumes/", {"team": "platform", "name": "cache"}, format="json").status_code == 201
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        env = make_env(people.owner, name="original", template="debian", team=people.team, network_mode="none",
                       cpus=0.5, memory_mb=256, mounts=(f"{tmp_path}/src:/src:ro", "volume:cache:/cache"))
        assert env.status == "running", env.last_error
        exported = alice.get(f"/api/v1/environments/{env.id}/export/")
        assert exported.status_code == 200 and exported["Content-Type"].startswith("application/yaml")
        text = exported.content.decode()
        assert yaml.safe_load(text) == {"version": 1, "environment": {
            "name": "original", "template": "debian", "team": "platform", "network": "none",
            "resources": {"cpus": 0.5, "memory": "256m", "disk": "10g"},  # disk: LSL_DEFAULT_DISK_MB
            "mounts": [{"source": str(tmp_path / "src"), "target": "/src", "read_only": True},
                       {"volume": "cache", "target": "/cache"}]}}

        # A raw YAML body; the name is overridden because alice already has "original".
        response = alice.generic("POST", "/api/v1/environments/from-yaml/?name=copy", text, content_type="application/yaml")
        assert response.status_code == 202, response.content
        copy = wait_for_status(response.json()["id"], {"running", "error"})
        assert copy.status == "running", copy.last_error
        for attr in ("template_id", "team_id", "network_mode", "cpus", "memory_mb", "disk_mb", "pids", "image"):
            assert getattr(copy, attr) == getattr(env, attr), attr
        assert copy.mounts == env.mounts and copy.name == "copy"
        info = runtime.local().inspect_container(copy.container_id)
        # Its own mounts, plus the session keeper's binary and socket directory (environments/keeper.py).
        assert {m["Destination"] for m in info["Mounts"]} == {"/workspace", "/src", "/cache", "/.lsl/bin", "/.lsl/run"}
        assert info["HostConfig"]["NanoCpus"] == int(0.5e9) and info["HostConfig"]["Memory"] == 256 * 1024 * 1024

        # Same name twice: reported at the name in the file (JSON body form).
        again = alice.post("/api/v1/environments/from-yaml/", {"yaml": text}, format="json")
        assert again.status_code == 400
        assert any(re.fullmatch(r"environment\.yaml:\d+:\d+: environment\.name: you already have an environment named 'original'", p)
                   for p in again.json()["error"]["fields"]["yaml"]), again.json()

    bad = ("version: 1\nenvironment:\n  template: debian\n  resources: {cpus: lots}\n  colour: blue\n"
           "  mounts:\n    - {source: /etc, target: /x}\n")
    response = alice.post("/api/v1/environments/from-yaml/", {"yaml": bad, "filename": "mine.yaml"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["yaml"] == [
        "mine.yaml:4:21: environment.resources.cpus: expected a number, got string 'lots'",
        "mine.yaml:5:3: environment.colour: unknown key 'colour'",
    ]
    escape = "version: 1\nenvironment:\n  template: debian\n  mounts:\n    - {source: /etc, target: /x}\n"
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        response = alice.post("/api/v1/environments/from-yaml/", {"yaml": escape}, format="json")
    assert response.status_code == 400
    [problem] = response.json()["error"]["fields"]["yaml"]
    assert problem.startswith("environment.yaml:5:7: environment.mounts[0]: '/etc'") and "outside the allowed host roots" in problem
    assert Environment.objects.filter(owner=people.owner).count() == 2
