"""Provisioning: the worker turns a `creating` row into a running container, in resumable steps.

image → volume → container → start → identity → setup → running. Each step looks at the engine
before it acts, so running the whole thing again after any interruption (a worker killed mid-way,
an engine restarted mid-way, a half-created container left behind) continues where it stopped.

Exactly one worker provisions a row at a time: it first takes the row's lease with a conditional
UPDATE (`claim`) and keeps renewing it; a worker that dies stops renewing, and once the lease has
run out `resume_stalled` (a periodic job) queues the row again. Setup hooks have a deadline stored
on the row, enforced by a periodic job in whichever worker is alive (`enforce_setup_deadlines`).

Runs only in the worker (manage.py lsl_worker), never in a web process.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Profile
from environments import identity, keeper, nodes, runtime, services
from environments.models import Environment, SetupStatus, Status

log = logging.getLogger(__name__)
T = TypeVar("T")


# --- the lease ---------------------------------------------------------------------------

def claim(env_id: Any, worker_id: str) -> bool:
    """Take the provisioning lease of a `creating` row (free, expired, or already ours)."""
    now = timezone.now()
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(lease_owner=worker_id)
    return bool(Environment.objects.filter(Q(pk=env_id, status=Status.CREATING) & free).update(
        lease_owner=worker_id, lease_until=now + timedelta(seconds=settings.LSL_PROVISION_LEASE)))


class LeaseKeeper:
    """Renews the lease from a thread while a (possibly hour-long) provisioning runs."""

    def __init__(self, env_id: Any, worker_id: str) -> None:
        self.env_id, self.worker_id = env_id, worker_id
        self.stop = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"lsl-lease-{str(env_id)[:8]}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        Environment.objects.filter(pk=self.env_id, lease_owner=self.worker_id).update(lease_owner="", lease_until=None)

    def _renew(self) -> None:
        from django.db import connection

        period = settings.LSL_PROVISION_LEASE / 3
        try:
            while not self.stop.wait(period):
                until = timezone.now() + timedelta(seconds=settings.LSL_PROVISION_LEASE)
                if not Environment.objects.filter(pk=self.env_id, lease_owner=self.worker_id).update(lease_until=until):
                    self.lost.set()  # deleted, or finished/failed by someone else: stop caring
                    return
        except Exception:
            log.exception("renewing the provisioning lease of %s failed", self.env_id)
        finally:
            connection.close()


# --- provisioning ----------------------------------------------------------------------------

class Abandoned(Exception):
    """The row went away or left `creating` while we worked on it (deleted, failed by a deadline)."""


def _progress(env: Environment, **progress: Any) -> None:
    if not Environment.objects.filter(pk=env.pk, status=Status.CREATING).update(progress=progress, updated_at=timezone.now()):
        raise Abandoned()
    env.progress = progress
    services.publish_environment(env)


def _with_engine_retry(what: str, fn: Callable[[], T]) -> T:
    """An engine that is down (restarting) is waited for, up to LSL_ENGINE_RETRY_FOR seconds."""
    deadline = time.monotonic() + settings.LSL_ENGINE_RETRY_FOR
    delay = 0.25
    while True:
        try:
            return fn()
        except runtime.EngineUnavailableError as exc:
            if time.monotonic() + delay > deadline:
                raise runtime.EngineUnavailableError(f"{what}: {exc}") from exc
            log.info("%s: engine unavailable, retrying in %.1fs", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def provision(env_id: Any, worker_id: str) -> None:
    """Run (or resume) provisioning of one environment if its lease can be had; otherwise do nothing."""
    if not claim(env_id, worker_id):
        return
    try:
        env = Environment.objects.select_related("template", "owner", "node").get(pk=env_id)
    except Environment.DoesNotExist:
        return
    with LeaseKeeper(env_id, worker_id):
        try:
            _provision(env)
        except Abandoned:
            log.info("provisioning of %s abandoned: the row changed under it", env_id)
        except runtime.EngineError as exc:
            log.warning("provisioning %s failed: %s", env_id, exc)
            _fail(env, str(exc))
        except Exception as exc:  # never leave a row `creating` because of a bug
            log.exception("provisioning %s crashed", env_id)
            _fail(env, f"internal error while provisioning: {exc.__class__.__name__}: {exc}")


def _fail(env: Environment, reason: str, **fields: Any) -> None:
    with transaction.atomic():
        updated = Environment.objects.filter(pk=env.pk, status=Status.CREATING).update(
            status=Status.ERROR, last_error=reason, progress={"phase": "failed", "error": reason},
            updated_at=timezone.now(), **fields)
        if updated:
            env.refresh_from_db()
            services.publish_environment(env)


def _provision(env: Environment) -> None:
    # A resumed provisioning keeps the pull summary an earlier attempt recorded.
    pulled: dict[str, Any] = {"pulled": env.progress["pulled"]} if env.progress.get("pulled") else {}
    engine = nodes.engine_of_node(env.node)  # errors, not the node's flag, decide here: retried, then failed
    # 1. image: pulled by the node, or, for a snapshot, copied from the node it was committed on
    if not _with_engine_retry("inspecting the image", lambda: engine.image_exists(env.image)):
        source = env.template.image_node
        if source is not None and source.pk != env.node_id and env.template.image == env.image:
            _progress(env, phase="copying", image=env.image, source_node=source.name)
            _with_engine_retry("copying the image from node " + source.name,
                               lambda: engine.load_image(nodes.engine_on(source).save_image(env.image)))
        else:
            _progress(env, phase="pulling", image=env.image, current=0, total=0)
            writer = _ProgressWriter(env)
            _with_engine_retry("pulling the image", lambda: engine.pull_image(env.image, writer))
            pulled = {"pulled": writer.summary}
    # 2-3. volume and container (create_container ensures the volume; an existing container is adopted)
    _progress(env, phase="creating", **pulled)
    spec = services.container_spec(env)
    state = _with_engine_retry("looking for the container", lambda: engine.find_environment_container(str(env.id), spec.name))
    if state is not None and state.status in ("dead", "removing"):
        _with_engine_retry("removing a broken container", lambda: engine.remove_container(state.container_id))
        state = None
    if state is None:
        _with_engine_retry("preparing the session keeper", lambda: keeper.ensure_volume(engine, env.image))
    container_id = state.container_id if state is not None else _with_engine_retry(
        "creating the container", lambda: engine.create_container(spec))
    if not Environment.objects.filter(pk=env.pk, status=Status.CREATING).update(container_id=container_id):
        raise Abandoned()
    env.container_id = container_id
    # 4. start
    if state is None or not state.running:
        keeper.clear_boot_identity(env.id)
        _with_engine_retry("starting the container", lambda: engine.start_container(container_id))
    # 5. the environment user
    _progress(env, phase="user", **pulled)
    _with_engine_retry("creating the environment user", lambda: ensure_identity(env))
    # 6. setup hooks, once
    env.refresh_from_db(fields=["setup_status", "status"])
    if env.status != Status.CREATING:
        raise Abandoned()
    if env.setup_status == SetupStatus.RUNNING:
        # Its worker died mid-hook. The hook may still be running in the container (Docker
        # cannot kill an exec) and may have half-done its work: say so rather than guess.
        _stop_quietly(engine, env.container_id)
        _fail(env, "setup was interrupted (the worker running it stopped); see the setup log. "
                   "Start the environment to use it as it is, or delete and recreate it",
              setup_status=SetupStatus.FAILED, stopped_at=timezone.now())
        return
    if env.setup_status == SetupStatus.PENDING:
        failure = run_setup(env)
        if failure is not None:
            log.info("setup of %s failed: %s", env.pk, failure)
            _stop_quietly(engine, env.container_id)
            _fail(env, failure, setup_status=SetupStatus.FAILED, stopped_at=timezone.now())
            return
    # 7. ready
    with transaction.atomic():
        now = timezone.now()
        setup_status = SetupStatus.SUCCEEDED if (env.template.setup or env.template.user_setup) else SetupStatus.NONE
        updated = Environment.objects.filter(pk=env.pk, status=Status.CREATING).update(
            status=Status.RUNNING, started_at=now, last_active_at=now, last_error="", setup_status=setup_status,
            progress={"phase": "ready", **pulled}, updated_at=now)
        if not updated:
            raise Abandoned()
        env.refresh_from_db()
        services.publish_environment(env)


def _stop_quietly(engine: runtime.Engine, container_id: str) -> None:
    try:
        engine.stop_container(container_id, timeout=2)
    except runtime.EngineError:
        pass


class _ProgressWriter:
    """Writes pull progress to the row at most every `interval` seconds (not a write per layer event),
    and remembers the last figures so the summary survives the pull."""

    def __init__(self, env: Environment, interval: float = 0.1) -> None:
        self.env, self.interval, self.last_write = env, interval, 0.0
        self.latest: dict[str, Any] = {}

    def __call__(self, progress: dict[str, Any]) -> None:
        self.latest = progress
        now = time.monotonic()
        if now - self.last_write < self.interval:
            return
        self.last_write = now
        _progress(self.env, **progress)

    @property
    def summary(self) -> dict[str, Any]:
        return {"image": self.env.image, "bytes": self.latest.get("total", 0), "layers": self.latest.get("layers", 0)}


def resume_stalled(enqueue: Callable[[str], None], *, grace: float = 5.0) -> list[str]:
    """Queue again every `creating` row nobody is working on: its lease ran out (a dead worker),
    or it never had one and was queued more than `grace` seconds ago (a lost task)."""
    now = timezone.now()
    stalled = Environment.objects.filter(status=Status.CREATING).filter(
        Q(lease_until__lt=now) | Q(lease_until__isnull=True, updated_at__lt=now - timedelta(seconds=grace)))
    ids = [str(pk) for pk in stalled.values_list("pk", flat=True)]
    for env_id in ids:
        log.info("provisioning of %s stalled (no live worker holds it): queued again", env_id)
        Environment.objects.filter(pk=env_id).update(updated_at=now)  # one re-queue per grace period
        enqueue(env_id)
    return ids


# --- the environment user ------------------------------------------------------------------

def ensure_identity(env: Environment, *, boot_wait: float = 5.0) -> dict[str, Any]:
    """Record the owner's user in the (running) container, creating it if needed.

    The container's own command creates it at start (identity.boot_command) and says so in its
    log: read that first. A container made before LSL did that, or one whose boot script failed,
    gets the script through an exec, which also reports what went wrong.
    """
    engine = nodes.engine_for(env)
    found = _identity_from_boot_file(env, boot_wait) or _identity_from_boot_log(engine, services.require_container(env), boot_wait)
    if found is not None:
        _share_team_volumes(engine, env)
        env.identity = found
        Environment.objects.filter(pk=env.pk).update(identity=found)
        return found
    profile = Profile.for_user(env.owner)
    command = identity.ensure_user_command(profile, shell=env.template.shell or "/bin/sh", sudo=env.template.allow_sudo,
                                           owned_dirs=[runtime.WORKSPACE_PATH])
    result = engine.exec_run(services.require_container(env), command, user="0:0")
    found = identity.parse_identity(result.output)
    if result.exit_code != 0 or found is None:
        detail = result.output.decode(errors="replace").strip()[-500:]
        raise runtime.EngineError(f"could not create the environment user {profile.shell_name!r} "
                                  f"(exit {result.exit_code}): {detail}")
    _share_team_volumes(engine, env)
    env.identity = found
    Environment.objects.filter(pk=env.pk).update(identity=found)
    return found


_NOT_RUNNING = runtime.ContainerState(container_id="", environment_id="", status="removed")


def _identity_from_boot_file(env: Environment, wait: float) -> dict[str, Any] | None:
    """The boot script's LSL-IDENTITY line from the file it leaves in the keeper's directory on this
    host (a local read every 2 ms; no engine call). None without that directory, or once the
    keeper's socket is up with no file (the script ran before it: it failed, or is an older one)."""
    path = keeper.boot_identity_file(env.id) if env.node.shares_host else None
    if path is None or not path.parent.is_dir():
        return None
    socket_path = path.parent / keeper.SOCKET_NAME
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            return identity.parse_identity(path.read_bytes())
        except FileNotFoundError:
            if socket_path.exists() and not path.exists():
                return None
        time.sleep(0.002)
    return None


