"""`lsl cp`, `lsl export` / `create --from`, `lsl volume` and `lsl quota`: the real `lsl` against a live daphne
and the real engine (same style and helpers as tests/test_cli.py)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import Cli, alice, assert_error, create  # noqa: F401 - `alice` is a fixture

pytestmark = [pytest.mark.usefixtures("engine", "catalog"), pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cp_round_trips_a_large_file_and_a_directory_tree(alice: Cli, tmp_path: Path) -> None:
    create(alice, "files")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(50 * 1024 * 1024))
    big.chmod(0o640)
    assert "files:/workspace/big.bin" in alice.ok("cp", str(big), "files:/workspace/big.bin", timeout=300).stderr
    listing = alice.ok("exec", "files", "--", "ls", "-l", "/workspace/big.bin").stdout
    assert listing.startswith("-rw-r-----") and str(50 * 1024 * 1024) in listing, listing

    back = tmp_path / "back.bin"
    alice.ok("cp", "files:/workspace/big.bin", str(back), timeout=300)
    assert back.read_bytes() == big.read_bytes()
    assert mode_of(back) == 0o640

    # Into a local directory: the remote base name is kept.
    into = tmp_path / "into"
    into.mkdir()
    alice.ok("cp", "files:/workspace/big.bin", str(into), timeout=300)
    assert (into / "big.bin").stat().st_size == big.stat().st_size

    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "sub" / "deep").mkdir(parents=True)
    files = {"a.txt": (b"hello\n", 0o644), "bin/run.sh": (b"#!/bin/sh\necho run\n", 0o755),
             "sub/deep/secret": (b"s3cret", 0o600), "sub/empty": (b"", 0o640), "shared.txt": (b"group-writable\n", 0o664)}
    for name, (content, mode) in files.items():
        (tree / name).write_bytes(content)
        (tree / name).chmod(mode)
    alice.ok("cp", "-r", str(tree), "files:/workspace/")
    assert alice.ok("exec", "files", "--", "/workspace/tree/bin/run.sh").stdout == "run\n"

    out = tmp_path / "out"
    alice.ok("cp", "-r", "files:/workspace/tree", str(out))
    for name, (content, mode) in files.items():
        copied = out / "tree" / name
        assert copied.read_bytes() == content, name
        assert mode_of(copied) == mode, (name, oct(mode_of(copied)))

    assert_error(alice("cp", str(tree), "files:/workspace/"), 2, "is a directory (use -r")
    assert_error(alice("cp", "files:/workspace/tree", str(tmp_path / "x")), 2, "is a directory (use -r")
    assert_error(alice("cp", str(big), str(back)), 2, "exactly one of SRC and DST")


def test_cp_refuses_dotdot_with_the_servers_message(alice: Cli, tmp_path: Path) -> None:
    create(alice, "dotdot")
    small = tmp_path / "small.txt"
    small.write_text("x")
    result = alice("cp", str(small), "dotdot:/workspace/../etc/evil")
    assert_error(result, 2, "'..' is not allowed")
    result = alice("cp", "dotdot:/workspace/../etc/passwd", str(tmp_path / "p"))
    assert_error(result, 2, "'..' is not allowed")
    assert not (tmp_path / "p").exists()
    assert_error(alice("cp", str(small), "nope:/workspace/x"), 4, "no environment named 'nope'")


def test_export_then_create_from_reproduces_the_environment(alice: Cli, tmp_path: Path) -> None:
    original = create(alice, "orig", "--cpus", "0.3", "--memory", "128m", "--network", "none")
    text = alice.ok("export", "orig").stdout
    assert "template: busybox" in text and "name: orig" in text

    path = tmp_path / "orig.lsl.yaml"
    alice.ok("export", "orig", "-o", str(path))
    assert "template: busybox" in path.read_text()
    copy = json.loads(alice.ok("create", "--from", str(path), "--name", "copy", "--json").stdout)
    assert copy["name"] == "copy" and copy["status"] == "running", copy
    for key in ("template", "cpus", "memory_mb", "network_mode"):
        assert copy[key] == original[key], key
    assert_error(alice("create", "--from", str(path), "--template", "busybox"), 2, "cannot be combined with --from")


def test_create_from_a_bad_file_lists_its_problems(alice: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nenvironment:\n  name: broken\n  template: busybox\n  resources:\n    cpus: lots\n")
    result = alice("create", "--from", str(bad))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert re.search(r"^bad\.yaml:\d+:\d+: environment\.resources\.cpus: ", result.stderr, re.M), result.stderr
    assert "Traceback" not in result.stderr
    assert "lsl: error: bad.yaml: 1 problem" in result.stderr
    assert alice.json("list") == []


def test_volumes_and_quotas(alice: Cli, people: Any) -> None:
    from accounts.models import Profile
    from environments.models import TeamQuota

    created = alice.json("volume", "create", "cache", "--team", "platform")
    assert (created["name"], created["team"], created["mount"]) == ("cache", "platform", "volume:cache:/mnt/cache")
    assert [v["name"] for v in alice.json("volume", "ls")] == ["cache"]
    listing = alice.ok("volume", "ls").stdout
    assert re.search(r"^cache\s+platform\s+alice\s+volume:cache:/mnt/cache", listing, re.M), listing
    assert_error(alice("volume", "create", "x", "--team", "no-such"), 2, "team")
    alice.ok("volume", "rm", "cache")
    assert alice.json("volume", "ls") == []
    assert_error(alice("volume", "rm", "cache"), 4, "no team volume named 'cache'")

    profile = Profile.for_user(people.owner)
    profile.quota_environments, profile.quota_cpus, profile.quota_memory_mb = 3, 2.0, 1024
    profile.save()
    TeamQuota.objects.create(team=people.team, environments=5, cpus=4, memory_mb=2048)
    answer = alice.json("quota")
    assert answer["user"]["limits"] == {"environments": 3, "cpus": 2.0, "memory_mb": 1024, "disk_mb": 0,
                                        "teams": 10, "team_volumes": 20}
    assert answer["teams"][0]["team"] == "platform" and answer["teams"][0]["limits"]["environments"] == 5
    shown = alice.ok("quota").stdout
    assert re.search(r"^user\s+alice\s+0 / 3\s+0 / 2\s+0m / 1024m\s+0m / unlimited\s+1 / 10\s+0 / 20\s*$", shown, re.M), shown
    assert re.search(r"^team\s+platform\s+0 / 5\s+0 / 4\s+0m / 2048m", shown, re.M), shown
