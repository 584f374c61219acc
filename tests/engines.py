"""A second, private Docker engine for fault tests: kill -9 it, restart it, leave the main engine alone.

Every other test uses the main engine (/var/run/docker.sock). Fault tests need an engine they can
crash, so this module runs another dockerd, fully separated from the main one:

    what                 private engine <name>                       why
    network namespace    lsl-eng-<name> (lo up)                      its docker0/iptables/ip_forward live there
    API socket           /run/lsl-engine-<name>/docker.sock          a path on disk: reachable from the host netns
    exec root            /run/lsl-engine-<name>/exec                 its own managed containerd, runc state, netns files
    data root            /var/lib/lsl-engines/<name>/root            ext4 (overlay2 needs a real fs, not tmpfs)
    daemon.json          /var/lib/lsl-engines/<name>/daemon.json     never reads /etc/docker/daemon.json
    identity key         /var/lib/lsl-engines/<name>/key.json        else both engines share /etc/docker/key.json,
                                                                     i.e. the same `docker info` ID
    cgroup parent        /lsl-engine-<name>                          its containers are easy to find (and reap)
    log                  var/engines/<name>.log (in the repo)        appended to; errors quote its tail

Why not `ip netns exec`: it also unshares the mount namespace and remounts /sys, which hides the
cgroup v1 mounts under /sys/fs/cgroup ("Devices cgroup isn't mounted"), and it would give every
(re)start its own mount namespace, so overlay mounts made by a restarted dockerd would be invisible
to the shims of the previous one. `nsenter --net=` enters the network namespace only.

Why never on the host netns: a second dockerd there (e.g. with `--bridge none`) deletes the host's
docker0 at start-up and breaks every container of the main engine.

Crash semantics (Docker 20.10, live-restore off), observed on this machine:
  * kill(): SIGKILL to dockerd only. Its managed containerd dies with it anyway: dockerd starts it
    with a parent-death signal (the kernel's doing, not ours). Shims and containers keep running.
  * restart(): dockerd starts a new containerd on the same state, which reconnects to the surviving
    shims; dockerd then *stops* the containers that were running (SIGTERM, so `--init` + `tail`
    exits 143) and lists them as exited. `docker start` brings them back.

Every wait is bounded and fails with the tail of the engine's log. Needs root.

Remote transports (opt-in, `private_engine(name, tcp_tls=True)`): the engine is then also reachable
over the network, as a node on another machine would be, but only from this machine:

    what                 private engine <name> with tcp_tls=True        why
    veth pair            lslv-<crc32 of name> (host) <-> eth1 (netns)   a link of our own: no host NIC, no bridge
    addresses            10.213.<i>.1/30 host side, .2 engine side      a /30 nobody else uses (first free <i>)
    TCP API              tcp://10.213.<i>.2:2376, --tlsverify           docker's TLS client-certificate mode
    certificates         /var/lib/lsl-engines/<name>/tls/               a CA, a server cert (SAN = engine IP) and
                                                                        a client cert of its own (openssl)
    sshd (start_sshd())  10.213.<i>.2:22, in the engine's netns         `ssh://root@10.213.<i>.2`: DOCKER_HOST of
                                                                        its sessions is the engine's socket
    ssh client side      /var/lib/lsl-engines/<name>/ssh/               a key, known_hosts, an ssh_config and a
                                                                        `bin/ssh` wrapper that uses them

The ssh wrapper exists because OpenSSH finds ~/.ssh through the password database, not $HOME: a
test cannot point the system `ssh` at its own keys but with `-F`. Putting `ssh.bin_dir` first on PATH
(of LSL's processes) is what a deployment's ~/.ssh/config of the LSL user does. All of it goes with
the netns in stop() (the veth is deleted explicitly too, so a reap finds nothing left either).

Usage:
    engine = private_engine("faults")
    engine.start(); engine.load_image("lsl-test/busybox:latest")
    ...; engine.kill(); ...; engine.restart(); ...
    engine.stop()          # idempotent; safe after kill(); leaves no process, mount, cgroup, netns

or the `private_engine` fixture (import `private_engine_fixture` from this module into a test module).
Leftovers of a test process that died hard are reaped by the next start() (or
`python -m tests.engines reap`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN_ENGINE_URL = "unix:///var/run/docker.sock"
TEST_IMAGE = "lsl-test/busybox:latest"
STATE_BASE = Path("/var/lib/lsl-engines")
RUN_PREFIX = "/run/lsl-engine-"
NETNS_PREFIX = "lsl-eng-"
LOG_DIR = REPO / "var" / "engines"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Short: the name ends up in unix socket paths (108 bytes max, containerd's go deeper than ours).
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_MNT_DETACH = 2
_LOG_TAIL_LINES = 40
# Remote transports: private /30s carved from 10.213.0.0/16, one per engine with tcp_tls.
SUBNET_PREFIX = "10.213"
TLS_PORT = 2376
SSH_PORT = 22
VETH_PREFIX = "lslv-"
ENGINE_IFACE = "eth1"  # inside the engine's netns (its docker0 and lo are the only other links there)


class EngineError(RuntimeError):
    """A private engine did not do what was asked in time (the message quotes its log)."""


# --- processes ------------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: the state follows the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    # Zombies count as gone: PID 1 of this VM reaps orphans only now and then, and a zombie can
    # neither run nor hold a cgroup, a mount or a namespace any more.
    return _proc_state(pid) not in (None, "Z", "X")


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: with the pid, it names a process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _docker_env() -> dict[str, str]:
    # -H is always given explicitly; a DOCKER_HOST/DOCKER_CONTEXT left in the environment by a test
    # (pointing at some engine) must not be able to redirect or conflict with it.
    return {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY")}


# --- mounts and cgroups ---------------------------------------------------------------------------


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        # mountinfo escapes space, tab, newline and backslash as octal.
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point))
    return points


def _mounts_under(roots: list[Path]) -> list[str]:
    prefixes = [str(root) for root in roots]
    return [p for p in _mount_points() if any(p == r or p.startswith(r + "/") for r in prefixes)]


def _umount_detach(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount (any more)
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def _cgroup_dirs(parent: str) -> list[Path]:
    """The engine's cgroup parent in every mounted hierarchy (v1 controllers, or the v2 root)."""
    candidates = [CGROUP_ROOT / parent] + [d / parent for d in CGROUP_ROOT.iterdir() if d.is_dir()]
    return [d for d in candidates if d.is_dir()]


