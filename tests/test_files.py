"""File transfer through a real daphne into real containers: round trips, roles, refusals."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test.utils import override_settings

from accounts.models import Profile
from environments import runtime
from environments.models import Role
from environments.services import grant_access
from tests.conftest import make_token

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]


class Files:
    def __init__(self, server: Any, env: Any, people: Any) -> None:
        self.server, self.env = server, env
        self.tokens = {u.username: make_token(u) for u in (people.owner, people.viewer, people.outsider)}

    def url(self) -> str:
        return f"{self.server.url}/api/v1/environments/{self.env.id}/files/"

    def get(self, path: str, who: str = "alice", **params: Any) -> requests.Response:
        return requests.get(self.url(), params={"path": path, **params}, headers={"Authorization": f"Token {self.tokens[who]}"},
                            timeout=120)

    def put(self, path: str, body: Any, who: str = "alice", content_type: str = "application/octet-stream",
            **params: Any) -> requests.Response:
        headers = {"Authorization": f"Token {self.tokens[who]}", "Content-Type": content_type}
        return requests.put(self.url(), params={"path": path, **params}, data=body, headers=headers, timeout=120)

    def sh(self, script: str) -> str:
        result = runtime.local().exec_run(self.env.container_id, ["sh", "-c", script], user=f"{self.env.identity['uid']}:{self.env.identity['gid']}")
        assert result.exit_code == 0, result.output
        return result.output.decode()


@pytest.fixture()
def files(people: Any, make_env: Any, live_server_proc: Any) -> Files:
    env = make_env(people.owner, template="busybox")
    assert env.status == "running", env.last_error
    grant_access(env, role=Role.VIEWER, user=people.viewer)
    return Files(live_server_proc, env, people)


def error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text[:500])
    return response.text


def test_a_50_mb_file_round_trips(files: Files, people: Any) -> None:
    data = os.urandom(50 * 1024 * 1024)

    def chunks() -> Any:  # a streamed (chunked) upload, as a client sending a big file would do
        for start in range(0, len(data), 1024 * 1024):
            yield data[start:start + 1024 * 1024]

    put = files.put("/workspace/big/blob.bin", chunks(), mode="0750")
    assert put.status_code == 201, put.text
    assert put.json() == {"path": "/workspace/big/blob.bin", "type": "file", "bytes": len(data), "entries": 1}
    uid = Profile.for_user(people.owner).uid
    assert files.sh("stat -c '%s %a %u' /workspace/big/blob.bin").split() == [str(len(data)), "750", str(uid)]

    got = files.get("/workspace/big/blob.bin", who="victor")  # viewers may read
    assert got.status_code == 200
    assert got.headers["Content-Length"] == str(len(data))
    assert got.headers["X-LSL-File-Type"] == "file" and got.headers["X-LSL-Mode"] == "0750"
    assert 'filename="blob.bin"' in got.headers["Content-Disposition"]
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(data).hexdigest()


def make_tree(root: Path) -> None:
    (root / "tree" / "sub" / "deeper").mkdir(parents=True)
    (root / "tree" / "private").mkdir()
    (root / "tree" / "empty").mkdir()
    (root / "tree" / "readme.txt").write_text("hello\n")
    (root / "tree" / "sub" / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "tree" / "sub" / "deeper" / "data.bin").write_bytes(bytes(range(256)) * 100)
    (root / "tree" / "private" / "secret").write_text("s3cret\n")
    (root / "tree" / "link").symlink_to("sub/run.sh")
    os.chmod(root / "tree" / "sub" / "run.sh", 0o755)
    os.chmod(root / "tree" / "private" / "secret", 0o600)
    os.chmod(root / "tree" / "private", 0o700)
    os.chmod(root / "tree" / "sub" / "deeper", 0o750)
    os.chmod(root / "tree" / "readme.txt", 0o664)  # group write survives (the umask must not apply)


def snapshot_tree(root: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[key] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[key] = ("dir", stat.S_IMODE(info.st_mode))
        else:
            found[key] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def test_a_directory_tree_round_trips_with_contents_and_modes(files: Files, tmp_path: Path) -> None:
    make_tree(tmp_path / "local")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(tmp_path / "local" / "tree", arcname="tree")
    put = files.put("/workspace/up", archive.getvalue(), content_type="application/x-tar")
    assert put.status_code == 201, put.text
    assert put.json()["type"] == "directory" and put.json()["entries"] == 10

    got = files.get("/workspace/up/tree")
    assert got.status_code == 200 and got.headers["Content-Type"] == "application/x-tar"
    assert got.headers["X-LSL-File-Type"] == "directory"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"tree"}
        tar.extractall(tmp_path / "back", filter="fully_trusted")  # "tar" would clear group write itself
    assert snapshot_tree(tmp_path / "back" / "tree") == snapshot_tree(tmp_path / "local" / "tree")

    # A single file as a tar (?format=tar), and the same file raw, agree.
    one = files.get("/workspace/up/tree/sub/run.sh", format="tar")
    with tarfile.open(fileobj=io.BytesIO(one.content)) as tar:
        member = tar.getmember("run.sh")
        assert stat.S_IMODE(member.mode) == 0o755 and tar.extractfile(member).read() == b"#!/bin/sh\necho run\n"
    assert files.get("/workspace/up/tree/sub/run.sh").content == b"#!/bin/sh\necho run\n"


def tar_with(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def test_traversal_and_writes_outside_the_roots_are_refused(files: Files, tmp_path: Path) -> None:
    assert "'..' is not allowed" in error(files.get("/workspace/../etc/passwd"), 400)
    assert "outside the allowed locations" in error(files.get("/etc/passwd"), 400)
    assert "is not absolute" in error(files.get("workspace/x"), 400)
    assert "is not normalised" in error(files.get("/workspace/./x"), 400)
    assert "outside the allowed locations" in error(files.put("/etc/evil", b"x"), 400)
    assert "outside the allowed locations" in error(files.put("/usr/bin/evil", b"x", content_type="application/x-tar"), 400)

    # A symbolic link made inside the environment cannot be used to leave the roots, either way.
    files.sh("ln -s /etc /workspace/etc && ln -s / /tmp/rootfs")
    assert "through a symbolic link" in error(files.get("/workspace/etc/passwd"), 400)
    assert "through a symbolic link" in error(files.put("/workspace/etc/evil", b"x"), 400)
    assert "through a symbolic link" in error(files.put("/tmp/rootfs/bin/evil", b"x"), 400)
    assert "through a symbolic link" in error(files.put("/tmp/rootfs", tar_with((member("x"), b"x")), content_type="application/x-tar"), 400)

    # Archives are checked before anything is extracted.
    refusals = {
        "'..' is not allowed": tar_with((member("ok.txt"), b"fine"), (member("../escape.txt"), b"x")),
        "absolute member names": tar_with((member("/etc/evil"), b"x")),
        "symbolic link to an absolute path": tar_with((member("sneaky", tarfile.SYMTYPE, "/etc"), b"")),
        "symbolic link leads outside the upload": tar_with((member("a/up", tarfile.SYMTYPE, "../../.."), b"")),
        "hard link": tar_with((member("hard", tarfile.LNKTYPE, "../../etc/passwd"), b"")),
        "device files": tar_with((member("dev", tarfile.CHRTYPE), b"")),
    }
    for reason, archive in refusals.items():
        assert reason in error(files.put("/workspace/in", archive, content_type="application/x-tar"), 400), reason
    assert "not a valid (uncompressed) tar" in error(files.put("/workspace/in", b"not a tar", format="tar"), 400)
    assert files.sh("ls -A /workspace/in 2>/dev/null; ls /workspace") == "etc\n", "nothing was extracted"

    # The kernel still has the last word: the user cannot write where it may not.
    files.sh("mkdir /tmp/locked && chmod 500 /tmp/locked")
    assert "failed" in error(files.put("/tmp/locked/x", b"x"), 409)


def test_roles_and_running_state(files: Files, people: Any) -> None:
    assert files.put("/workspace/a.txt", b"a").status_code == 201
    assert files.get("/workspace/a.txt", who="victor").content == b"a"
    assert "member role" in error(files.put("/workspace/b.txt", b"b", who="victor"), 403)
    assert error(files.get("/workspace/a.txt", who="mallory"), 404)
    assert "no such file" in error(files.get("/workspace/missing.txt"), 404)
    from environments.services import stop_environment

    stop_environment(files.env)
    assert "not running" in error(files.get("/workspace/a.txt"), 409)


def test_read_only_mounts_refuse_writes(people: Any, make_env: Any, live_server_proc: Any, tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "given.txt").write_text("from the host\n")
    with override_settings(LSL_HOST_MOUNT_ROOTS=[tmp_path]):
        env = make_env(people.owner, template="busybox", mounts=(f"{tmp_path}/ro:/ro:ro",))
    transfer = Files(live_server_proc, env, people)
    assert transfer.get("/ro/given.txt").content == b"from the host\n"
    assert "read-only mount" in error(transfer.put("/ro/new.txt", b"x"), 400)
