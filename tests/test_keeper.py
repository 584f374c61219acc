"""The session keeper (environments/keeper.py, environments/keeper/keeper.c).

Pure tests of the wire format, then the real binary in real containers: both test images (BusyBox
with no libc at all, Debian with glibc), the `docker exec` relay path, a container that has no
keeper yet, and a plain container user refused at the socket.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from django.test import override_settings

from environments import keeper, runtime
from sessions.hub import in_docker_thread
from tests.conftest import docker_cli


def test_open_request_round_trips_through_the_frame_format() -> None:
    data = keeper.open_request("s-1", argv=["/bin/sh", "-l"], uid=10001, gid=10002, cwd="/workspace",
                               env={"HOME": "/home/a", "TERM": "xterm"}, cols=120, rows=40, from_offset=7, create=False)
    assert data[:1] == b"O" and int.from_bytes(data[1:5], "big") == len(data) - 5
    items = data[5:].split(b"\x00")[:-1]
    assert items[:8] == [b"id=s-1", b"cols=120", b"rows=40", b"uid=10001", b"gid=10002", b"cwd=/workspace", b"from=7", b"create=0"]
    assert items[8:] == [b"arg=/bin/sh", b"arg=-l", b"env=HOME=/home/a", b"env=TERM=xterm"]


def test_it_refuses_a_nul_in_a_request() -> None:
    with pytest.raises(ValueError):
        keeper.open_request("s", argv=["/bin/sh"], uid=0, gid=0, cwd="/", env={"A": "x\x00y"}, cols=80, rows=24,
                            from_offset=0, create=True)


def test_hello_and_list_parse() -> None:
    hello = keeper.Hello.parse(b"version=2\x00created=0\x00pid=9\x00start=100\x00end=300\x00from=100\x00cols=90\x00rows=30\x00exited=0")
    assert (hello.created, hello.pid, hello.start, hello.end, hello.sent_from, hello.cols, hello.rows, hello.exited) == \
        (False, 9, 100, 300, 100, 90, 30, False)
    kept = keeper.parse_list(b"a 12 1 -1 4096 1\nb 13 0 3 10 0\ngarbage\n")
    assert kept["a"].alive and kept["a"].exit_code is None and kept["a"].attached and kept["a"].offset == 4096
    assert not kept["b"].alive and kept["b"].exit_code == 3 and not kept["b"].attached


# --- the real binary --------------------------------------------------------------------------

async def _shell_round_trip(container_id: str, environment_id: Any, session_id: str) -> tuple[keeper.Hello, bytes]:
    request = keeper.open_request(session_id, argv=["/bin/sh"], uid=0, gid=0, cwd="/", env={"PS1": "$ "},
                                  cols=80, rows=24, from_offset=0, create=True)
    link, hello = await keeper.open_link(runtime.local(), container_id, environment_id, in_docker_thread, request)
    try:
        link.input(b"echo kept-$((6*7))\n")
        out = b""
        while b"kept-42" not in out:
            kind, payload = await asyncio.wait_for(link.read_frame(), timeout=10)
            if kind == b"D":
                out += link.output(payload)[2]
        link.kill()
        while True:
            kind, payload = await asyncio.wait_for(link.read_frame(), timeout=10)
            if kind == b"X":
                return hello, out
    finally:
        link.close()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
@pytest.mark.usefixtures("engine", "catalog")
@pytest.mark.parametrize("template", ["busybox", "debian"])
def test_a_session_runs_in_every_image(people: Any, make_env: Any, template: str) -> None:
    env = make_env(people.owner, template=template)
    assert env.status == "running", env.last_error
    hello, out = asyncio.run(_shell_round_trip(env.container_id, env.id, "t-" + uuid.uuid4().hex[:8]))
    assert hello.created and hello.pid > 0 and b"kept-42" in out


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
@pytest.mark.usefixtures("engine", "catalog")
def test_the_exec_relay_reaches_the_same_keeper(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, template="busybox")
    session_id = "relay-" + uuid.uuid4().hex[:8]
    with override_settings(LSL_KEEPER_DIR=""):  # no host socket: through `docker exec keeper attach`
        hello, out = asyncio.run(_shell_round_trip(env.container_id, env.id, session_id))
        assert hello.created and b"kept-42" in out
        listed = keeper.list_sessions(runtime.local(), env.container_id, env.id)
    # The fast path sees the same keeper and the same (exited) session.
    assert listed[session_id].exit_code == 129  # HUP
    assert keeper.list_sessions(runtime.local(), env.container_id, env.id)[session_id].exit_code == 129


@pytest.mark.usefixtures("engine")
def test_a_container_without_a_keeper_gets_one(settings: Any) -> None:
    settings.LSL_KEEPER_DIR = ""
    name = f"lsl-keeperless-{uuid.uuid4().hex[:8]}"
    run = docker_cli("run", "-d", "--init", "--name", name, "--label", f"{runtime.LABEL_INSTANCE}={settings.LSL_INSTANCE}",
                     "lsl-test/busybox:latest", "tail", "-f", "/dev/null")
    assert run.returncode == 0, run.stderr
    try:
        hello, out = asyncio.run(_shell_round_trip(name, "none", "old-1"))
        assert hello.created and b"kept-42" in out
    finally:
        docker_cli("rm", "-f", name)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
@pytest.mark.usefixtures("engine", "catalog")
def test_it_rejects_a_plain_container_user(people: Any, make_env: Any) -> None:
    env = make_env(people.owner, template="busybox")
    user = runtime.local().exec_run(env.container_id, [keeper.BINARY_IN_CONTAINER, "attach"], user="10001:10001")
    assert user.exit_code != 0 and b"cannot reach the keeper" in user.output
    root = runtime.local().exec_run(env.container_id, ["ls", "-ld", keeper.SOCKET_DIR_IN_CONTAINER])
    assert root.output.startswith(b"drwx------"), root.output


def d(offset: int, data: bytes, read_us: int = 0) -> bytes:
    """A version-2 `D` payload: offset, read time (microseconds), bytes."""
    return offset.to_bytes(8, "big") + read_us.to_bytes(8, "big") + data


def test_frames_split_at_any_boundary_and_contiguous_output_merges() -> None:
    stream = (keeper.frame(b"D", d(0, b"abc", 100)) + keeper.frame(b"D", d(3, b"de", 200))
              + keeper.frame(b"D", d(9, b"z", 300)) + keeper.frame(b"X", (3).to_bytes(4, "big")))
    for cut in range(len(stream) + 1):
        buf = bytearray(stream[:cut])
        frames = keeper.split_frames(buf)
        buf += stream[cut:]
        frames += keeper.split_frames(buf)
        assert not buf and [k for k, _ in frames] == [b"D", b"D", b"D", b"X"]
    merged = keeper.coalesce_output(frames)
    # A gap (5..9) is not papered over; a merged frame keeps its oldest read time.
    assert merged == [(b"D", d(0, b"abcde", 100)), (b"D", d(9, b"z", 300)), (b"X", (3).to_bytes(4, "big"))]
    link = keeper.KeeperLink(None, None, None, "test")  # type: ignore[arg-type]
    assert link.output(merged[0][1]) == (0, 0.0001, b"abcde")
    link.header = 8  # a version-1 keeper: no read time
    assert link.output((7).to_bytes(8, "big") + b"old") == (7, None, b"old")


def test_frames_that_came_with_the_hello_are_not_lost() -> None:
    """The keeper sends its replay right behind the hello: one read takes both."""
    async def scenario() -> list[tuple[bytes, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(keeper.frame(b"H", b"created=0") + keeper.frame(b"D", d(0, b"replayed")))
        reader.feed_eof()
        link = keeper.KeeperLink(reader, None, None, "test")  # type: ignore[arg-type]
        assert (await link.read_frame())[0] == b"H"
        return await link.read_frames()

    assert asyncio.run(scenario()) == [(b"D", d(0, b"replayed"))]


def test_merged_output_stays_under_a_websocket_frame_limit() -> None:
    frames = [(b"D", d(i * 1000, b"x" * 1000)) for i in range(10)]
    merged = keeper.coalesce_output(frames, limit=3000)
    assert [len(p) - 16 for _, p in merged] == [3000, 3000, 3000, 1000]
