"""The session keeper: where terminal sessions' shells live, so they outlive LSL's server processes.

`lsl-keeper` (environments/keeper/keeper.c, a static binary) reaches every environment's container
through a read-only volume per keeper version, mounted at /.lsl/bin (made once per engine: a volume
mount costs nothing at container start, where copying the binary in cost ~50 ms), and runs as the
container's main process (identity.boot_command). It
owns each session's PTY and shell and keeps the last LSL_KEEPER_RING bytes of output with their
stream offsets. A server attaches to a session, asks for output from an offset, and gets it live;
after a restart (or kill -9) the next server attaches again and finds the shell as it was.

Two ways in, same protocol (docs/protocol.md, "The session keeper"):
* the fast path: the keeper's socket directory is bind-mounted from LSL_KEEPER_DIR/<env>/ on this
  host, and the server connects to the Unix socket directly (no `docker exec`, no dockerd copy);
* everywhere else (a remote engine, a container made before the mount existed): a TTY
  `docker exec /.lsl/keeper attach`, a relay that puts its terminal in raw mode first.

Threading: `open_link`, KeeperLink and `open_tunnel` are asyncio (call on the event loop; the docker
calls of the exec path run in the caller's docker executor); `list_sessions`, `kill_session`,
`listening_ports` and `install` block (call them from a worker thread or off the loop).

The keeper is also the way in to an environment's TCP ports (`open_tunnel`: a byte pipe to
127.0.0.1:<port> inside the container) and tells which ports listen (`listening_ports`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from environments import identity, runtime

log = logging.getLogger(__name__)

BIN_DIR_IN_CONTAINER = "/.lsl/bin"
BINARY_IN_CONTAINER = f"{BIN_DIR_IN_CONTAINER}/keeper"
FALLBACK_BINARY = "/.lsl/keeper"  # copied into a container that has no keeper volume (made before keepers)
# The relay, from whichever binary the container has.
ATTACH_COMMAND = ["/bin/sh", "-c", f"[ -x {BINARY_IN_CONTAINER} ] && exec {BINARY_IN_CONTAINER} attach; "
                                   f"exec {FALLBACK_BINARY} attach"]
SOCKET_DIR_IN_CONTAINER = identity.IDENTITY_DIR  # the boot script leaves its identity line here too
SOCKET_IN_CONTAINER = f"{SOCKET_DIR_IN_CONTAINER}/keeper.sock"
SOCKET_NAME = "keeper.sock"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its NUL
READY = b"r\x00\x00\x00\x00"  # the exec relay's "raw mode is on" frame
READ_SIZE = 1 << 20


class KeeperError(runtime.EngineError):
    """The keeper could not be reached or refused a request (its message says which)."""


# --- frames (pure) -------------------------------------------------------------------------

def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def open_request(session_id: str, *, argv: list[str], uid: int, gid: int, cwd: str, env: dict[str, str],
                 cols: int, rows: int, from_offset: int, create: bool) -> bytes:
    items = [f"id={session_id}", f"cols={cols}", f"rows={rows}", f"uid={uid}", f"gid={gid}", f"cwd={cwd}",
             f"from={from_offset}", f"create={1 if create else 0}"]
    items += [f"arg={a}" for a in argv] + [f"env={k}={v}" for k, v in env.items()]
    for item in items:
        if "\x00" in item:
            raise ValueError("NUL in a keeper request")
    return frame(b"O", b"".join(i.encode() + b"\x00" for i in items))


def split_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Take every complete frame off the front of `buf` (which keeps the incomplete rest)."""
    frames, offset = [], 0
    while len(buf) - offset >= 5:
        (length,) = struct.unpack_from(">I", buf, offset + 1)
        if len(buf) - offset - 5 < length:
            break
        frames.append((bytes(buf[offset:offset + 1]), bytes(buf[offset + 5:offset + 5 + length])))
        offset += 5 + length
    del buf[:offset]
    return frames


MAX_MERGED = 256 * 1024  # a merged chunk becomes one websocket frame: well under daphne's 1 MiB cap