def _identity_from_boot_log(engine: runtime.Engine, container_id: str, wait: float) -> dict[str, Any] | None:
    """The LSL-IDENTITY line the boot script printed, waiting up to `wait` seconds for it (it takes
    a few milliseconds after start); None if the log never shows one (then the caller execs)."""
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        # The last line wins: the log keeps earlier starts' lines, and the profile may have changed since.
        lines = engine.container_log(container_id).splitlines()
        found = next((identity.parse_identity(line) for line in reversed(lines) if line.startswith(b"LSL-IDENTITY ")), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            return None
        if delay >= 0.08 and not (engine.container_state(container_id) or _NOT_RUNNING).running:
            return None  # past the quick polls, a container that died will never print it

        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _share_team_volumes(engine: runtime.Engine, env: Environment) -> None:
    shared = [m["target"] for m in env.mounts if m.get("type") == "volume" and not m.get("read_only")]
    if shared:
        engine.exec_run(env.container_id, ["/bin/sh", "-c", identity.SHARE_DIR_SCRIPT, "lsl-share", *shared], user="0:0")


# --- setup hooks -----------------------------------------------------------------------------

class _SetupLog:
    """Appends command output to `setup_log`, written to the row at most every `interval` seconds.

    Output that arrives just after a write is not lost in a quiet spell (a hook that prints a line,
    then waits): a timer writes it once `interval` has passed.
    """

    def __init__(self, env: Environment, interval: float = 0.25) -> None:
        self.env, self.interval = env, interval
        self.text, self.dropped, self.last_write = "", 0, 0.0
        self.limit = settings.LSL_SETUP_LOG_MAX_BYTES  # counted in characters
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def write(self, data: bytes | str, *, flush: bool = False) -> None:
        with self.lock:
            self.text += self.decoder.decode(data) if isinstance(data, bytes) else self.decoder.decode(b"", final=True) + data
            if len(self.text) > self.limit:  # keep the end: that is where failures are
                cut = len(self.text) - self.limit
                self.dropped += cut
                self.text = self.text[cut:]
        if flush or time.monotonic() - self.last_write >= self.interval:
            self.flush()
        elif self.timer is None:
            self.timer = threading.Timer(self.interval, self._flush_later)
            self.timer.daemon = True
            self.timer.start()

    def _flush_later(self) -> None:
        from django.db import connection

        try:
            self.flush()
        finally:
            connection.close()

    def flush(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.last_write = time.monotonic()
            text = (f"[... {self.dropped} earlier characters dropped ...]\n" if self.dropped else "") + self.text
        Environment.objects.filter(pk=self.env.pk).update(setup_log=text, updated_at=timezone.now())
        services.publish_environment(self.env, fields={"setup_log_chars": len(text)})


def run_setup(env: Environment) -> str | None:
    """Run the template's `setup` (as root) then `user_setup` (as the environment user) commands, in order,
    in /workspace, logging their output. Returns None on success, else what failed."""
    template = env.template
    steps = [("root", cmd) for cmd in template.setup or []] + [("user", cmd) for cmd in template.user_setup or []]
    user, user_env = services.shell_user(env), services.shell_environment(env)
    info = {"LSL_USER": user_env["USER"], "LSL_UID": user.split(":")[0], "LSL_GID": user.split(":")[-1], "LSL_HOME": user_env["HOME"]}
    # The deadline lives on the row: any live worker enforces it (enforce_setup_deadlines), even
    # if this one dies. Docker cannot kill an exec, so enforcing it means stopping the container.
    deadline = timezone.now() + timedelta(seconds=settings.LSL_SETUP_TIMEOUT)
    Environment.objects.filter(pk=env.pk).update(setup_status=SetupStatus.RUNNING, setup_log="", setup_deadline_at=deadline)
    out = _SetupLog(env)
    failure = _run_setup_steps(env, steps, user, user_env, info, out)
    deadline = Environment.objects.filter(pk=env.pk).values_list("setup_deadline_at", flat=True).first() or deadline
    if timezone.now() >= deadline:
        limit = f"{settings.LSL_SETUP_TIMEOUT:g} s"
        out.write(f"\n[setup timed out after {limit}; the container was stopped]\n", flush=True)
        return setup_timeout_reason()
    return failure


def setup_timeout_reason() -> str:
    return f"setup did not finish within {settings.LSL_SETUP_TIMEOUT:g} s (LSL_SETUP_TIMEOUT); see the setup log"


def _run_setup_steps(env: Environment, steps: list[tuple[str, str]], user: str, user_env: dict[str, str],
                     info: dict[str, str], out: _SetupLog) -> str | None:
    handed_over = False
    for number, (who, command) in enumerate(steps, start=1):
        if who == "user" and not handed_over:
            _hand_over_workspace(env, user)
            handed_over = True
        _progress(env, phase="setup", step=number, of=len(steps), command=command)
        out.write(f"{'#' if who == 'root' else '$'} {command}\n", flush=True)
        try:
            chunks, exit_code = nodes.engine_for(env).exec_stream(
                env.container_id, ["/bin/sh", "-c", command], user="0:0" if who == "root" else user,
                workdir=runtime.WORKSPACE_PATH, environment={**info, **(user_env if who == "user" else {})})
            for chunk in chunks:
                out.write(chunk)
            code = exit_code()
        except runtime.EngineError as exc:
            out.write(f"\n[setup step {number} could not run: {exc}]\n", flush=True)
            return f"setup step {number} ({command!r}) could not run: {exc}"
        if code != 0:
            out.write(f"\n[setup step {number} exited with status {code}]\n", flush=True)
            return f"setup step {number} ({command!r}) failed with exit status {code}; see the setup log"
    if not handed_over:
        _hand_over_workspace(env, user)
    out.write(f"[setup finished: {len(steps)} step{'s' * (len(steps) != 1)}]\n", flush=True)
    return None


def _hand_over_workspace(env: Environment, user: str) -> None:
    """Files root's setup left in the workspace and home belong to the environment user."""
    home = services.shell_environment(env)["HOME"]
    nodes.engine_for(env).exec_run(env.container_id, ["chown", "-R", "-h", user, runtime.WORKSPACE_PATH, home], user="0:0")


def enforce_setup_deadlines() -> list[str]:
    """Stop the containers of setups past their deadline: that ends the hook (and its output stream),
    and the provisioning worker, if alive, records the timeout; if it is dead, we do."""
    now = timezone.now()
    late = list(Environment.objects.filter(status=Status.CREATING, setup_status=SetupStatus.RUNNING,
                                           setup_deadline_at__lt=now).exclude(container_id="").select_related("node"))
    for env in late:
        log.info("setup of %s passed its deadline: stopping its container", env.pk)
        # The reason first: the provisioning worker sees the hook die as the container stops, and
        # must find the row already failed for the right reason (not "exit status 137").
        with transaction.atomic():
            reason = setup_timeout_reason()
            if Environment.objects.filter(pk=env.pk, status=Status.CREATING, setup_status=SetupStatus.RUNNING).update(
                    status=Status.ERROR, setup_status=SetupStatus.FAILED, last_error=reason, stopped_at=now,
                    progress={"phase": "failed", "error": reason}, updated_at=now):
                env.refresh_from_db()
                services.publish_environment(env)
        _stop_quietly(nodes.engine_of_node(env.node), env.container_id)
    return [str(env.pk) for env in late]


def new_worker_id() -> str:
    import os
    import socket

    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
