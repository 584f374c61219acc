"""Day one in the default catalog's Debian template, offline: the test image stands in for debian:bookworm.

The template is taken from catalog/default.yaml as shipped (sudo, its first-start setup step) with only
the image swapped, so a change to the shipped template is what this test exercises.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from django.contrib.auth import get_user_model

from accounts.models import Profile
from environments import catalog, runtime
from environments.models import SetupStatus
from tests.conftest import REPO, make_token
from tests.wsclient import TermClient

pytestmark = [pytest.mark.django_db(transaction=True, serialized_rollback=True), pytest.mark.usefixtures("engine", "catalog")]

TEST_IMAGE = "lsl-test/debian:bookworm"


@pytest.fixture()
def default_debian(tmp_path: Path) -> str:
    """The shipped `debian` template, renamed and pointed at the offline image, applied to the catalog."""
    shipped = yaml.safe_load((REPO / "catalog" / "default.yaml").read_text())
    template = next(t for t in shipped["templates"] if t["slug"] == "debian")
    assert template.get("sudo") is True and template.get("setup"), "the default Debian template lost sudo or its setup"
    template = {**template, "slug": "day-one-debian", "image": TEST_IMAGE}
    path = tmp_path / "day-one.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "templates": [template]}))
    result = catalog.apply_catalog(path)
    assert not result.problems, result.problems
    return "day-one-debian"


def run(env: Any, command: str) -> tuple[int, str]:
    from environments import services

    user, user_env = services.shell_identity(env)
    result = runtime.local().exec_run(env.container_id, ["/bin/bash", "-lc", command], user=user, environment=user_env)
    return result.exit_code, result.output.decode(errors="replace").strip()


def test_the_owner_can_work_in_the_default_debian_template(default_debian: str, make_env: Any,
                                                          live_server_proc: Any) -> None:
    # "admin" is the account `make run` creates: its shell user is admin, not u10001.
    admin = get_user_model().objects.create_user("admin", "admin@example.com", "password-admin", is_staff=True)
    env = make_env(admin, template=default_debian)
    assert env.status == "running", env.last_error
    deadline = time.monotonic() + 120
    while env.setup_status in (SetupStatus.PENDING, SetupStatus.RUNNING) and time.monotonic() < deadline:
        time.sleep(0.2)
        env.refresh_from_db()
    assert env.setup_status == SetupStatus.SUCCEEDED, env.setup_log

    assert Profile.for_user(admin).shell_name == "admin"
    assert run(env, "whoami") == (0, "admin")
    assert run(env, "sudo -n true; echo sudo=$?")[1].endswith("sudo=0")
    assert run(env, "sudo -n apt-get --version >/dev/null && echo root-tools-ok")[1].endswith("root-tools-ok")
    assert run(env, "locale charmap")[1].endswith("UTF-8")
    for tool in ("ps", "less", "vi"):
        code, out = run(env, f"command -v {tool}")
        assert code == 0, f"{tool} missing: {out}"
    assert run(env, "test -s /etc/ssl/certs/ca-certificates.crt")[0] == 0, "no CA certificates"

    # A typed ü goes through the shared terminal and comes back as ü, not as the C locale's \303\274.
    token = make_token(admin)
    session = requests.post(f"{live_server_proc.url}/api/v1/environments/{env.id}/sessions/",
                            headers={"Authorization": f"Token {token}"}, json={}, timeout=30)
    assert session.status_code == 201, session.text
    term = TermClient(session.json()["ws_url"], token=token)
    try:
        term.wait_event("snapshot")
        term.send_input("echo \"[$(printf 'ü' | od -An -tx1 | tr -d ' ')]\" ü-typed\r")
        term.wait_output(b"[c3bc]")
        term.wait_output("ü-typed".encode())
        assert b"\\303\\274" not in bytes(term.output)
    finally:
        term.close()