def coalesce_output(frames: list[tuple[bytes, bytes]], limit: int = MAX_MERGED, header: int = 16) -> list[tuple[bytes, bytes]]:
    """Merge runs of contiguous `D` frames into one, up to `limit` bytes (the PTY hands a flood over
    in ~1.4 KiB reads; passed on one by one, each would be a channel-layer message). A merged frame
    keeps its first piece's header: its offset, and its read time (the oldest: lag is never understated)."""
    merged: list[tuple[bytes, bytes]] = []
    for kind, payload in frames:
        if kind == b"D" and merged and merged[-1][0] == b"D" and len(merged[-1][1]) + len(payload) - 2 * header <= limit:
            last = merged[-1][1]
            if int.from_bytes(last[:8], "big") + len(last) - header == int.from_bytes(payload[:8], "big"):
                merged[-1] = (b"D", last + payload[header:])
                continue
        merged.append((kind, payload))
    return merged


def parse_fields(payload: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in payload.decode(errors="replace").split("\x00") if "=" in item)


@dataclass(frozen=True)
class Hello:
    version: int
    created: bool  # a new shell (False: an existing one, attached again)
    pid: int
    start: int  # the oldest output offset the keeper still has
    end: int  # the offset of the next byte the shell will write
    sent_from: int  # replay starts here (the requested offset, clamped to what is kept)
    cols: int
    rows: int
    exited: bool

    @classmethod
    def parse(cls, payload: bytes) -> "Hello":
        f = parse_fields(payload)
        return cls(version=int(f.get("version", 1)), created=f.get("created") == "1", pid=int(f.get("pid", 0)), start=int(f.get("start", 0)),
                   end=int(f.get("end", 0)), sent_from=int(f.get("from", 0)), cols=int(f.get("cols", 80)),
                   rows=int(f.get("rows", 24)), exited=f.get("exited") == "1")


@dataclass(frozen=True)
class KeptSession:
    session_id: str
    pid: int
    alive: bool
    exit_code: int | None
    offset: int
    attached: bool


def parse_list(payload: bytes) -> dict[str, KeptSession]:
    sessions = {}
    for line in payload.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 6:
            continue
        sid, pid, alive, code, offset, attached = parts
        sessions[sid] = KeptSession(sid, int(pid), alive == "1", None if alive == "1" else int(code), int(offset),
                                    attached == "1")
    return sessions


# --- installation ----------------------------------------------------------------------------

def binary() -> bytes:
    path = Path(settings.LSL_KEEPER_BINARY)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeeperError(f"the session keeper binary {path} is missing: run scripts/build_keeper.sh ({exc})") from exc


_volume_cache: dict[str, str] = {}  # binary path -> volume name


def volume_name() -> str:
    """One volume per keeper build, so an upgrade never changes the binary under a running container."""
    key = str(settings.LSL_KEEPER_BINARY)
    if key not in _volume_cache:
        _volume_cache[key] = f"lsl-keeper-{hashlib.sha256(binary()).hexdigest()[:16]}"
    return _volume_cache[key]


def ensure_volume(engine: runtime.Engine, image: str) -> None:
    """Make the keeper's volume on this engine if it is not there yet (blocking; `image`: any image the
    engine has, to host the copy)."""
    name = volume_name()
    # Asked every time (one cheap call): a volume removed behind LSL's back would otherwise be
    # re-created empty by the engine at container create, and the container could not boot.
    if not engine.volume_exists(name):
        engine.fill_volume(name, image, {"keeper": (binary(), 0o755)}, labels={"lsl.keeper": "1"})


def volume_mount() -> runtime.Mount:
    return runtime.Mount(source=volume_name(), target=BIN_DIR_IN_CONTAINER, read_only=True, type="volume")


def serve_command() -> list[str]:
    return [BINARY_IN_CONTAINER, "serve", "--ring", str(settings.LSL_KEEPER_RING)]


