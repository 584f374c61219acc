"""Nodes reached over the network (issue 15): tcp:// with TLS client certificates, and ssh://.

tests/test_nodes.py reaches its private engines through their unix sockets. Here one private engine
(tests/engines.py, `tcp_tls=True`) also listens on tcp://10.213.<i>.2:2376 in docker's --tlsverify
mode, on a veth pair of its own, and runs an sshd in its network namespace whose sessions talk to it:
the two ways LSL reaches an engine on another machine. Everything an environment needs from its
engine goes through that transport: create, exec, file upload (stdin of an exec) and download, and
terminal sessions (a hijacked TTY exec relayed by the web process).

The ssh client is the system's (docker-py's use_ssh_client): it runs `ssh root@<ip> docker system
dial-stdio`. OpenSSH reads ~/.ssh of the password database's home, not $HOME, so LSL's processes get
the engine's `ssh` wrapper (`ssh -F <its config>`) first on PATH, which stands for a deployment's
~/.ssh/config of the LSL user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO
from tests.engines import TEST_IMAGE, PrivateEngine, foreign_client_cert, private_engine
from tests.stack import Stack
from tests.test_nodes import create, exec_output
from tests.wsclient import TermClient

# Quick node checks, so the worker's health check runs over the transport many times during a test.
FAST_CHECKS = {"LSL_NODE_CHECK_INTERVAL": "0.5", "LSL_NODE_CHECK_TIMEOUT": "5", "LSL_NODE_FAILURES": "3"}


@pytest.fixture(scope="module")
def remote() -> Iterator[PrivateEngine]:
    """One engine for the module (unix socket, TCP+TLS and sshd): starting one costs seconds."""
    engine = private_engine(f"tr{os.getpid()}", tcp_tls=True)
    try:
        engine.start()
        engine.load_image(TEST_IMAGE)
        engine.start_sshd()
        yield engine
    finally:
        engine.stop()
        assert engine.leftovers() == [], engine.leftovers()


def lsl_node(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", "lsl_node", *args], cwd=REPO, env={**os.environ, **stack.env},
                          capture_output=True, text=True, timeout=120, check=False)


def node_names(stack: Stack) -> list[str]:
    listing = lsl_node(stack, "list")
    assert listing.returncode == 0, listing.stderr
    return [line.split()[0] for line in listing.stdout.splitlines()[1:] if line and not line.startswith(" ")]


def exercise_environment(stack: Stack, engine: PrivateEngine, node: str) -> None:
    """Create an environment on `node` (the only active one) and use everything that reaches its engine."""
    env = create(stack, f"on-{node}")
    assert env["node"] == node, env
    listed = engine.docker("ps", "-q", "--no-trunc").stdout.split()
    assert env["container_id"] in listed, "the container is on the private engine"

    # exec: a streamed exec (chunked output over the transport) and its exit code.
    assert exec_output(stack, env["id"], ["sh", "-c", "echo via-$((6*7)); exit 3"]) == (3, b"via-42\n")

    # files: an upload is an exec fed on its stdin (a hijacked, bidirectional stream), a download a
    # streamed exec's stdout. 3 MiB: many TLS records / ssh packets each way.
    blob = os.urandom(3 * 2**20)
    url = f"environments/{env['id']}/files/"
    assert stack.web is not None
    put = requests.put(f"{stack.web.url}/api/v1/{url}", params={"path": "/workspace/blob.bin"}, data=blob,
                       headers={**stack.headers, "Content-Type": "application/octet-stream"}, timeout=120)
    assert put.status_code == 201, put.text
    assert put.json()["bytes"] == len(blob)
    got = stack.api("GET", url, params={"path": "/workspace/blob.bin"}, timeout=120)
    assert got.status_code == 200, got.text
    assert got.content == blob

    # A terminal session: the keeper is reached through a TTY exec whose socket the web process
    # relays asynchronously.
    assert stack.web is not None
    session = stack.api("POST", f"environments/{env['id']}/sessions/", json={})
    assert session.status_code in (200, 201), session.text
    client = TermClient(session.json()["ws_url"], token=stack.token)
    try:
        client.wait_event("snapshot")
        client.send_input("echo typed-$((7*7))\r")
        client.wait_output(b"typed-49")
        # Enough output to fill several reads of the relay at once.
        client.send_input("seq 1 3000; echo done-$((8*8))\r")
        client.wait_output(b"done-64")
    finally:
        client.close()


@pytest.mark.own_database
def test_a_tcp_tls_node_runs_environments_exec_files_and_terminals(remote: PrivateEngine, redis_url: str,
                                                                    tmp_path: Path) -> None:
    assert remote.tls is not None
    stack = Stack(tmp_path / "lsl", {"LSL_REDIS_URL": redis_url, **FAST_CHECKS}).start()
    try:
        added = lsl_node(stack, "add", "tls", remote.tcp_url, "--tls-ca", str(remote.tls.ca), "--tls-cert",
                         str(remote.tls.cert), "--tls-key", str(remote.tls.key), "--cpus", "4")
        assert added.returncode == 0, added.stderr
        assert f"added node tls: {remote.tcp_url}" in added.stdout, added.stdout
        assert lsl_node(stack, "drain", "local").returncode == 0
        exercise_environment(stack, remote, "tls")
        listing = lsl_node(stack, "list").stdout
        assert "tls" in listing and remote.tcp_url in listing and "unavailable" not in listing, listing
    finally:
        stack.stop()


@pytest.mark.own_database
def test_tcp_nodes_without_the_right_certificates_are_refused(remote: PrivateEngine, tmp_path: Path) -> None:
    """Each refusal names the reason, exits non-zero and writes nothing."""
    assert remote.tls is not None
    stack = Stack(tmp_path / "lsl")
    foreign = foreign_client_cert(tmp_path / "foreign")
    tcp, ca, cert, key = remote.tcp_url, str(remote.tls.ca), str(remote.tls.cert), str(remote.tls.key)
    cases: list[tuple[str, list[str], str]] = [
        # A client certificate from a CA the remote does not trust: the remote refuses the handshake.
        ("wrong-cert", ["--tls-ca", ca, "--tls-cert", str(foreign.cert), "--tls-key", str(foreign.key)], "TLS handshake failed"),
        # The right client certificate, but the remote's certificate checked against another CA.
        ("wrong-ca", ["--tls-ca", str(foreign.ca), "--tls-cert", cert, "--tls-key", key], "certificate verify failed"),
        # A certificate without its key, and certificate files that are not there.
        ("no-key", ["--tls-ca", ca, "--tls-cert", cert], "needs its key"),
        ("missing", ["--tls-ca", ca, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", key], "no such file"),
        # No certificates at all (`plain` tcp://): never registered, even though something listens.
        ("plain", [], "TLS client certificates"),
        # A client certificate but no CA: the remote's identity would go unchecked.
        ("no-ca", ["--tls-cert", cert, "--tls-key", key], "tls_ca"),
    ]
    for name, options, reason in cases:
        refused = lsl_node(stack, "add", name, tcp, *options)
        assert refused.returncode != 0, f"{name}: {refused.stdout}"
        assert reason in refused.stderr, f"{name}: {refused.stderr}"
        assert "Traceback" not in refused.stderr, f"{name}: {refused.stderr}"
        print(f"{name}: {refused.stderr.strip()}")
    # The remote's plain-HTTP port does not exist: a plain tcp:// on 2375 is refused as unreachable.
    assert node_names(stack) == ["local"]
    # And the right certificates are accepted by the same command (the refusals were about them).
    added = lsl_node(stack, "add", "right", tcp, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)
    assert added.returncode == 0, added.stderr
    assert node_names(stack) == ["local", "right"]


@pytest.mark.own_database
def test_an_ssh_node_runs_environments_exec_files_and_terminals(remote: PrivateEngine, redis_url: str,
                                                                 tmp_path: Path) -> None:
    assert remote.ssh is not None
    stack = Stack(tmp_path / "lsl", {"LSL_REDIS_URL": redis_url, **FAST_CHECKS, **remote.ssh.env()}).start()
    try:
        # Without the key and known_hosts entry (the plain system ssh): refused, nothing written.
        no_key = subprocess.run([sys.executable, "manage.py", "lsl_node", "add", "nokey", remote.ssh.url], cwd=REPO,
                                env={**os.environ, **{k: v for k, v in stack.env.items() if k != "PATH"}},
                                capture_output=True, text=True, timeout=120, check=False,
                                start_new_session=True)  # no terminal: ssh cannot ask about the host key
        assert no_key.returncode != 0 and "did not answer" in no_key.stderr, no_key
        print(f"ssh without its key: {no_key.stderr.strip()}")
        assert node_names(stack) == ["local"]

        added = lsl_node(stack, "add", "ssh", remote.ssh.url, "--cpus", "4")
        assert added.returncode == 0, added.stderr
        assert lsl_node(stack, "drain", "local").returncode == 0
        exercise_environment(stack, remote, "ssh")
        listing = lsl_node(stack, "list").stdout
        assert remote.ssh.url in listing and "unavailable" not in listing, listing
    finally:
        stack.stop()
