"""Issue 12: mount targets over the container's system paths, written as an attacker would try them.

A host directory over /etc, /usr or /root lets whoever writes it decide what runs when LSL executes
something in the container as root (setup hooks, the user's creation) and what sudo trusts; a Docker
socket lent to a container is root on the host. Refusals come back as the usual `mounts` lines
("[index] 'target': why"), at file:line for environment and catalog files.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test.utils import override_settings

from environments import policy
from environments.catalog import validate_catalog
from environments.models import Environment
from tests.conftest import api_client

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("catalog")]

# (target as the attacker writes it, the location the refusal must name)
OVER_SYSTEM_PATHS = [
    ("/etc", "/etc"),
    ("/etc/", "/etc"),
    ("//etc", "/etc"),  # POSIX may treat a leading "//" specially; Docker and Linux read it as /etc
    ("///etc//", "/etc"),
    ("/./etc", "/etc"),
    ("/etc/.", "/etc"),
    ("/etc/ssl/certs", "/etc"),
    ("/etc/sudoers", "/etc"),
    ("/usr", "/usr"),
    ("/usr/local/bin", "/usr"),
    ("/bin", "/bin"),
    ("/sbin/init", "/sbin"),
    ("/lib", "/lib"),
    ("/lib64", "/lib64"),
    ("/boot", "/boot"),
    ("/dev/shm", "/dev"),
    ("/proc/self", "/proc"),
    ("/sys/fs/cgroup", "/sys"),
    ("/run", "/run"),
    ("/run/docker.sock", "/run"),
    ("/var/run/docker.sock", "/var/run"),
    ("/var/lib/dpkg", "/var/lib"),
    ("/root/.profile", "/root"),
    ("/workspace", "/workspace"),
    ("/workspace/sub", "/workspace"),
    ("/.lsl/bin", "/.lsl"),
]
# Paths that would hide a system location below them.
ABOVE_SYSTEM_PATHS = [("/var", "/var"), ("/", "/"), ("//", "/"), ("/.", "/")]


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    """An allowed host root with a directory in it, so only the target can be wrong."""
    (tmp_path / "ok").mkdir()
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        yield tmp_path


def create(*mounts: Any, user: Any) -> Any:
    return api_client(user).post("/api/v1/environments/", {"name": "m", "template": "busybox", "mounts": list(mounts)},
                                 format="json")


def mount_errors(response: Any) -> list[str]:
    assert response.status_code == 400, (response.status_code, response.content[:500])
    error = response.json()["error"]
    assert set(error["fields"]) == {"mounts"}, error
    return error["fields"]["mounts"]


@pytest.mark.parametrize("target,location", OVER_SYSTEM_PATHS + ABOVE_SYSTEM_PATHS)
def test_targets_over_system_paths_are_refused(people: Any, root: Path, target: str, location: str) -> None:
    for mount in (f"{root}/ok:{target}", {"source": f"{root}/ok", "target": target, "read_only": True},
                  f"volume:cache:{target}"):  # a team volume's target is checked the same way, first
        [message] = mount_errors(create(mount, user=people.owner))
        assert message.startswith(f"[0] {target!r}: cannot mount over {location}"), (mount, message)
    assert Environment.objects.count() == 0


def test_a_refusal_says_why_and_what_to_do(people: Any, root: Path) -> None:
    [inside] = mount_errors(create(f"{root}/ok:/etc/ssl", user=people.owner))
    assert inside == ("[0] '/etc/ssl': cannot mount over /etc: it is a system location of the container; "
                      "mount data elsewhere (e.g. /data, /srv, /opt, /mnt or your home)")
    [above] = mount_errors(create(f"{root}/ok:/var", user=people.owner))
    assert above == "[0] '/var': cannot mount over /var: it contains /var/lib (a system location of the container)"
    [reserved] = mount_errors(create(f"{root}/ok:/.lsl", user=people.owner))
    assert "it is LSL's session keeper" in reserved
    # The second mount is the bad one: its index is the one named, and nothing is created.
    errors = mount_errors(create(f"{root}/ok:/data", f"{root}/ok://etc/", user=people.owner))
    assert errors == [("[1] '//etc/': cannot mount over /etc: it is a system location of the container; "
                       "mount data elsewhere (e.g. /data, /srv, /opt, /mnt or your home)")]
    assert Environment.objects.count() == 0


def test_dot_dot_is_refused_not_resolved(people: Any, root: Path) -> None:
    for target in ("/usr/../etc", "/data/../etc", "/data/..", "/../etc"):
        [message] = mount_errors(create(f"{root}/ok:{target}", user=people.owner))
        assert message == f"[0] {target!r}: container path must not contain '..'", message


def test_anything_posing_as_a_docker_socket_is_refused(people: Any, root: Path) -> None:
    [message] = mount_errors(create(f"{root}/ok:/tmp/docker.sock", user=people.owner))
    assert message == "[0] '/tmp/docker.sock': cannot mount anything as a Docker socket (docker.sock)"


def test_a_socket_is_never_a_mount_source(people: Any, root: Path) -> None:
    """Even inside an allowed root (an admin's root of "/" would hold /var/run/docker.sock)."""
    path = root / "engine.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    (root / "link").symlink_to(path)
    try:
        [direct] = mount_errors(create(f"{path}:/data/engine", user=people.owner))
        assert direct == f"[0] {str(path)!r} is a socket (such as the Docker socket): only directories and files can be mounted"
        [linked] = mount_errors(create(f"{root}/link:/data/engine", user=people.owner))
        assert f"(resolves to {path}) is a socket" in linked
    finally:
        server.close()


@pytest.mark.parametrize("target", ["/data", "/srv/data", "/opt/tools", "/mnt/scratch", "/home/alice/project", "/home",
                                    "/tmp/build", "/var/tmp/x", "/ETC", "/Etc/x", "/etcetera", "/usr2", "/runner",
                                    "/libraries", "/.lslx", "/workspace2", "/data//x/./y/"])
def test_ordinary_targets_stay_allowed(root: Path, target: str) -> None:
    """Checked without creating anything: the policy alone. `/ETC` is allowed on purpose: Linux paths
    are case-sensitive (so is the container's overlay file system), so it is a new directory beside
    /etc that hides nothing (test_uppercase_etc_is_another_directory shows it on the engine)."""
    mount = policy.validate_mount({"source": f"{root}/ok", "target": target})
    assert mount["target"] == "/" + "/".join(part for part in target.split("/") if part not in ("", "."))


def test_environment_files_point_at_the_line(people: Any, root: Path) -> None:
    text = (f"version: 1\nenvironment:\n  template: busybox\n  mounts:\n    - {{source: {root}/ok, target: /data}}\n"
            f"    - {{source: {root}/ok, target: /var/run/docker.sock}}\n")
    response = api_client(people.owner).post("/api/v1/environments/from-yaml/", {"yaml": text}, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]["yaml"] == [(
        "environment.yaml:6:7: environment.mounts[1]: '/var/run/docker.sock': cannot mount over /var/run: it is a "
        "system location of the container; mount data elsewhere (e.g. /data, /srv, /opt, /mnt or your home)")]
    assert Environment.objects.count() == 0


def test_catalog_templates_are_checked_when_applied(tmp_path: Path) -> None:
    """A template mount over /etc would break (or, before this check, subvert) every environment made from it."""
    path = tmp_path / "catalog.yaml"
    path.write_text(json.dumps({"version": 1, "templates": [{"slug": "sneaky", "image": "busybox:1.36", "mounts": [
        {"source": "/srv/x", "target": "/data"}, {"source": "/srv/etc", "target": "//etc"}]}]}, indent=1))
    problems = [str(p) for p in validate_catalog(path)]
    assert len(problems) == 1 and "templates[0].mounts[1].target: '//etc': cannot mount over /etc" in problems[0], problems
    assert problems[0].startswith(f"{path}:") or problems[0].startswith("catalog.yaml:"), problems


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_uppercase_etc_is_another_directory(people: Any, make_env: Any, tmp_path: Path) -> None:
    """Why `/ETC` is not refused: in the container it is a directory of its own and /etc is untouched."""
    from tests.test_host_integration import run

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "passwd").write_text("attacker::0:0::/:/bin/sh\n")
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        env = make_env(people.owner, template="busybox", mounts=(f"{tmp_path}/ok:/ETC:ro",))
    assert env.status == "running", env.last_error
    code, output = run(env, "sh", "-c", "cat /ETC/passwd; grep -c '^root:' /etc/passwd; grep -c attacker /etc/passwd || true")
    assert code == 0, output
    assert output.splitlines()[0] == "attacker::0:0::/:/bin/sh", output
    assert output.splitlines()[1:] == ["1", "0"], output