def host_dir(environment_id: Any) -> Path | None:
    """This host's directory for an environment's keeper socket, or None if the fast path is off
    (no LSL_KEEPER_DIR, or a path too long for a Unix socket)."""
    base = settings.LSL_KEEPER_DIR
    if not base:
        return None
    path = Path(base) / str(environment_id).replace("-", "")
    if len(str(path / SOCKET_NAME)) > MAX_UNIX_PATH:
        log.warning("keeper socket path %s is too long for a Unix socket; using docker exec", path)
        return None
    return path


def container_mount(environment_id: Any) -> runtime.Mount | None:
    """The bind mount that puts the keeper's socket where this host can reach it."""
    path = host_dir(environment_id)
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # container users other than root cannot even look in
    return runtime.Mount(source=str(path), target=SOCKET_DIR_IN_CONTAINER)


def boot_identity_file(environment_id: Any) -> Path | None:
    """Where this host sees the LSL-IDENTITY line the container's boot script leaves (identity.IDENTITY_FILE)."""
    path = host_dir(environment_id)
    return path / identity.IDENTITY_NAME if path is not None else None


def clear_boot_identity(environment_id: Any) -> None:
    """Before a start: a line (or a socket) left by an earlier start must not be taken for this one's."""
    path = boot_identity_file(environment_id)
    if path is not None:
        path.unlink(missing_ok=True)
        (path.parent / SOCKET_NAME).unlink(missing_ok=True)


def remove_host_dir(environment_id: Any) -> None:
    path = host_dir(environment_id)
    if path is not None and path.is_dir():
        for child in path.iterdir():
            child.unlink(missing_ok=True)
        path.rmdir()


def _host_socket(environment_id: Any) -> Path | None:
    path = host_dir(environment_id)
    return path / SOCKET_NAME if path is not None and (path / SOCKET_NAME).exists() else None


def ensure_running(engine: runtime.Engine, container_id: str) -> None:
    """Start a keeper in a container that has none (made before keepers existed, or its keeper
    died): copy it in and run it detached. Blocking."""
    engine.copy_into(container_id, {FALLBACK_BINARY: (binary(), 0o755)})
    engine.exec_detached(container_id, [FALLBACK_BINARY, "serve", "--ring", str(settings.LSL_KEEPER_RING)], user="0:0")


# --- the link to one session (asyncio) -------------------------------------------------------

DockerCall = Callable[..., Awaitable[Any]]


class KeeperLink:
    """One server's attachment to one session in a keeper."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: Any, path: str) -> None:
        self.reader, self.writer = reader, writer
        self._keep = keep  # the exec socket's docker-py wrapper must stay referenced (runtime.ExecSocket)
        self.path = path  # "socket" or "exec": how it was reached (for logs and the bench)
        self._buf = bytearray()
        self._pending: list[tuple[bytes, bytes]] = []
        self.header = 16  # a `D` frame's offset and read time (8 + 8 bytes); version 1 keepers send no time

    def output(self, payload: bytes) -> tuple[int, float | None, bytes]:
        """A `D` frame's (stream offset, when the keeper read it from the PTY (epoch seconds), bytes)."""
        offset = int.from_bytes(payload[:8], "big")
        if self.header == 8:
            return offset, None, payload[8:]
        return offset, int.from_bytes(payload[8:16], "big") / 1e6, payload[16:]

    async def read_frames(self) -> list[tuple[bytes, bytes]]:
        """Every complete frame that has arrived (at least one: waits for it), in order; raises
        EOFError when the keeper (or the relay) hung up. Taking all that is there at once lets the
        caller pass a flood on in large pieces, whatever size the PTY handed it over in."""
        while True:
            frames, self._pending = self._pending + split_frames(self._buf), []
            if frames:
                return frames
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise EOFError(str(exc)) from exc
            if not data:
                raise EOFError("the keeper hung up")
            self._buf += data

    async def read_frame(self) -> tuple[bytes, bytes]:
        """The next frame (see read_frames)."""
        if not self._pending:
            self._pending = await self.read_frames()
        return self._pending.pop(0)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def input(self, data: bytes) -> None:
        self.send(frame(b"I", data))

    def resize(self, cols: int, rows: int) -> None:
        self.send(frame(b"R", struct.pack(">HH", cols, rows)))

    def kill(self) -> None:
        self.send(frame(b"K"))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