def _cgroup_pids(parent: str) -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs(parent):
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except OSError:
                pass
    return pids


# --- the engine -----------------------------------------------------------------------------------


class PrivateEngine:
    """A dockerd of its own (netns, data root, exec root, containerd, socket) that may be crashed."""

    def __init__(self, name: str, tcp_tls: bool = False) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"engine name must match {_NAME_RE.pattern}: {name!r}")
        self.name = name
        self.tcp_tls = tcp_tls
        self.netns = f"{NETNS_PREFIX}{name}"
        self.netns_path = Path("/run/netns") / self.netns
        self.run_dir = Path(f"{RUN_PREFIX}{name}")
        self.exec_root = self.run_dir / "exec"
        self.sock = str(self.run_dir / "docker.sock")
        self.url = f"unix://{self.sock}"
        self.pidfile = self.run_dir / "dockerd.pid"
        self.owner_file = self.run_dir / "owner"
        self.state_dir = STATE_BASE / name
        self.data_root = self.state_dir / "root"
        self.config_file = self.state_dir / "daemon.json"
        self.log_path = LOG_DIR / f"{name}.log"
        self.cgroup_parent = f"lsl-engine-{name}"
        # Remote transports (tcp_tls=True): the veth name follows from the engine name alone, so a reap
        # (which knows only the name) can delete it; the /30 is chosen at start() (first free one).
        self.veth = f"{VETH_PREFIX}{zlib.crc32(name.encode()):08x}"
        self.tls_dir = self.state_dir / "tls"
        self.ssh_dir = self.state_dir / "ssh"
        self.host_ip: str | None = None
        self.engine_ip: str | None = None
        self.tls: ClientCert | None = None  # the client certificate the engine accepts
        self.ssh: SshAccess | None = None
        # Seconds the last start/kill/restart/stop took (tests report them; see test_private_engine).
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._sshd: subprocess.Popen[bytes] | None = None
        self._server_cert: ClientCert | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"PrivateEngine({self.name!r}, pid={self.pid})"

    # -- public API --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """dockerd's pid while it runs, else None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = _read_pid(self.pidfile)
        # The pidfile outlives a kill -9: make sure the pid is still *our* dockerd.
        if pid and _alive(pid) and f"--exec-root {self.exec_root} " in _cmdline(pid) + " ":
            return pid
        return None

    @property
    def containerd_pid(self) -> int | None:
        """The managed containerd's pid while it runs, else None."""
        pid = _read_pid(self.exec_root / "containerd" / "containerd.pid")
        if pid and _alive(pid) and str(self.exec_root) in _cmdline(pid):
            return pid
        return None

    @property
    def tcp_url(self) -> str:
        """`tcp://<engine ip>:2376` (TLS, client certificate required: `self.tls`); tcp_tls engines only."""
        if self.engine_ip is None:
            raise EngineError(f"{self}: no TCP listener (private_engine(name, tcp_tls=True), then start())")
        return f"tcp://{self.engine_ip}:{TLS_PORT}"

    def tls_docker_args(self, cert: ClientCert | None = None) -> list[str]:
        """docker CLI options that reach the TCP listener with `cert` (default: the accepted one)."""
        cert = cert or self.tls
        assert cert is not None, "tcp_tls engines only"
        return ["-H", self.tcp_url, "--tlsverify", "--tlscacert", str(cert.ca), "--tlscert", str(cert.cert),
                "--tlskey", str(cert.key)]

    def start_sshd(self, timeout: float = 30) -> SshAccess:
        """Run an sshd in the engine's netns on <engine ip>:22 whose sessions talk to this engine.

        `ssh://root@<engine ip>` then works as docker's ssh transport expects of a remote host:
        `ssh host docker system dial-stdio` reaches this engine (the sshd sets DOCKER_HOST for its
        sessions). Key auth only, with a key made here; the client side (key, known_hosts, ssh_config,
        `ssh` wrapper) is in the returned SshAccess. Stopped with the engine (it lives in its netns).
        """
        if self.engine_ip is None:
            raise EngineError(f"{self}: start_sshd() needs a tcp_tls engine (the sshd listens on its veth)")
        if self.ssh is not None:
            return self.ssh
        missing = [tool for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen") if shutil.which(tool) is None]
        if missing:
            raise EngineError(f"missing {missing}: apt-get install openssh-server openssh-client")
        self.ssh = _start_sshd(self, timeout)
        return self.ssh

    def start(self, timeout: float = 60) -> None:
        """Start a fresh engine (empty data root) and wait until `docker -H url info` works."""
        t0 = time.monotonic()
        _require_root_and_tools()
        reap_stale_engines()
        if self.pid is not None:
            raise EngineError(f"{self}: already running")
        owner = _owner_of(self.run_dir)
        if owner is not None and owner != os.getpid():
            raise EngineError(f"private engine {self.name!r} is in use by live process {owner}")
        # Whatever an earlier engine of this name left (same process, stop() never called).
        self._teardown()

        self.run_dir.mkdir(parents=True)
        self.owner_file.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.data_root.mkdir(parents=True)
        self.config_file.write_text(json.dumps({
            # 20.10 reads its identity key from /etc/docker/key.json whatever the data root: two engines
            # with one `docker info` ID would be confusing. (Config-file only: there is no flag.)
            "deprecated-key-path": str(self.state_dir / "key.json"),
        }, indent=2) + "\n")
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        if self.tcp_tls:
            self._setup_tcp_tls()
        self._launch("start", timeout)
        self.timings["start"] = time.monotonic() - t0

    def kill(self, timeout: float = 15) -> None:
        """Crash the engine: SIGKILL to dockerd only, then wait until it is gone.

        Nothing else is signalled. The kernel kills the managed containerd (parent-death signal set by
        dockerd); shims and containers survive, as in a real crash. Waits (bounded) for that containerd
        to be gone too, so that restart() cannot race with a dying one.
        """
        t0 = time.monotonic()
        pid = self.pid
        if pid is None:
            raise EngineError(f"{self}: kill() but dockerd is not running{self._log_tail()}")
        containerd = self.containerd_pid
        os.kill(pid, signal.SIGKILL)
        if not _wait_for(lambda: not _alive(pid), timeout):
            raise EngineError(f"dockerd {pid} still alive {timeout:.0f}s after SIGKILL")
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait(timeout=timeout)  # reap our child
        note = f"kill -9 dockerd {pid}"
        if containerd is not None:
            # Not an assertion: if a future dockerd let containerd live, restart() would reuse it.
            _wait_for(lambda: not _alive(containerd), min(timeout, 5))
            state = _proc_state(containerd)
            note += f"; containerd {containerd} {'gone' if state is None else 'state ' + state}"
            if state == "Z":
                # Orphans go to this VM's PID 1, which reaps them late. dockerd checks containerd's
                # pidfile with kill(pid, 0), which succeeds on a zombie: it would wait 15 s for that
                # dead containerd and give up. A prompt init would have reaped it; removing the stale
                # pidfile leaves restart() with exactly what it would then find.
                (self.exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)
                note += " (zombie: stale pidfile removed)"
        self._log_note(note)
        self.timings["kill"] = time.monotonic() - t0

    def restart(self, timeout: float = 60) -> None:
        """Start dockerd again on the same data root (after kill()) and wait until it answers."""
        t0 = time.monotonic()
        if self.pid is not None:
            raise EngineError(f"{self}: restart() while dockerd still runs (kill() or stop() it first)")
        if not self.data_root.is_dir() or not self.netns_path.exists():
            raise EngineError(f"{self}: restart() of an engine that was never started or was stopped")
        self._launch("restart", timeout)
        self.timings["restart"] = time.monotonic() - t0

    def stop(self, timeout: float = 30) -> None:
        """Remove its containers, shut dockerd down, then make sure nothing of this engine is left.

        Idempotent and safe after kill() (or a failed start): anything still there is SIGKILLed,
        unmounted and removed: processes, mounts, cgroups, netns, run dir and data root. Keeps the log.
        """
        t0 = time.monotonic()
        pid = self.pid
        was_there = pid is not None or self.run_dir.exists()
        if pid is not None:
            if self._ping():
                # Removing containers first makes the shutdown quick (no 10 s stop timeouts) and leaves
                # no shim behind. Best effort: the teardown below kills whatever this misses.
                try:
                    ids = self.docker("ps", "-aq", check=False, timeout=15).stdout.split()
                    if ids:
                        self.docker("rm", "-f", "-v", *ids, check=False, timeout=timeout)
                except EngineError as exc:
                    self._log_note(f"stop: could not remove containers: {exc}")
            os.kill(pid, signal.SIGTERM)
            if not _wait_for(lambda: not _alive(pid), timeout / 2):
                self._log_note(f"dockerd {pid} ignored SIGTERM for {timeout / 2:.0f}s: SIGKILL")
                os.kill(pid, signal.SIGKILL)
                _wait_for(lambda: not _alive(pid), 5)
        self._teardown()
        if was_there:  # a no-op stop() (idempotent call) keeps the real one's timing
            self.timings["stop"] = time.monotonic() - t0

    def load_image(self, ref: str, timeout: float = 120) -> None:
        """Copy an image from the main engine: `docker save ref | docker -H url load`."""
        save = subprocess.Popen(["docker", "-H", MAIN_ENGINE_URL, "save", ref], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_docker_env())
        assert save.stdout is not None
        try:
            load = subprocess.run(["docker", "-H", self.url, "load", "-q"], stdin=save.stdout, check=False,
                                  capture_output=True, text=True, timeout=timeout, env=_docker_env())
        finally:
            save.stdout.close()  # a `save` still writing (load died early) now gets EPIPE instead of hanging
            try:
                _, save_err = save.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                save.kill()
                _, save_err = save.communicate()
        if save.returncode != 0 or load.returncode != 0:
            raise EngineError(f"could not copy {ref} to private engine {self.name!r}: "
                              f"save: {save_err.strip() or save.returncode}; "
                              f"load: {load.stderr.strip() or load.returncode}")

    def docker(self, *args: str, check: bool = True, timeout: float = 60,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine (text output; raises EngineError on failure if check)."""
        cmd = ["docker", "-H", self.url, *args]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False,
                                    env=_docker_env())
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"`{' '.join(cmd)}` took more than {timeout:.0f}s{self._log_tail()}") from exc
        if check and result.returncode != 0:
            raise EngineError(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}"
                              f"{self._log_tail()}")
        return result

    def env(self) -> dict[str, str]:
        """Environment variables that point LSL (and the docker CLI/SDK) at this engine."""
        return {"LSL_DOCKER_HOST": self.url, "DOCKER_HOST": self.url}

    def leftovers(self) -> list[str]:
        """What of this engine still exists besides its log (empty after stop())."""
        found = [f"process {pid}: {_cmdline(pid)}" for pid in sorted(self._engine_pids())]
        found += [f"mount {m}" for m in _mounts_under([self.run_dir, self.state_dir])]
        found += [f"cgroup {d}" for d in _cgroup_dirs(self.cgroup_parent)]
        found += [f"path {p}" for p in (self.netns_path, self.run_dir, self.state_dir) if p.exists()]
        if Path(f"/sys/class/net/{self.veth}").exists():
            found.append(f"link {self.veth}")
        return found

    # -- internals ---------------------------------------------------------------------------------

    def _launch(self, what: str, timeout: float) -> None:
        """Run dockerd in the engine's netns and wait (bounded) until its API answers."""
        with self.log_path.open("ab") as log:
            log.write(f"\n===== lsl private engine {self.name}: {what} at {time.strftime('%F %T')} =====\n".encode())
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                ["nsenter", f"--net={self.netns_path}", "dockerd",
                 "--config-file", str(self.config_file),
                 "--data-root", str(self.data_root),
                 "--exec-root", str(self.exec_root),
                 "--pidfile", str(self.pidfile),
                 "-H", self.url,
                 *self._tcp_listen_args(),
                 "--cgroup-parent", self.cgroup_parent],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C aimed at pytest must not reach dockerd (the finalizer stops it).
                start_new_session=True)
        proc = self._proc
        deadline = time.monotonic() + timeout
        while not self._ping():
            if proc.poll() is not None:
                raise EngineError(f"private engine {self.name!r}: dockerd exited ({proc.returncode}) "
                                  f"during {what}{self._log_tail()}")
            if time.monotonic() >= deadline:
                raise EngineError(f"private engine {self.name!r}: no answer on {self.sock} "
                                  f"{timeout:.0f}s after {what}{self._log_tail()}")
            time.sleep(0.05)
        # nsenter execs dockerd (it forks only to enter a pid namespace): one pid, one process to kill.
        if _read_pid(self.pidfile) != proc.pid:
            raise EngineError(f"{self.pidfile} says {_read_pid(self.pidfile)}, dockerd is {proc.pid}")
        self.docker("info", "--format", "{{.ID}}", timeout=max(5.0, deadline - time.monotonic()))

    def _setup_tcp_tls(self) -> None:
        """The veth pair, its /30 and the certificates (after the netns exists, before dockerd starts)."""
        index = _free_subnet_index(self.name)
        self.host_ip, self.engine_ip = f"{SUBNET_PREFIX}.{index}.1", f"{SUBNET_PREFIX}.{index}.2"
        # Created with its peer already in the engine's netns: no moment with both ends on the host.
        _run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", ENGINE_IFACE, "netns", self.netns])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth])
        _run(["ip", "link", "set", self.veth, "up"])
        _run(["ip", "-n", self.netns, "addr", "add", f"{self.engine_ip}/30", "dev", ENGINE_IFACE])
        _run(["ip", "-n", self.netns, "link", "set", ENGINE_IFACE, "up"])
        self.tls_dir.mkdir(parents=True)
        ca = make_ca(self.tls_dir, f"lsl test CA for engine {self.name}")
        self._server_cert = issue_cert(ca, self.tls_dir, "server", self.engine_ip, server_ip=self.engine_ip)
        self.tls = issue_cert(ca, self.tls_dir, "client", "lsl")

    def _tcp_listen_args(self) -> list[str]:
        if not self.tcp_tls:
            return []
        server = self._server_cert
        assert self.engine_ip is not None and server is not None
        return ["-H", f"tcp://{self.engine_ip}:{TLS_PORT}", "--tlsverify", "--tlscacert", str(server.ca),
                "--tlscert", str(server.cert), "--tlskey", str(server.key)]

    def _ping(self) -> bool:
        """GET /_ping on the socket: cheaper than a docker CLI run per poll."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(self.sock)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] and reply.endswith(b"OK")

    def _engine_pids(self) -> set[int]:
        """Every live process of this engine: dockerd, containerd, shims, docker-proxy, containers.

        Three nets, because after a kill the pidfiles lie: processes in the engine's netns (dockerd,
        containerd, shims and host-network containers), processes whose command line names the run dir
        (shims carry `-address <exec-root>/containerd/containerd.sock`), and the containers' cgroups.
        """
        me = {os.getpid()}
        try:
            ns = os.stat(self.netns_path)
            netns_id: tuple[int, int] | None = (ns.st_dev, ns.st_ino)
        except OSError:
            netns_id = None
        marker = str(self.run_dir) + "/"
        pids: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in me:
                continue
            pid = int(entry)
            if netns_id is not None:
                try:
                    st = os.stat(f"/proc/{pid}/ns/net")
                    if (st.st_dev, st.st_ino) == netns_id:
                        pids.add(pid)
                        continue
                except OSError:
                    continue
            cmdline = _cmdline(pid)
            # Not the docker CLI (`docker -H unix:///run/lsl-engine-...`): a client, not the engine.
            if marker in cmdline and not cmdline.startswith("docker "):
                pids.add(pid)
        pids |= _cgroup_pids(self.cgroup_parent)
        return {pid for pid in pids - me if _alive(pid)}

    def _teardown(self) -> None:
        """SIGKILL whatever is left; unmount; remove shim sockets, cgroups, netns, run dir and data root."""
        if not _wait_for(lambda: self._kill_all() == 0, 15, interval=0.1):
            raise EngineError(f"private engine {self.name!r}: processes survive SIGKILL: "
                              f"{[f'{p} {_cmdline(p)}' for p in self._engine_pids()]}")
        if self._proc is not None:
            self._proc.poll()  # reap our dockerd child if it was killed just now
            self._proc = None
        if self._sshd is not None:
            self._sshd.poll()
            self._sshd = None
        # A SIGKILLed shim leaves its socket in /run/containerd/s (shared by every containerd on the
        # host, names hashed from containerd address + namespace + id); each task dir says which is its.
        for address in self.exec_root.glob("containerd/daemon/io.containerd.runtime.v2.task/*/*/address"):
            try:
                shim_sock = Path(address.read_text().strip().removeprefix("unix://"))
            except OSError:
                continue
            if shim_sock.parent == Path("/run/containerd/s"):
                shim_sock.unlink(missing_ok=True)
        roots = [self.run_dir, self.state_dir]
        for _ in range(5):  # nested mounts: deepest first; MNT_DETACH copes with busy ones
            mounts = _mounts_under(roots)
            if not mounts:
                break
            for point in sorted(mounts, key=lambda p: p.count("/"), reverse=True):
                _umount_detach(point)
        for top in _cgroup_dirs(self.cgroup_parent):
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
                # A cgroup whose last task just died may be busy for a moment.
                _wait_for(functools.partial(_try_rmdir, dirpath), 5, interval=0.1)
        if self.netns_path.exists():
            _run(["ip", "netns", "del", self.netns], check=False)
        # Deleting the netns destroys the veth pair once the namespace is gone; not waiting for that.
        if Path(f"/sys/class/net/{self.veth}").exists():
            _run(["ip", "link", "del", self.veth], check=False)
        self.host_ip = self.engine_ip = None
        self.tls = self.ssh = None
        left = _mounts_under(roots)
        if left:  # never rm -rf through a mount
            raise EngineError(f"private engine {self.name!r}: still mounted: {left}")
        for path in (self.state_dir, self.run_dir):
            shutil.rmtree(path, ignore_errors=True)
        if self.netns_path.exists():
            raise EngineError(f"private engine {self.name!r}: could not delete netns {self.netns}")

    def _kill_all(self) -> int:
        """SIGKILL every live process of the engine; returns how many there were."""
        pids = self._engine_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def _log_note(self, text: str) -> None:
        with self.log_path.open("a") as log:
            log.write(f"===== lsl private engine {self.name}: {text} at {time.strftime('%F %T')} =====\n")

    def _log_tail(self) -> str:
        """The last lines dockerd wrote since the last (re)start, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                lines = log.read().decode(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(lines)


def private_engine(name: str, tcp_tls: bool = False) -> PrivateEngine:
    """A private engine named `name` (not started: call start()). `tcp_tls`: also on TCP with TLS."""
    return PrivateEngine(name, tcp_tls=tcp_tls)


# --- remote transports: addresses, certificates, sshd ------------------------------------------------


def _free_subnet_index(name: str) -> int:
    """A 10.213.<i>.0/30 no interface of the host uses, starting from one derived from the name (so
    engines started at once by parallel test runs rarely even try the same one)."""
    used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", _run(["ip", "-4", "-o", "addr", "show"]).stdout))
    start = zlib.crc32(name.encode()) % 256
    for step in range(256):
        index = (start + step) % 256
        if str(index) not in used:
            return index
    raise EngineError(f"every {SUBNET_PREFIX}.<i>.0/30 is in use on this host")


@dataclass(frozen=True)
class ClientCert:
    """PEM files for one side of a TLS connection: the CA it trusts, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class _Ca:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise EngineError("missing openssl: apt-get install openssl")
    _run(["openssl", *args])


def make_ca(directory: Path, common_name: str) -> _Ca:
    """A fresh self-signed CA (EC P-256, 2 days) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca-key.pem"
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={common_name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return _Ca(cert, key)


def issue_cert(ca: _Ca, directory: Path, stem: str, common_name: str, *, server_ip: str | None = None) -> ClientCert:
    """A certificate signed by `ca`: for a server at `server_ip` (its SAN), else for a client."""
    cert, key, csr, ext = (directory / f"{stem}.pem", directory / f"{stem}-key.pem", directory / f"{stem}.csr",
                           directory / f"{stem}.ext")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
    ext.write_text(f"subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n" if server_ip
                   else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    csr.unlink()
    key.chmod(0o600)
    return ClientCert(ca=ca.cert, cert=cert, key=key)


def foreign_client_cert(directory: Path) -> ClientCert:
    """A client certificate from a CA of its own, with that CA: what an engine must refuse."""
    ca = make_ca(directory, "lsl test CA nobody trusts")
    return issue_cert(ca, directory, "client", "lsl")


@dataclass(frozen=True)
class SshAccess:
    """How to reach a private engine over ssh, as docker's ssh transport does.

    `url` for LSL (`ssh://root@<ip>`); `bin_dir` holds an `ssh` that runs the system's with
    `config` (key, known_hosts, no agent, no prompt): put it first on PATH of whatever connects.
    """

    url: str
    bin_dir: Path
    config: Path
    key: Path
    known_hosts: Path

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}


def _start_sshd(engine: PrivateEngine, timeout: float) -> SshAccess:
    directory = engine.ssh_dir
    directory.mkdir(mode=0o700, parents=True)
    host_key, client_key = directory / "host_ed25519", directory / "client_ed25519"
    for key in (host_key, client_key):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lsl engine {engine.name}", "-f", str(key)])
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    known_hosts = directory / "known_hosts"
    key_type, key_blob = Path(f"{host_key}.pub").read_text().split()[:2]
    known_hosts.write_text(f"{engine.engine_ip} {key_type} {key_blob}\n")
    sshd_config = directory / "sshd_config"
    sshd_config.write_text("\n".join([
        f"ListenAddress {engine.engine_ip}:{SSH_PORT}",
        f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # What makes `ssh host docker system dial-stdio` reach this engine and not the main one.
        f"SetEnv DOCKER_HOST={engine.url}",
        # docker's ssh transport opens one ssh connection per HTTP connection, several at once.
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "LogLevel VERBOSE",
        "",
    ]))
    client_config = directory / "ssh_config"
    client_config.write_text("\n".join([
        f"Host {engine.engine_ip}",
        "  User root",
        f"  IdentityFile {client_key}",
        "  IdentitiesOnly yes",
        "  IdentityAgent none",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 10",
        "  ServerAliveInterval 5",
        "  ServerAliveCountMax 3",
        "  ControlMaster no",
        "  LogLevel ERROR",
        "",
    ]))
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {client_config} \"$@\"\n")
    wrapper.chmod(0o755)
    # sshd's privilege-separation directory (Debian's packaging makes it at boot; harmless to make).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    check = _run(["/usr/sbin/sshd", "-t", "-f", str(sshd_config)], check=False)
    if check.returncode != 0:
        raise EngineError(f"sshd -t -f {sshd_config}: {check.stderr.strip()}")
    with engine.log_path.open("ab") as log:
        log.write(f"===== lsl private engine {engine.name}: sshd at {time.strftime('%F %T')} =====\n".encode())
        # -D -e: in the foreground, logging to the engine's log. In the engine's netns, so the
        # teardown (which kills every process there) ends it and its sessions.
        sshd = subprocess.Popen(["nsenter", f"--net={engine.netns_path}", "/usr/sbin/sshd", "-D", "-e",
                                 "-f", str(sshd_config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    access = SshAccess(url=f"ssh://root@{engine.engine_ip}", bin_dir=bin_dir, config=client_config, key=client_key,
                       known_hosts=known_hosts)
    probe = ["ssh", "-F", str(client_config), str(engine.engine_ip), "docker", "version", "--format",
             "{{.Server.Version}}"]

    def answers() -> bool:
        if sshd.poll() is not None:
            raise EngineError(f"sshd for engine {engine.name!r} exited ({sshd.returncode}){engine._log_tail()}")
        return _run(probe, check=False, timeout=15).returncode == 0

    if not _wait_for(answers, timeout, interval=0.2):
        raise EngineError(f"sshd for engine {engine.name!r}: `{' '.join(probe)}` did not work within {timeout:.0f}s: "
                          f"{_run(probe, check=False, timeout=15).stderr.strip()}")
    engine._sshd = sshd  # reaped in _teardown (killed there with everything in the netns)
    return access


# --- helpers --------------------------------------------------------------------------------------


def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise EngineError(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}")
    return result


def _try_rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        raise EngineError("a private Docker engine needs root (netns, mounts, dockerd)")
    missing = [tool for tool in ("dockerd", "docker", "ip", "nsenter") if shutil.which(tool) is None]
    if missing:
        hints = {"ip": "iproute2", "nsenter": "util-linux", "dockerd": "docker.io", "docker": "docker.io"}
        raise EngineError(f"missing {missing}: apt-get install {' '.join(sorted({hints[m] for m in missing}))}")


def _owner_of(run_dir: Path) -> int | None:
    """The live process that started the engine in `run_dir`, if any (pid + start time: no pid reuse)."""
    try:
        pid_text, started = (run_dir / "owner").read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _start_time(pid) == started else None


def reap_stale_engines() -> list[str]:
    """Tear down private engines whose owning process is gone (a test run that died hard).

    An engine is found by any of its traces: run dir, data dir or netns. One whose run dir is younger
    than a minute but has no owner yet is being created by someone else: left alone.
    """
    names: set[str] = set()
    names |= {p.name[len(Path(RUN_PREFIX).name):] for p in Path(RUN_PREFIX).parent.glob(Path(RUN_PREFIX).name + "*")}
    if STATE_BASE.is_dir():
        names |= {p.name for p in STATE_BASE.iterdir()}
    if Path("/run/netns").is_dir():
        names |= {p.name[len(NETNS_PREFIX):] for p in Path("/run/netns").glob(NETNS_PREFIX + "*")}
    reaped = []
    for name in sorted(n for n in names if _NAME_RE.match(n)):
        engine = PrivateEngine(name)
        if _owner_of(engine.run_dir) is not None:
            continue
        try:
            if not engine.owner_file.exists() and time.time() - engine.run_dir.stat().st_mtime < 60:
                continue
        except FileNotFoundError:
            pass
        engine._teardown()
        reaped.append(name)
    return reaped


def main_engine_problems() -> list[str]:
    """Why the main engine is not healthy (empty list: it is). Fault tests check it after each step."""
    problems = []
    env = _docker_env()
    info = subprocess.run(["docker", "-H", MAIN_ENGINE_URL, "info", "--format", "{{.ID}}"],
                          capture_output=True, text=True, timeout=30, env=env, check=False)
    if info.returncode != 0:
        problems.append(f"main engine: docker info: {info.stderr.strip()}")
    run = subprocess.run(["docker", "-H", MAIN_ENGINE_URL, "run", "--rm", "--init", TEST_IMAGE, "true"],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    if run.returncode != 0:
        problems.append(f"main engine: docker run {TEST_IMAGE} true: {run.stderr.strip()}")
    # The one thing a stray second dockerd on the host netns breaks first.
    if not Path("/sys/class/net/docker0").exists():
        problems.append("main engine: the host's docker0 bridge is gone")
    return problems


# --- pytest ---------------------------------------------------------------------------------------


@pytest.fixture(name="private_engine")
def private_engine_fixture() -> Iterator[PrivateEngine]:
    """A started private engine with lsl-test/busybox:latest loaded; stopped (nothing left) at teardown.

    Named per test process, so parallel test runs do not collide. Use it by importing
    `private_engine_fixture` into the test module (conftest.py is not the place for it: starting an
    engine is a root-only, fault-test-only affair).
    """
    engine = PrivateEngine(f"t{os.getpid()}")
    try:
        engine.start()
        engine.load_image(TEST_IMAGE)
        yield engine
    finally:
        engine.stop()


if __name__ == "__main__":
    # `python -m tests.engines reap`: clean up after a test run that was killed.
    if sys.argv[1:] != ["reap"]:
        sys.exit("usage: python -m tests.engines reap")
    print("\n".join(f"reaped {name}" for name in reap_stale_engines()) or "nothing to reap")
