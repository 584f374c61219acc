"""The only module that talks to the Docker engine (Read the Docs style).

It pins the API version, labels everything it creates with ``lsl.*`` labels,
and turns docker-py exceptions into the domain errors below so that nothing
else in LSL needs to know about `docker`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import requests.exceptions
from django.conf import settings

log = logging.getLogger(__name__)

LABEL_ENVIRONMENT = "lsl.environment"
LABEL_OWNER = "lsl.owner"
LABEL_MANAGED = "lsl.managed"
LABEL_TEMPLATE = "lsl.template"
LABEL_INSTANCE = "lsl.instance"  # several LSL servers (or test runs) may share one engine

# A dev shell needs to install packages and switch users; nothing more.
DEV_SHELL_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE", "AUDIT_WRITE"]
# Keeps PID 1 alive with no busy loop, in busybox and coreutils images alike.
KEEPALIVE_COMMAND = ["tail", "-f", "/dev/null"]
WORKSPACE_PATH = "/workspace"


class EngineError(Exception):
    """The engine refused an operation (conflict, bad parameters…)."""


class EngineUnavailableError(EngineError):
    """The engine cannot be reached at all."""


class NodeUnavailableError(EngineUnavailableError):
    """The environment's node is marked unavailable (its engine stopped answering): actions wait for it
    to come back rather than each timing out against it."""

    def __init__(self, node: str, detail: str = "") -> None:
        super().__init__(f"node {node!r} is not answering{': ' + detail if detail else ''}; its environments are "
                         "unavailable until it is back (everything on other nodes works)")
        self.node = node


class ImageNotFound(EngineError):
    """The image does not exist locally and cannot be pulled."""


class ContainerNotFound(EngineError):
    """The container is gone (removed behind LSL's back)."""


class MountTargetRefused(EngineError):
    """A mount target inside the container passes through a symbolic link: the engine would follow it
    (a link to /etc in a snapshot would put a volume over /etc), so the container is not started."""


@dataclass(frozen=True)
class Mount:
    source: str  # a host path (bind) or a volume name (volume)
    target: str
    read_only: bool = False
    type: str = "bind"  # "bind" or "volume"


@dataclass(frozen=True)
class ContainerSpec:
    environment_id: str
    owner: str
    template: str
    name: str
    hostname: str
    image: str
    cpus: float
    memory_mb: int
    pids: int
    network_mode: str
    workspace_volume: str
    disk_mb: int = 0  # 0: no limit; else a hard cap on the container layer where the engine supports one
    binds: list[Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    no_new_privileges: bool = True
    command: list[str] = field(default_factory=lambda: list(KEEPALIVE_COMMAND))  # must end up keeping the container alive


@dataclass(frozen=True)
class ContainerState:
    container_id: str
    environment_id: str
    status: str  # docker's: created, running, paused, restarting, removing, exited, dead
    started_at: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting", "paused")


@dataclass(frozen=True)
class EngineAddress:
    """How to reach one engine: `unix:///var/run/docker.sock`, `tcp://host:2376` (TLS with client
    certificates when `tls_cert` is set: the engine's `--tlsverify` mode), or `ssh://user@host` (the
    system's `ssh` client, so its keys, agent and known_hosts apply). An empty URL: DOCKER_HOST."""

    url: str = ""
    tls_ca: str = ""  # file paths, readable by the server and the worker
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def display(self) -> str:
        return self.url or "(DOCKER_HOST)"

    def client_kwargs(self, timeout: float | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"version": settings.LSL_DOCKER_API_VERSION, "timeout": timeout}
        if not self.url:
            return {**docker.utils.kwargs_from_env(), **kwargs}
        kwargs["base_url"] = self.url
        if self.url.startswith("ssh://"):
            kwargs["use_ssh_client"] = True
        elif self.tls_cert or self.tls_ca:
            kwargs["tls"] = docker.tls.TLSConfig(client_cert=(self.tls_cert, self.tls_key) if self.tls_cert else None,
                                                 ca_cert=self.tls_ca or None, verify=bool(self.tls_ca))
        return kwargs


def _keep_node_ca(api: Any) -> Any:
    """Make a TLS node's CA the one that checks its engine, whatever the process environment says.

    requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (set system-wide on many hosts, this project's CI
    and Debian images with ca-certificates among them) replace a session's `verify` for every request,
    so docker-py checked the engine's certificate against the public CAs and every tcp:// node failed
    with CERTIFICATE_VERIFY_FAILED (docker/docker-py#2433, open). Proxy settings from the environment
    still apply. Returns `api` (a docker.APIClient, i.e. a requests Session).
    """
    if isinstance(api.verify, str):  # a CA file: TLSConfig(ca_cert=..., verify=True)
        merge = api.merge_environment_settings
        ca = api.verify

        def merge_keeping_ca(url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
            merged = merge(url, proxies, stream, verify, cert)
            if verify is None or verify is True:  # not asked for per request: the node's CA, not the env's
                merged["verify"] = ca
            return merged

        api.merge_environment_settings = merge_keeping_ca
    return api


def _patch_ssh_close() -> None:
    """docker-py's SSHSocket.close() writes to and flushes the stdin of its `ssh` process, which raises
    BrokenPipeError once that process has exited: every hijacked exec stream over ssh:// ends that way
    (the remote `docker system dial-stdio` exits with the stream), and the error surfaced from the
    response's close, after all the output had been read, failing the call (seen on every other
    `exec_run` to an ssh node). A process that is gone needs no goodbye: close quietly, then make sure
    it ends. (docker 7.2.0; idempotent.)"""
    try:
        from docker.transport import sshconn
    except ImportError:  # no paramiko: no ssh:// engines at all (do_add_node says so)
        return

    original = sshconn.SSHSocket.close
    if getattr(original, "_lsl_quiet", False):
        return

    def close(self: Any) -> None:
        try:
            original(self)
        except (BrokenPipeError, ConnectionResetError, ValueError):  # ValueError: stdin already closed
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()

    close._lsl_quiet = True  # type: ignore[attr-defined]
    sshconn.SSHSocket.close = close


_patch_ssh_close()

_engines_lock = threading.Lock()
_engines: dict[tuple[EngineAddress, str], "Engine"] = {}


def connect(address: EngineAddress) -> "Engine":
    """The Engine for `address` (one per address and API version, kept for the process's lifetime:
    its client holds a connection pool)."""
    key = (address, settings.LSL_DOCKER_API_VERSION)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine(address)
        return engine


def local() -> "Engine":
    """The engine of LSL_DOCKER_HOST: the `local` node's, and the test suite's."""
    return connect(EngineAddress(url=settings.LSL_DOCKER_HOST))


def _translate(exc: Exception, what: str) -> EngineError:
    # docker's APIError subclasses requests' HTTPError (an OSError): check the specific ones first.
    if isinstance(exc, docker.errors.ImageNotFound):
        return ImageNotFound(f"image not found: {getattr(exc, 'explanation', exc)}")
    if isinstance(exc, docker.errors.NotFound):
        return ContainerNotFound(f"{what}: {getattr(exc, 'explanation', exc)}")
    if isinstance(exc, docker.errors.APIError):
        return EngineError(f"{what}: {exc.explanation or exc}")
    if isinstance(exc, requests.exceptions.SSLError):
        # The class name alone ("SSLError") does not say which side refused whom; OpenSSL's reason does.
        text = str(exc)
        # "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate", or, when the engine hangs up
        # on a refused client certificate before its alert is read, "EOF occurred in violation of protocol".
        reason = re.search(r"\[SSL: [A-Z0-9_]+\] ([^(')\]]+)", text) or re.search(r"Error\(\d+, '([^'(]+)", text)
        return EngineUnavailableError(f"Docker engine is not reachable ({what}): TLS handshake failed: "
                                      f"{reason.group(1).strip() if reason else exc.__class__.__name__}")
    if isinstance(exc, (requests.exceptions.ConnectionError, OSError)):
        return EngineUnavailableError(f"Docker engine is not reachable ({what}): {exc.__class__.__name__}")
    if isinstance(exc, docker.errors.DockerException):
        return EngineUnavailableError(f"Docker engine error ({what}): {exc}")
    return EngineError(f"{what}: {exc}")


class _Guard:
    """`with _guard("starting container"):` turns docker errors into domain errors."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, EngineError):
            return False
        if isinstance(exc, (docker.errors.DockerException, requests.exceptions.RequestException, OSError)):
            raise _translate(exc, self.what) from exc  # type: ignore[arg-type]
        return False


_guard = _Guard


# --- images -------------------------------------------------------------------

ProgressCallback = Callable[[dict[str, Any]], None]


def _split_ref(ref: str) -> tuple[str, str]:
    """Repository and tag (or digest) of a reference; `latest` when none is given."""
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return repo, digest
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
        return repo, tag
    return ref, "latest"


@dataclass(frozen=True)
class WorkspaceVolume:
    name: str
    owner: str  # the LSL user name it was made for (LABEL_OWNER)
    environment_id: str  # the environment it was made for (LABEL_ENVIRONMENT)
    created_at: datetime | None


def _instance_labels() -> dict[str, str]:
    return {LABEL_MANAGED: "1", LABEL_INSTANCE: settings.LSL_INSTANCE}


def _labels(spec: ContainerSpec) -> dict[str, str]:
    return {**_instance_labels(), LABEL_ENVIRONMENT: spec.environment_id, LABEL_OWNER: spec.owner, LABEL_TEMPLATE: spec.template}


# Go's os.ModeSymlink, in the mode of the engine's path stat (X-Docker-Container-Path-Stat).
_GO_MODE_SYMLINK = 1 << 27


def _exit_code_from_status(text: str) -> int | None:
    """`docker ps` says "Exited (137) 5 seconds ago"."""
    if text.startswith("Exited (") and ")" in text:
        try:
            return int(text[len("Exited ("):text.index(")")])
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class EngineEvent:
    """A container event of this instance's containers (`docker events`)."""

    action: str  # create, start, die, kill, oom, stop, destroy, ...
    container_id: str
    environment_id: str
    exit_code: int | None = None
    signal: int | None = None


def _follow(client: Any, stream: Any) -> Iterator[EngineEvent]:
    try:
        with _guard("following engine events"):
            for raw in stream:
                attributes = (raw.get("Actor") or {}).get("Attributes") or {}
                action = str(raw.get("Action") or raw.get("status") or "")
                yield EngineEvent(action=action.split(":")[0], container_id=str(raw.get("id") or ""),
                                  environment_id=attributes.get(LABEL_ENVIRONMENT, ""),
                                  exit_code=_int_or_none(attributes.get("exitCode")),
                                  signal=_int_or_none(attributes.get("signal")))
        raise EngineUnavailableError("Docker engine is not reachable (the event stream ended)")
    finally:
        stream.close()
        client.close()


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# --- exec ------------------------------------------------------------------------

@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    output: bytes


@dataclass
class ExecSocket:
    """A raw, bidirectional TTY socket to an exec.

    `socket_io` is docker-py's read-only SocketIO wrapper: it must stay referenced,
    or its finaliser closes the underlying socket. Writes go to `sock` directly.
    """

    exec_id: str
    socket_io: Any
    sock: socket.socket


def _unguessable_detach_keys(length: int = 24) -> str:
    """A detach-key sequence (docker's "ctrl-x,y,..." syntax) nobody will type or send."""
    import secrets
    import string

    return ",".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))


def _plain_socket(hijacked: Any) -> socket.socket:
    """A plain, bidirectional socket for a hijacked exec stream (exec_start(socket=True)), whatever the
    transport: callers write to it, shut it down for writing (stdin EOF) and hand it to asyncio.

    unix:// (and plain tcp): docker-py returns a read-only SocketIO over the connection's socket, which
    is used as it is. tcp:// with TLS: an ssl.SSLSocket, which asyncio refuses, whose shutdown() drops
    TLS, and which must not be read and written by two threads at once. ssh://: docker-py's SSHSocket,
    a socket object in name only (the data goes through the pipes of an `ssh` process; its fileno is an
    unconnected socket). For those two, the caller gets one end of a socketpair and two threads relay
    between the other end and the transport until both directions have ended.
    """
    if not isinstance(hijacked, (ssl.SSLSocket, socket.socket)) and isinstance(getattr(hijacked, "_sock", None), socket.socket):
        if not isinstance(hijacked._sock, ssl.SSLSocket):
            return hijacked._sock  # SocketIO over a unix or plain TCP socket
        hijacked = hijacked._sock
    if isinstance(hijacked, ssl.SSLSocket):
        transport: _Transport = _TlsTransport(hijacked)
    elif hasattr(hijacked, "proc"):
        transport = _SshTransport(hijacked)
    else:
        raise EngineError(f"unexpected exec stream {type(hijacked).__name__}")
    ours, theirs = socket.socketpair()
    _Relay(transport, theirs).start()
    return ours


class _Transport:
    def recv(self) -> bytes: ...  # blocking; b"" at the end
    def sendall(self, data: bytes) -> None: ...
    def close_write(self) -> None: ...
    def close(self) -> None: ...


class _TlsTransport(_Transport):
    """An SSLSocket used by two threads: every SSL call under one lock, waits for the socket outside it."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        import selectors

        self.tls, self.lock = tls, threading.Lock()
        tls.setblocking(False)
        self.readable, self.writable = selectors.DefaultSelector(), selectors.DefaultSelector()
        self.readable.register(tls, selectors.EVENT_READ)
        self.writable.register(tls, selectors.EVENT_WRITE)
        self.closed = False

    def _wait(self, want: ssl.SSLError) -> None:
        (self.writable if isinstance(want, ssl.SSLWantWriteError) else self.readable).select(0.5)

    def recv(self) -> bytes:
        while not self.closed:
            try:
                with self.lock:
                    return self.tls.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                self._wait(want)
            except ssl.SSLZeroReturnError:
                return b""
        return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.closed:
            try:
                with self.lock:
                    sent = self.tls.send(view)
                view = view[sent:]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                self._wait(want)

    def close_write(self) -> None:
        # TLS's half-close is a close_notify alert (Go's tls.Conn.CloseWrite, which the engine reads as
        # EOF on stdin). SSLSocket.shutdown() would drop TLS and unwrap() waits for the peer's alert, so
        # OpenSSL's SSL_shutdown is reached through the SSL object: its first step sends the alert, the
        # second finds no alert from the engine yet (non-blocking: SSLWantReadError) and reading goes on.
        with self.lock:
            try:
                self.tls._sslobj.shutdown()  # type: ignore[attr-defined]
            except (ssl.SSLError, OSError, AttributeError):
                pass

    def close(self) -> None:
        self.closed = True
        with self.lock:  # never while the other thread is inside an SSL call on it
            try:
                self.tls.close()
            except OSError:
                pass


class _SshTransport(_Transport):
    """docker-py's SSHSocket: the pipes of its `ssh ... docker system dial-stdio` process."""

    def __init__(self, ssh: Any) -> None:
        self.ssh, self.proc = ssh, ssh.proc

    def recv(self) -> bytes:
        try:
            return self.proc.stdout.read1(65536)  # what has arrived (the HTTP response's leftovers first)
        except (OSError, ValueError):
            return b""

    def sendall(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_write(self) -> None:
        try:
            self.proc.stdin.close()  # ssh sends EOF on the channel; dial-stdio half-closes towards the engine
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        # ssh first: closing stdout waits for a read1() in progress, which ends when ssh does.
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        try:
            self.proc.stdout.close()
        except OSError:
            pass


class _Relay:
    """Copies between a transport and one end of a socketpair, both ways, half-closes included.

    Ends when the engine's side has ended and ours has been closed (not just shut down for writing):
    then the transport is closed. A caller closing its end early (a terminal detached) ends it too.
    """

    def __init__(self, transport: _Transport, end: socket.socket) -> None:
        self.transport, self.end = transport, end
        self.down_done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._down, daemon=True, name="lsl-exec-relay-down").start()
        threading.Thread(target=self._up, daemon=True, name="lsl-exec-relay-up").start()

    def _down(self) -> None:
        try:
            while data := self.transport.recv():
                self.end.sendall(data)
        except (OSError, ValueError):
            pass  # the transport failed (the caller reads EOF), or our side is gone
        finally:
            try:
                self.end.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.down_done.set()

    def _up(self) -> None:
        import select

        try:
            while data := self.end.recv(65536):
                self.transport.sendall(data)
            self.transport.close_write()
            # Shut down for writing (stdin EOF): the engine's output still comes. Wait until the caller
            # closes its end (POLLHUP) or the output has ended, whichever is first.
            poller = select.poll()
            poller.register(self.end, select.POLLHUP)
            while not self.down_done.is_set():
                if any(event & select.POLLHUP for _fd, event in poller.poll(500)):
                    break
        except (OSError, ValueError):
            pass
        finally:
            self.transport.close()  # unblocks _down if the engine's side is still open
            self.down_done.wait(10)
            self.end.close()


def _read_frames(sock: socket.socket, on_frame: Callable[[int, bytes], None]) -> None:
    """Demultiplex a non-TTY exec stream (8-byte headers: stream, 0, 0, 0, size) until EOF."""
    buffer = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buffer.extend(data)
        while len(buffer) >= 8:
            size = int.from_bytes(buffer[4:8], "big")
            if len(buffer) < 8 + size:
                break
            on_frame(buffer[0], bytes(buffer[8 : 8 + size]))
            del buffer[: 8 + size]


def _wait_exit_code(api: Any, exec_id: str, timeout: float = 30.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while True:
        data = api.exec_inspect(exec_id)
        if not data.get("Running") or time.monotonic() > deadline:
            code = data.get("ExitCode")
            return -1 if code is None else int(code)
        time.sleep(0.02)


@dataclass
class ExecOutput:
    """A running command's stdout as chunks; stderr and the exit code are available once drained."""

    chunks: Iterator[bytes]
    stderr: bytearray
    exit_code: Callable[[], int]


# --- snapshots ---------------------------------------------------------------------

def _neutral_labels(extra: dict[str, str]) -> dict[str, str]:
    # A commit inherits the container's labels; images must not look like an environment's container.
    return {LABEL_MANAGED: "0", LABEL_ENVIRONMENT: "", LABEL_OWNER: "", LABEL_TEMPLATE: "", LABEL_INSTANCE: "", **extra}


# --- disk -------------------------------------------------------------------------


def hard_disk_limit_in(info: dict[str, Any]) -> bool:
    """From `docker info`: does this storage driver take `storage_opt size`? (Pure, for the rule's test.)"""
    driver = info.get("Driver", "")
    backing = dict((item[0], item[1]) for item in info.get("DriverStatus") or [] if len(item) == 2)
    return driver in ("btrfs", "zfs") or (driver == "overlay2" and backing.get("Backing Filesystem") == "xfs")


@dataclass(frozen=True)
class DiskUsage:
    """Bytes an environment holds on the engine's disk, as the engine counts them (not as the container
    reports: a container's root user could lie)."""

    workspace_bytes: int
    container_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.workspace_bytes + self.container_bytes


# `docker info` says x86_64/aarch64 (uname); images and people say amd64/arm64.
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


# --- one engine ------------------------------------------------------------------------------------

class Engine:
    """One Docker engine (a node): every operation LSL performs on containers, volumes and images.

    Made by `connect(address)`, which keeps one per address. Thread-safe as docker-py's client is
    (a requests session with a connection pool): call from worker threads, never on an event loop.
    """

    def __init__(self, address: EngineAddress) -> None:
        self.address = address
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._hard_disk_limit: bool | None = None  # does it take `storage_opt size`? (asked once)

    def __repr__(self) -> str:
        return f"<Engine {self.address.display}>"

    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(**self.address.client_kwargs(settings.LSL_DOCKER_TIMEOUT))
                    _keep_node_ca(self._client.api)
                except docker.errors.DockerException as exc:
                    raise EngineUnavailableError(f"Docker engine {self.address.display} is not reachable: {exc}") from exc
            return self._client

    def ping(self) -> dict[str, Any]:
        with _guard("pinging engine"):
            client = self.client
            client.ping()
            return client.version()

    def probe(self, timeout: float) -> dict[str, Any]:
        """`docker info` within `timeout` seconds (the node health check: a dead host must not hold the
        checker for the client's long default timeout). The figures placement needs."""
        with _guard(f"checking engine {self.address.display}"):
            api = self.client.api
            info = api._result(api._get(api._url("/info"), timeout=timeout), json=True)
        return {"ncpu": int(info.get("NCPU") or 0), "mem_total": int(info.get("MemTotal") or 0),
                "arch": _ARCHES.get(str(info.get("Architecture") or ""), str(info.get("Architecture") or "")),
                "version": str(info.get("ServerVersion") or ""), "id": str(info.get("ID") or ""),
                "name": str(info.get("Name") or ""), "containers_running": int(info.get("ContainersRunning") or 0)}

    def save_image(self, ref: str) -> Iterator[bytes]:
        """The image as a `docker save` tar stream (to load it on another node)."""
        with _guard(f"exporting image {ref}"):
            return iter(self.client.api.get_image(ref, chunk_size=1 << 20))

    def load_image(self, chunks: Iterable[bytes]) -> None:
        """`docker load` a tar stream (from another node's save_image), streamed without buffering it whole."""
        with _guard("importing an image"):
            api = self.client.api
            response = api._post(api._url("/images/load"), data=(c for c in chunks), params={"quiet": "1"},
                                 headers={"Content-Type": "application/x-tar"}, stream=True)
            for line in api._stream_helper(response, decode=True):
                if isinstance(line, dict) and line.get("error"):
                    raise EngineError(f"importing an image: {line['error']}")

    def image_exists(self, ref: str) -> bool:
        with _guard(f"inspecting image {ref}"):
            try:
                self.client.images.get(ref)
                return True
            except docker.errors.ImageNotFound:
                return False

    def pull_image(self, ref: str, on_progress: ProgressCallback | None = None) -> None:
        """Pull `ref`, reporting aggregated byte progress across layers as it streams."""
        repo, tag = _split_ref(ref)
        layers: dict[str, dict[str, int]] = {}
        with _guard(f"pulling {ref}"):
            try:
                stream: Iterator[dict[str, Any]] = self.client.api.pull(repo, tag=tag, stream=True, decode=True)
                for event in stream:
                    if "error" in event:
                        raise ImageNotFound(f"cannot pull {ref}: {event['error']}")
                    layer = event.get("id")
                    detail = event.get("progressDetail") or {}
                    status = event.get("status", "")
                    # Count download bytes only: "Extracting" restarts its own counter per layer.
                    if layer and status == "Downloading" and detail.get("total"):
                        layers[layer] = {"current": int(detail.get("current", 0)), "total": int(detail["total"])}
                    elif layer and layer in layers and status in ("Download complete", "Verifying Checksum", "Pull complete"):
                        layers[layer]["current"] = layers[layer]["total"]
                    if on_progress is not None:
                        current = sum(v["current"] for v in layers.values())
                        total = sum(v["total"] for v in layers.values())
                        on_progress({"phase": "pulling", "image": ref, "status": event.get("status", ""),
                                     "layers": len(layers), "current": current, "total": total})
            except docker.errors.NotFound as exc:
                raise ImageNotFound(f"cannot pull {ref}: {exc.explanation or exc}") from exc
            except docker.errors.APIError as exc:
                raise ImageNotFound(f"cannot pull {ref}: {exc.explanation or exc}") from exc
        if not self.image_exists(ref):
            raise ImageNotFound(f"cannot pull {ref}: the engine reported success but the image is absent")

    def remove_image(self, ref: str) -> None:
        with _guard(f"removing image {ref}"):
            try:
                self.client.images.remove(ref, force=True)
            except docker.errors.ImageNotFound:
                pass

    # --- volumes and containers ----------------------------------------------------

    def ensure_volume(self, name: str, labels: dict[str, str]) -> None:
        with _guard(f"creating volume {name}"):
            client = self.client
            try:
                client.volumes.get(name)
            except docker.errors.NotFound:
                client.volumes.create(name=name, labels={**_instance_labels(), **labels})

    def volume_exists(self, name: str) -> bool:
        with _guard(f"inspecting volume {name}"):
            try:
                self.client.volumes.get(name)
                return True
            except docker.errors.NotFound:
                return False

    def remove_volume(self, name: str) -> None:
        with _guard(f"removing volume {name}"):
            try:
                self.client.volumes.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass

    def list_workspace_volumes(self) -> list[WorkspaceVolume]:
        """This instance's environment workspace volumes (team volumes and helpers excluded)."""
        with _guard("listing volumes"):
            raw = self.client.api.volumes(filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={settings.LSL_INSTANCE}",
                                                           LABEL_OWNER]}).get("Volumes") or []
        volumes = []
        for item in raw:
            labels = item.get("Labels") or {}
            if not item.get("Name", "").startswith("lsl-ws-"):
                continue
            created = item.get("CreatedAt")
            try:
                created_at = datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None
            except ValueError:
                created_at = None
            volumes.append(WorkspaceVolume(name=item["Name"], owner=labels.get(LABEL_OWNER, ""),
                                           environment_id=labels.get(LABEL_ENVIRONMENT, ""), created_at=created_at))
        return volumes

    def create_container(self, spec: ContainerSpec) -> str:
        """Create (not start) a hardened container for an environment; returns its id."""
        labels = _labels(spec)
        self.ensure_volume(spec.workspace_volume, {LABEL_ENVIRONMENT: spec.environment_id, LABEL_OWNER: spec.owner})
        mounts = [docker.types.Mount(target=WORKSPACE_PATH, source=spec.workspace_volume, type="volume")]
        for bind in spec.binds:
            mounts.append(docker.types.Mount(target=bind.target, source=bind.source, type=bind.type, read_only=bind.read_only))
        def create(**extra: Any) -> str:
            return self.client.containers.create(
                image=spec.image,
                command=spec.command,
                user="0:0",  # PID 1 and LSL's own execs are root; shells run as the environment user (exec user=)
                name=spec.name,
                hostname=spec.hostname if spec.network_mode != "host" else None,
                labels=labels,
                environment=spec.env,
                working_dir=WORKSPACE_PATH,
                mounts=mounts,
                network_mode=spec.network_mode,
                init=True,
                cap_drop=["ALL"],
                cap_add=DEV_SHELL_CAPABILITIES,
                security_opt=["no-new-privileges:true"] if spec.no_new_privileges else [],
                pids_limit=spec.pids,
                mem_limit=f"{spec.memory_mb}m",
                memswap_limit=f"{spec.memory_mb}m",
                nano_cpus=int(spec.cpus * 1e9),
                detach=True,
                **extra,
            ).id

        storage = self._storage_opts(spec.disk_mb)
        with _guard(f"creating container {spec.name}"):
            try:
                return create(**storage)
            except docker.errors.APIError as exc:
                if not storage or "storage" not in str(exc).lower():
                    raise
                # overlay2 on xfs without pquota: no hard limit after all; the worker's measurements still hold.
                log.warning("the engine refused a container disk limit (%s); measuring only from now on", exc.explanation or exc)
                self._hard_disk_limit = False
                return create()

    def check_mount_targets(self, container_id: str) -> None:
        """Refuse to start a container one of whose mount targets is, or lies under, a symbolic link in its
        root filesystem. The engine resolves targets inside the container and follows links, so a link
        left in an image or a snapshot (`~/data -> /etc`) would turn an allowed target into a system path,
        a loophole the policy's lexical checks cannot see. Checked at every start, on the stopped
        container: while it runs, a user may replace a target's parent directory with a link."""
        api = self.client.api
        with _guard("checking mount targets"):
            mounts = api.inspect_container(container_id).get("Mounts") or []
            archive = api._url("/containers/{0}/archive", container_id)
            checked: set[str] = set()
            for mount in mounts:
                target = mount.get("Destination") or ""
                parts = [p for p in target.split("/") if p]
                for depth in range(1, len(parts) + 1):
                    path = "/" + "/".join(parts[:depth])
                    if path in checked:
                        continue
                    checked.add(path)
                    response = api.head(archive, params={"path": path})
                    if response.status_code == 404:
                        break  # missing: the engine creates it as a directory, and everything under it
                    api._raise_for_status(response)
                    header = response.headers.get("X-Docker-Container-Path-Stat")
                    stat = json.loads(base64.b64decode(header)) if header else {}
                    if stat.get("linkTarget") or int(stat.get("mode", 0)) & _GO_MODE_SYMLINK:
                        raise MountTargetRefused(
                            f"the mount target {target} passes through {path}, a symbolic link in the container "
                            f"(to {stat.get('linkTarget') or '?'}); the engine would follow it, so the container "
                            f"is not started. Replace the link with a directory (or mount elsewhere)")

    def start_container(self, container_id: str) -> None:
        self.check_mount_targets(container_id)
        with _guard("starting container"):
            self.client.api.start(container_id)

    def update_resources(self, container_id: str, *, cpus: float, memory_mb: int, pids: int) -> None:
        """Apply new limits to a container, running or stopped (`docker update`). docker-py's
        update_container knows neither NanoCpus (the containers are created with it, and the engine will
        not mix it with a CPU quota) nor PidsLimit, so the API is called directly."""
        api = self.client.api
        with _guard("updating container limits"):
            response = api._post_json(api._url("/containers/{0}/update", container_id), data={
                "NanoCpus": int(cpus * 1e9), "Memory": memory_mb * 1024 * 1024, "MemorySwap": memory_mb * 1024 * 1024,
                "PidsLimit": pids})
            api._raise_for_status(response)

    def stop_container(self, container_id: str, timeout: int = 5) -> None:
        with _guard("stopping container"):
            self.client.api.stop(container_id, timeout=timeout)

    def restart_container(self, container_id: str, timeout: int = 5) -> None:
        with _guard("restarting container"):
            self.client.api.stop(container_id, timeout=timeout)
        self.start_container(container_id)  # with its mount-target check

    def remove_container(self, container_id: str) -> None:
        with _guard("removing container"):
            try:
                self.client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        with _guard("inspecting container"):
            return self.client.api.inspect_container(container_id)

    def container_state(self, container_id: str) -> ContainerState | None:
        """The container's state, or None if it no longer exists."""
        try:
            data = self.inspect_container(container_id)
        except ContainerNotFound:
            return None
        state = data["State"]
        return ContainerState(
            container_id=data["Id"],
            environment_id=(data["Config"].get("Labels") or {}).get(LABEL_ENVIRONMENT, ""),
            status=state["Status"],
            started_at=state.get("StartedAt"),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
        )

    def find_environment_container(self, environment_id: str, name: str) -> ContainerState | None:
        """The container this instance made for an environment, found by label, else by its name.

        Provisioning is resumable: a step interrupted after `create` (a worker or engine that died)
        leaves a container that the next attempt adopts instead of failing on "name already in use".
        """
        with _guard("looking for the environment's container"):
            raw = self.client.api.containers(all=True, filters={"label": [f"{LABEL_ENVIRONMENT}={environment_id}",
                                                                        f"{LABEL_INSTANCE}={settings.LSL_INSTANCE}"]})
        if raw:
            return self.container_state(raw[0]["Id"])
        return self.container_state(name)

    def list_managed_containers(self) -> dict[str, ContainerState]:
        """All LSL containers keyed by environment id, in one engine call (for reconciliation)."""
        with _guard("listing containers"):
            raw = self.client.api.containers(all=True, filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={settings.LSL_INSTANCE}"]})
        states: dict[str, ContainerState] = {}
        for item in raw:
            env_id = (item.get("Labels") or {}).get(LABEL_ENVIRONMENT)
            if env_id:
                states[env_id] = ContainerState(container_id=item["Id"], environment_id=env_id, status=item["State"],
                                                exit_code=_exit_code_from_status(item.get("Status") or ""))
        return states

    def container_events(self) -> Iterator[EngineEvent]:
        """Follow this instance's container events until the engine goes away (then EngineUnavailableError).

        The subscription is open when this returns (so nothing that happens afterwards is missed);
        iterate to receive. Uses its own client with no read timeout: the stream is quiet for as long
        as nothing happens.
        """
        with _guard("following engine events"):
            client = _keep_node_ca(docker.APIClient(**self.address.client_kwargs(None)))
            stream = client.events(decode=True, filters={"type": "container",
                                                        "label": [f"{LABEL_MANAGED}=1", f"{LABEL_INSTANCE}={settings.LSL_INSTANCE}"]})
        return _follow(client, stream)

    def container_log(self, container_id: str, tail: int = 200) -> bytes:
        """The container's own output (stdout and stderr of its command), last `tail` lines."""
        with _guard("reading the container's log"):
            return self.client.api.logs(container_id, stdout=True, stderr=True, tail=tail) or b""

    def container_stats(self, container_id: str) -> dict[str, Any]:
        """One stats sample (no streaming) reduced to the figures LSL reports."""
        with _guard("reading container stats"):
            raw = self.client.api.stats(container_id, stream=False)
        cpu = raw.get("cpu_stats", {})
        pre = raw.get("precpu_stats", {})
        cpu_delta = cpu.get("cpu_usage", {}).get("total_usage", 0) - pre.get("cpu_usage", {}).get("total_usage", 0)
        sys_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
        online = cpu.get("online_cpus") or len(cpu.get("cpu_usage", {}).get("percpu_usage") or []) or 1
        cpu_percent = (cpu_delta / sys_delta) * online * 100.0 if sys_delta > 0 and cpu_delta >= 0 else 0.0
        mem = raw.get("memory_stats", {})
        networks = raw.get("networks") or {}
        return {
            "cpu_percent": round(cpu_percent, 2),
            "memory_bytes": int(mem.get("usage", 0)) - int((mem.get("stats") or {}).get("inactive_file", 0)),
            "memory_limit_bytes": int(mem.get("limit", 0)),
            "pids": int((raw.get("pids_stats") or {}).get("current", 0)),
            "network_rx_bytes": sum(int(n.get("rx_bytes", 0)) for n in networks.values()),
            "network_tx_bytes": sum(int(n.get("tx_bytes", 0)) for n in networks.values()),
        }

    def exec_run(self, container_id: str, cmd: list[str], *, user: str = "", workdir: str | None = None,
                 environment: dict[str, str] | None = None) -> ExecResult:
        """Run a command to completion and collect its combined output."""
        with _guard("running command"):
            api = self.client.api
            exec_id = api.exec_create(container_id, cmd, user=user, workdir=workdir, environment=environment,
                                      stdout=True, stderr=True)["Id"]
            output = api.exec_start(exec_id, stream=False, demux=False) or b""
            code = _wait_exit_code(api, exec_id)  # the output can end a moment before the exec is reaped
        return ExecResult(exit_code=code, output=output)

    def exec_detached(self, container_id: str, cmd: list[str], *, user: str = "") -> None:
        """Start a command in the background (`docker exec -d`) and return at once."""
        with _guard("starting a background command"):
            api = self.client.api
            exec_id = api.exec_create(container_id, cmd, user=user, stdout=False, stderr=False)["Id"]
            api.exec_start(exec_id, detach=True)

    def copy_into(self, container_id: str, files: dict[str, tuple[bytes, int]]) -> None:
        """Write files (absolute path -> (content, mode)) into a container, created or running, as root.

        Through the engine's archive API, so it works the same for a remote engine as for a local one.
        """
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            made: set[str] = set()
            for path, (content, mode) in sorted(files.items()):
                parts = path.strip("/").split("/")
                for depth in range(1, len(parts)):
                    directory = "/".join(parts[:depth])
                    if directory not in made:
                        made.add(directory)
                        info = tarfile.TarInfo(directory)
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                info = tarfile.TarInfo("/".join(parts))
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
        with _guard("copying files into the container"):
            self.client.api.put_archive(container_id, "/", buffer.getvalue())

    def fill_volume(self, name: str, image: str, files: dict[str, tuple[bytes, int]], *, labels: dict[str, str]) -> None:
        """Create a volume holding `files` (name -> (content, mode)) at its root, through a container that
        is created (never started) from `image` just to copy them in; works on a remote engine too."""
        with _guard("filling a volume"):
            api = self.client.api
            # Only the given labels: such a volume is shared by every LSL on the engine, like an image.
            api.create_volume(name=name, labels={LABEL_MANAGED: "1", **labels})
            helper = api.create_container(image, command=["true"], labels=_instance_labels(),
                                          host_config=api.create_host_config(binds={name: {"bind": "/lsl-fill", "mode": "rw"}}))
        try:
            self.copy_into(helper["Id"], {f"/lsl-fill/{path}": content for path, content in files.items()})
        finally:
            self.remove_container(helper["Id"])

    def exec_stream(self, container_id: str, cmd: list[str], *, user: str = "", workdir: str | None = None,
                    environment: dict[str, str] | None = None) -> tuple[Iterator[bytes], Callable[[], int]]:
        """Start a command and return (output chunks, exit-code getter to call after draining)."""
        with _guard("running command"):
            api = self.client.api
            exec_id = api.exec_create(container_id, cmd, user=user, workdir=workdir, environment=environment,
                                      stdout=True, stderr=True)["Id"]
            chunks = api.exec_start(exec_id, stream=True, demux=False)

        def exit_code() -> int:
            with _guard("inspecting command"):
                return _wait_exit_code(api, exec_id)

        return chunks, exit_code

    def exec_open_tty(self, container_id: str, cmd: list[str], *, cols: int, rows: int, user: str = "",
                      workdir: str | None = None, environment: dict[str, str] | None = None) -> ExecSocket:
        """Create and start a TTY exec, returning its raw socket (blocking; call off the event loop)."""
        with _guard("opening terminal"):
            api = self.client.api
            # No COLUMNS/LINES: programs would prefer them to the real (resizable) PTY size.
            env = {"TERM": "xterm-256color", **(environment or {})}
            # dockerd ends a TTY exec's stdin when it sees the detach keys (Ctrl-P Ctrl-Q by default):
            # typed in a shell, or inside a tunnel's binary stream, that would cut the relay. A random
            # sequence per exec cannot occur by accident and cannot be guessed.
            exec_id = api.exec_create(container_id, cmd, stdin=True, stdout=True, stderr=True, tty=True,
                                      user=user, workdir=workdir, environment=env, detach_keys=_unguessable_detach_keys())["Id"]
            socket_io = api.exec_start(exec_id, tty=True, socket=True)
            sock = _plain_socket(socket_io)
            try:
                api.exec_resize(exec_id, height=rows, width=cols)
            except docker.errors.APIError:
                pass  # the process may not have started yet; the first client resize fixes it
            return ExecSocket(exec_id=exec_id, socket_io=socket_io, sock=sock)

    def exec_with_stdin(self, container_id: str, cmd: list[str], chunks: Iterable[bytes], *, user: str = "",
                        workdir: str | None = None, environment: dict[str, str] | None = None,
                        max_output: int = 64 * 1024) -> ExecResult:
        """Run a command feeding it `chunks` on stdin (then EOF); returns its exit code and (bounded) output.

        The output is drained on a thread while stdin is written, so a chatty command cannot block the writer.
        """
        with _guard("running command"):
            api = self.client.api
            exec_id = api.exec_create(container_id, cmd, stdin=True, stdout=True, stderr=True, tty=False, user=user,
                                      workdir=workdir, environment=environment)["Id"]
            socket_io = api.exec_start(exec_id, socket=True)
            sock: socket.socket = _plain_socket(socket_io)
            output = bytearray()

            def keep(_stream: int, data: bytes) -> None:
                if len(output) < max_output:
                    output.extend(data[: max_output - len(output)])

            reader = threading.Thread(target=_read_frames, args=(sock, keep), daemon=True, name="lsl-exec-reader")
            reader.start()
            try:
                try:
                    for chunk in chunks:
                        if chunk:
                            sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the command exited early (e.g. tar failed): its exit code says why
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                reader.join(timeout=settings.LSL_DOCKER_TIMEOUT)
            finally:
                try:
                    sock.close()
                except OSError:
                    pass
                del socket_io
            code = _wait_exit_code(api, exec_id)
        return ExecResult(exit_code=code, output=bytes(output))

    def exec_output(self, container_id: str, cmd: list[str], *, user: str = "", workdir: str | None = None,
                    environment: dict[str, str] | None = None) -> ExecOutput:
        """Start a command and stream its stdout separately from its stderr (for binary output such as tar)."""
        with _guard("running command"):
            api = self.client.api
            exec_id = api.exec_create(container_id, cmd, stdout=True, stderr=True, tty=False, user=user, workdir=workdir,
                                      environment=environment)["Id"]
            frames = api.exec_start(exec_id, stream=True, demux=True)
        stderr = bytearray()

        def stdout_chunks() -> Iterator[bytes]:
            with _guard("reading command output"):
                for out, err in frames:
                    if err and len(stderr) < 64 * 1024:
                        stderr.extend(err)
                    if out:
                        yield out

        def exit_code() -> int:
            with _guard("inspecting command"):
                return _wait_exit_code(api, exec_id)

        return ExecOutput(chunks=stdout_chunks(), stderr=stderr, exit_code=exit_code)

    def running_exec_count(self, container_id: str) -> int:
        """How many execs (terminals, `lsl exec`, file transfers...) are running in the container now."""
        with _guard("inspecting execs"):
            api = self.client.api
            try:
                exec_ids = api.inspect_container(container_id).get("ExecIDs") or []
            except docker.errors.NotFound:
                return 0
            running = 0
            for exec_id in exec_ids:
                try:
                    running += bool(api.exec_inspect(exec_id).get("Running"))
                except docker.errors.NotFound:
                    continue
        return running

    def commit_container(self, container_id: str, repository: str, tag: str, *, labels: dict[str, str],
                         copy_paths: tuple[str, ...] = ()) -> str:
        """Commit a container to `repository:tag`; returns the image id.

        A commit leaves out volumes, so each of `copy_paths` (e.g. the workspace) is copied
        from the container into the image: commit, create a helper container from that
        image, stream the paths into it, and commit the helper.
        """
        ref = f"{repository}:{tag}"
        with _guard(f"committing {ref}"):
            api = self.client.api
            conf = {"Labels": _neutral_labels(labels)}
            if not copy_paths:
                return api.commit(container_id, repository=repository, tag=tag, conf=conf)["Id"]
            base = api.commit(container_id, conf=conf)["Id"]
            helper = api.create_container(base, command=KEEPALIVE_COMMAND,
                                          labels={LABEL_INSTANCE: settings.LSL_INSTANCE, LABEL_MANAGED: "0", "lsl.helper": "snapshot"})["Id"]
            try:
                for path in copy_paths:
                    stream, _stat = api.get_archive(container_id, path)
                    parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
                    if not api.put_archive(helper, parent, stream):
                        raise EngineError(f"committing {ref}: could not copy {path} into the image")
                image_id = api.commit(helper, repository=repository, tag=tag, conf=conf)["Id"]
            finally:
                api.remove_container(helper, force=True)
                try:
                    api.remove_image(base, noprune=True)
                except docker.errors.APIError:
                    pass  # still the parent of the new image: it stays, untagged
            return image_id

    def remove_instance_resources(self) -> int:
        """Remove every container and volume labelled with this instance (test clean-up)."""
        filters = {"label": f"{LABEL_INSTANCE}={settings.LSL_INSTANCE}"}
        with _guard("cleaning up"):
            api = self.client.api
            containers = api.containers(all=True, filters=filters)
            for item in containers:
                api.remove_container(item["Id"], force=True)
            for volume in (api.volumes(filters=filters).get("Volumes") or []):
                api.remove_volume(volume["Name"], force=True)
        return len(containers)

    def supports_hard_disk_limit(self) -> bool:
        """Whether this engine caps a container's writable layer (`--storage-opt size=`): overlay2 only on
        xfs mounted with pquota, and btrfs, zfs. Asked once per engine: `docker info` names the driver and its
        backing file system; pquota is not visible there, so overlay2 on xfs is taken at its word and a
        refusal at create time turns it off (create_container)."""
        known = self._hard_disk_limit
        if known is None:
            with _guard("reading engine info"):
                info = self.client.info()
            known = hard_disk_limit_in(info)
            self._hard_disk_limit = known
            log.info("engine storage driver %s: %s", info.get("Driver", "?"),
                     "hard disk limits on the container layer" if known else "no hard disk limit; measured by the worker")
        return known

    def _storage_opts(self, disk_mb: int) -> dict[str, Any]:
        if disk_mb and self.supports_hard_disk_limit():
            return {"storage_opt": {"size": f"{disk_mb}m"}}
        return {}

    def disk_usage(self, environments: dict[str, tuple[str, str]]) -> dict[str, DiskUsage]:
        """Disk use of environments {environment id: (container id, workspace volume)}, in one engine call.

        The engine's own accounting (`docker system df`): each volume's size and each container's writable
        layer (SizeRw), walked by dockerd itself, so nothing inside the container can fake it. The engine
        walks every container and volume it has for this, however many are asked about: one call per check,
        never one per environment. Environments whose volume or container the engine does not size (another
        volume driver) are left out.
        """
        if not environments:
            return {}
        with _guard("measuring disk usage"):
            data = self.client.api.df()
        volumes = {v.get("Name"): int((v.get("UsageData") or {}).get("Size", -1)) for v in data.get("Volumes") or []}
        containers = {c.get("Id"): int(c.get("SizeRw") or 0) for c in data.get("Containers") or []}
        usage: dict[str, DiskUsage] = {}
        for env_id, (container_id, volume) in environments.items():
            workspace = volumes.get(volume, -1)
            if workspace < 0 or container_id not in containers:
                continue
            usage[env_id] = DiskUsage(workspace_bytes=workspace, container_bytes=containers[container_id])
        return usage

    # --- host --------------------------------------------------------------------------

    def engine_info(self) -> dict[str, Any]:
        with _guard("reading engine info"):
            info = self.client.info()
        return {"containers_running": info.get("ContainersRunning", 0), "images": info.get("Images", 0),
                "server_version": info.get("ServerVersion", ""), "ncpu": info.get("NCPU", 0),
                "mem_total": info.get("MemTotal", 0)}