async def _connect(engine: runtime.Engine, container_id: str, environment_id: Any, docker_call: DockerCall) -> KeeperLink:
    path = _host_socket(environment_id)
    if path is not None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=2 ** 22)
            return KeeperLink(reader, writer, None, "socket")
        except OSError as exc:
            log.info("keeper socket %s not answering (%s); trying docker exec", path, exc)
    return await _connect_by_exec(engine, container_id, docker_call)


async def _connect_by_exec(engine: runtime.Engine, container_id: str, docker_call: DockerCall, *,
                           started: bool = False) -> KeeperLink:
    ex = await docker_call(engine.exec_open_tty, container_id, ATTACH_COMMAND, cols=200, rows=50,
                           user="0:0")
    ex.sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ex.sock, limit=2 ** 22)
    try:
        ready = await asyncio.wait_for(reader.readexactly(5), timeout=5.0)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
        ready = b""
    if ready == READY:
        return KeeperLink(reader, writer, ex, "exec")
    writer.close()
    if started:
        raise KeeperError(f"the session keeper did not answer in this container ({ready!r})")
    # No keeper (an older container, or it died; the relay says "cannot reach" or is not even
    # there): start one and try once more.
    log.info("no session keeper in %s (%r); starting one", container_id[:12], ready)
    await docker_call(ensure_running, engine, container_id)
    await asyncio.sleep(0.2)
    return await _connect_by_exec(engine, container_id, docker_call, started=True)


async def open_link(engine: runtime.Engine, container_id: str, environment_id: Any, docker_call: DockerCall,
                    request: bytes) -> tuple[KeeperLink, Hello]:
    """Attach to a session (creating its shell if the request says so); returns the link and the
    keeper's hello. Output frames follow on the link."""
    link = await _connect(engine, container_id, environment_id, docker_call)
    link.send(request)
    kind, payload = await asyncio.wait_for(link.read_frame(), timeout=10.0)
    if kind == b"E":
        link.close()
        raise KeeperError(payload.decode(errors="replace"))
    if kind != b"H":
        link.close()
        raise KeeperError(f"unexpected first frame from the keeper: {kind!r}")
    hello = Hello.parse(payload)
    link.header = 16 if hello.version >= 2 else 8
    return link, hello


# --- one-shot requests (blocking) ----------------------------------------------------------

def _request_blocking(engine: runtime.Engine, container_id: str, environment_id: Any, request: bytes,
                      timeout: float = 5.0) -> tuple[bytes, bytes]:
    path = _host_socket(environment_id)
    if path is not None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(path))
                sock.sendall(request)
                return _read_frame_blocking(sock)
        except OSError as exc:
            log.info("keeper socket %s not answering (%s); trying docker exec", path, exc)
    ex = engine.exec_open_tty(container_id, ATTACH_COMMAND, cols=200, rows=50, user="0:0")
    sock = ex.sock
    try:
        sock.settimeout(timeout)
        ready = _recv_exactly(sock, 5)
        if ready != READY:
            raise KeeperError(f"no session keeper in this container ({ready!r})")
        sock.sendall(request)
        return _read_frame_blocking(sock)
    except OSError as exc:
        raise KeeperError(f"the session keeper did not answer: {exc}") from exc
    finally:
        sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise KeeperError("the session keeper hung up")
        data += chunk
    return data