# --- links: the engine resolves a target inside the container and follows symbolic links ---------

@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_link_in_a_snapshot_cannot_carry_a_mount_over_etc(people: Any, make_env: Any, tmp_path: Path) -> None:
    """A user plants `~/x -> /etc` and snapshots it; a mount at ~/x would land on /etc. Not started."""
    import uuid

    from environments.models import Template
    from tests.conftest import docker_cli

    image = f"lsl-test/linked:{uuid.uuid4().hex[:8]}"
    name = f"lsl-test-link-{uuid.uuid4().hex[:8]}"
    docker_cli("run", "--name", name, "lsl-test/busybox:latest", "sh", "-c", "mkdir -p /home/alice && ln -s /etc /home/alice/x")
    try:
        docker_cli("commit", name, image)
    finally:
        docker_cli("rm", "-f", name)
    try:
        Template.objects.create(slug="linked", image=image, shell="/bin/sh", cpus=0.5, memory_mb=256, pids=128,
                                network_modes=["bridge"])
        (tmp_path / "ok").mkdir()
        (tmp_path / "ok" / "passwd").write_text("attacker::0:0::/:/bin/sh\n")
        with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
            for target in ("/home/alice/x", "/home/alice/x/sub"):
                env = make_env(people.owner, template="linked", mounts=(f"{tmp_path}/ok:{target}:ro",))
                assert env.status == "error", (target, env.status)
                assert "symbolic link" in env.last_error and "/home/alice/x" in env.last_error, env.last_error
    finally:
        for env in Environment.objects.filter(template__slug="linked"):
            if env.container_id:
                docker_cli("rm", "-f", env.container_id)
        docker_cli("rmi", "-f", image)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_parent_swapped_for_a_link_while_running_stops_the_next_start(people: Any, make_env: Any,
                                                                        tmp_path: Path) -> None:
    """While it runs, the user renames the target's parent and links it to /etc: the next start refuses."""
    from environments import runtime, services

    (tmp_path / "ok").mkdir()
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        env = make_env(people.owner, template="busybox", mounts=(f"{tmp_path}/ok:/srv/proj/sudoers.d:ro",))
    assert env.status == "running", env.last_error
    # As root, as a user of a template with sudo could (the busybox template's user cannot write /srv).
    result = runtime.local().exec_run(env.container_id, ["sh", "-c", "mv /srv/proj /srv/old && ln -s /etc /srv/proj"])
    assert result.exit_code == 0, result.output
    services.stop_environment(env)
    with pytest.raises(Exception) as refused:
        services.start_environment(Environment.objects.get(pk=env.pk))
    assert "symbolic link" in str(refused.value) and "/srv/proj" in str(refused.value), refused.value
