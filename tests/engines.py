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
from collections.abc import Callable, Iterator
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

    def __init__(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"engine name must match {_NAME_RE.pattern}: {name!r}")
        self.name = name
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
        # Seconds the last start/kill/restart/stop took (tests report them; see test_private_engine).
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
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


def private_engine(name: str) -> PrivateEngine:
    """A private engine named `name` (not started: call start())."""
    return PrivateEngine(name)


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