def _read_frame_blocking(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exactly(sock, 5)
    (length,) = struct.unpack(">I", head[1:])
    return head[:1], (_recv_exactly(sock, length) if length else b"")


def list_sessions(engine: runtime.Engine, container_id: str, environment_id: Any) -> dict[str, KeptSession]:
    """The sessions the keeper holds (raises KeeperError if it cannot be reached)."""
    kind, payload = _request_blocking(engine, container_id, environment_id, frame(b"L"))
    if kind != b"l":
        raise KeeperError(payload.decode(errors="replace") or f"unexpected answer {kind!r}")
    return parse_list(payload)


def kill_session(engine: runtime.Engine, container_id: str, environment_id: Any, session_id: str) -> bool:
    """HUP the session's shell (and KILL it a moment later). False if the keeper does not know it."""
    kind, _payload = _request_blocking(engine, container_id, environment_id, frame(b"K", session_id.encode()))
    return kind == b"k"


def forget_session(engine: runtime.Engine, container_id: str, environment_id: Any, session_id: str) -> None:
    """Drop an exited session's record (its output and exit code) once the server has recorded the end."""
    try:
        _request_blocking(engine, container_id, environment_id, frame(b"F", session_id.encode()))
    except runtime.EngineError as exc:
        log.debug("keeper: forgetting %s failed: %s", session_id, exc)


# --- tunnels to the environment's ports (asyncio) ----------------------------------------------

OLD_KEEPER_REFUSAL = "expected O, L, K or F"  # what a keeper before version 3 answers to `T` and `N`
NOTHING_LISTENING = "nothing is listening on port"


def tunnel_request(port: int) -> bytes:
    """The `T` request: the port as ASCII decimal (the keeper answers `t`, then raw bytes; or `E`)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"not a port: {port!r}")
    return frame(b"T", str(port).encode())


def tunnel_refusal(kind: bytes, payload: bytes, port: int) -> Exception:
    """The exception for a keeper's answer to `T` other than `t`: PortClosed when nothing listens
    (a 409 the user can act on), KeeperError otherwise."""
    # ports imports models: not at module import time
    from environments.ports import PortClosed

    message = payload.decode(errors="replace")
    if kind == b"E" and message.startswith(OLD_KEEPER_REFUSAL):
        return KeeperError("this environment's keeper predates port forwarding: restart the environment to reach its ports")
    if kind == b"E" and message.startswith(NOTHING_LISTENING):
        return PortClosed(f"Nothing is listening on port {port} in this environment.")
    if kind == b"E":
        return KeeperError(f"the session keeper could not open port {port}: {message}")
    return KeeperError(f"unexpected answer from the session keeper to a tunnel request: {kind!r}")


class Tunnel:
    """A raw byte pipe to a TCP port inside an environment, through its keeper.

    `sock` is connected, non-blocking, and positioned right after the keeper's `t` frame: every
    byte read from it is the service's, every byte written goes to the service. `path` says how it
    was reached ("socket": the keeper's Unix socket on this host; "exec": a `docker exec` relay).
    `keep` must stay referenced while the tunnel is used (the exec path's docker-py wrapper closes
    the socket when collected). Half-close (`shutdown(SHUT_WR)`, StreamWriter.write_eof) reaches the
    service on the socket path; on the exec path the relay is a TTY, which carries no EOF of its
    own, so a half-close there ends the whole tunnel (docs/protocol.md)."""

    def __init__(self, sock: socket.socket, path: str, keep: Any = None) -> None:
        self.sock, self.path, self.keep = sock, path, keep
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def streams(self, limit: int = 2 ** 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio streams over the socket (made once; the writer owns the socket from then on)."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(sock=self.sock, limit=limit)
        return self._streams

    def close(self) -> None:
        try:
            if self._streams is not None:
                self._streams[1].close()
            else:
                self.sock.close()
        except (OSError, RuntimeError):
            pass
        self.keep = None


async def _recv_exactly_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes (never more: what follows belongs to the tunnel's byte stream)."""
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise KeeperError("the session keeper hung up")
        data += chunk
    return data


async def _tunnel_reply(sock: socket.socket, request: bytes, port: int, *, ready: bool) -> None:
    """Send `T`, read the answer frame with exact reads; raise unless it is `t`. `ready`: first
    read the exec relay's raw-mode frame."""
    loop = asyncio.get_running_loop()
    if ready:
        got = await _recv_exactly_async(loop, sock, 5)
        if got != READY:
            raise KeeperError(f"no session keeper in this container ({got!r})")
    await loop.sock_sendall(sock, request)
    head = await _recv_exactly_async(loop, sock, 5)
    (length,) = struct.unpack(">I", head[1:])
    if length > MAX_REPLY:
        raise KeeperError("the session keeper sent an oversized answer")
    payload = await _recv_exactly_async(loop, sock, length) if length else b""
    if head[:1] != b"t":
        raise tunnel_refusal(head[:1], payload, port)


MAX_REPLY = 64 * 1024
TUNNEL_TIMEOUT = 15.0  # the keeper's own connect timeout is 10 s


async def _tunnel_by_socket(path: Path, request: bytes, port: int) -> Tunnel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, str(path))
    except OSError:
        sock.close()
        raise
    try:
        await asyncio.wait_for(_tunnel_reply(sock, request, port, ready=False), TUNNEL_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return Tunnel(sock, "socket")


async def _tunnel_by_exec(engine: runtime.Engine, container_id: str, docker_call: DockerCall, request: bytes, port: int,
                          *, started: bool = False) -> Tunnel:
    ex = await docker_call(engine.exec_open_tty, container_id, ATTACH_COMMAND, cols=200, rows=50, user="0:0")
    sock = ex.sock
    sock.setblocking(False)
    try:
        await asyncio.wait_for(_tunnel_reply(sock, request, port, ready=True), TUNNEL_TIMEOUT)
    except KeeperError as exc:
        sock.close()
        if started or not str(exc).startswith("no session keeper"):
            raise
        # No keeper (an older container, or it died): start one and try once more, as _connect_by_exec does.
        log.info("no session keeper in %s (%s); starting one", container_id[:12], exc)
        await docker_call(ensure_running, engine, container_id)
        await asyncio.sleep(0.2)
        return await _tunnel_by_exec(engine, container_id, docker_call, request, port, started=True)
    except BaseException:
        sock.close()
        raise
    return Tunnel(sock, "exec", keep=ex)


async def open_tunnel(engine: runtime.Engine, container_id: str, environment_id: Any, docker_call: DockerCall,
                      port: int) -> Tunnel:
    """A byte pipe to `port` on the environment's loopback (127.0.0.1, else ::1), through its keeper.
    Raises ports.PortClosed when nothing listens there, KeeperError otherwise. The caller checks
    who may reach the port (ports.require_port_access) first."""
    request = tunnel_request(port)
    path = _host_socket(environment_id)
    if path is not None:
        try:
            return await _tunnel_by_socket(path, request, port)
        except asyncio.TimeoutError as exc:
            raise KeeperError(f"the session keeper did not answer a tunnel request for port {port}") from exc
        except OSError as exc:  # a socket left by a stopped keeper, say: the relay reaches a live one
            log.info("keeper socket %s not answering (%s); trying docker exec", path, exc)
    try:
        return await _tunnel_by_exec(engine, container_id, docker_call, request, port)
    except asyncio.TimeoutError as exc:
        raise KeeperError(f"the session keeper did not answer a tunnel request for port {port}") from exc
    except OSError as exc:
        raise KeeperError(f"the session keeper could not be reached: {exc}") from exc


def listening_ports(engine: runtime.Engine, container_id: str, environment_id: Any) -> list[Any]:
    """The TCP ports listening inside the environment (its network namespace), as
    ports.ListeningPort, sorted. Blocking; raises KeeperError (an old keeper: restart to see ports)."""
    from environments.ports import parse_proc_net_tcp

    kind, payload = _request_blocking(engine, container_id, environment_id, frame(b"N"))
    if kind == b"n":
        return parse_proc_net_tcp(payload.decode(errors="replace"))
    message = payload.decode(errors="replace")
    if message.startswith(OLD_KEEPER_REFUSAL):
        raise KeeperError("this environment's keeper predates port detection: restart the environment to see its ports")
    raise KeeperError(message or f"unexpected answer {kind!r}")
