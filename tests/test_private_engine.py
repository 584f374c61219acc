"""The private engine of tests/engines.py: crash it with kill -9, restart it, and the main engine never notices.

Fault tests rely on this: a container outlives a dockerd crash, the restarted dockerd still knows it
(stopped, since live-restore is off), `docker start` revives it, and stop() leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.engines import (
    MAIN_ENGINE_URL,
    TEST_IMAGE,
    PrivateEngine,
    main_engine_problems,
    private_engine_fixture,  # noqa: F401  (registers the `private_engine` fixture)
)


def _inspect(engine: PrivateEngine, container: str, fmt: str) -> str:
    return engine.docker("inspect", "--format", fmt, container).stdout.strip()


def _main_dockerd_pid() -> str:
    """The main dockerd's pid (its default pidfile; empty if it was started with another one)."""
    pidfile = Path("/var/run/docker.pid")
    return pidfile.read_text().strip() if pidfile.exists() else ""


def _host_docker0() -> str:
    """The host's docker0 ifindex: a second dockerd on the host netns would delete and recreate it."""
    return Path("/sys/class/net/docker0/ifindex").read_text().strip()


def test_kill9_and_restart_keep_containers_and_spare_the_main_engine(private_engine: PrivateEngine) -> None:
    engine = private_engine
    docker0_before = _host_docker0()
    main_pid_before = _main_dockerd_pid()
    assert not main_engine_problems()

    # Its own engine: another identity, data root, and a bridge network that works (LSL's default).
    assert engine.docker("info", "--format", "{{.DockerRootDir}}").stdout.strip() == str(engine.data_root)
    main_id = subprocess.run(["docker", "-H", MAIN_ENGINE_URL, "info", "--format", "{{.ID}}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert engine.docker("info", "--format", "{{.ID}}").stdout != main_id
    ran = engine.docker("run", "--rm", "--init", "--network", "bridge", "--cap-drop", "ALL",  # as LSL runs them
                        "--security-opt", "no-new-privileges:true", "--pids-limit", "64", "--memory", "64m",
                        TEST_IMAGE, "sh", "-c", "echo ok; ip -4 -o addr show eth0")
    assert ran.stdout.startswith("ok\n") and "inet 172." in ran.stdout, ran.stdout

    cid = engine.docker("run", "-d", "--init", TEST_IMAGE, "tail", "-f", "/dev/null").stdout.strip()
    assert _inspect(engine, cid, "{{.State.Status}}") == "running"
    container_pid = int(_inspect(engine, cid, "{{.State.Pid}}"))

    # Crash: dockerd is gone, the socket is dead, but the container's process (under its shim) lives on.
    engine.kill()
    assert engine.pid is None
    assert engine.docker("ps", check=False, timeout=10).returncode != 0
    assert os.path.exists(f"/proc/{container_pid}")
    assert not main_engine_problems()

    # Restart on the same data root: the container is still known and can be started again.
    engine.restart()
    status = _inspect(engine, cid, "{{.State.Status}}")
    assert status in ("exited", "running"), status
    assert cid in engine.docker("ps", "-aq", "--no-trunc").stdout.split()
    engine.docker("start", cid)
    assert _inspect(engine, cid, "{{.State.Status}}") == "running"
    assert engine.docker("exec", cid, "echo", "alive").stdout.strip() == "alive"
    assert not main_engine_problems()

    # Everything of the private engine goes; the main engine and the host's bridge are untouched.
    engine.stop()
    assert engine.leftovers() == []
    engine.stop()  # idempotent (the fixture calls it once more)
    assert not main_engine_problems()
    assert _host_docker0() == docker0_before
    assert _main_dockerd_pid() == main_pid_before

    print(f"\nprivate engine timings (s): {', '.join(f'{k} {v:.2f}' for k, v in engine.timings.items())}; "
          f"after restart the container was {status}")
