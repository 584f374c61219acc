"""The `lsl` command: click commands over `lsl.client.Client`.

Commands return an int exit code (or None for 0); `main()` turns `LslError`s
into one `lsl: error: ...` line and their exit code, never a traceback unless
`--debug` (or LSL_DEBUG=1).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import click

from lsl import __version__, config as configfile
from lsl.client import Client
from lsl.errors import (
    EXIT_CODES_HELP,
    USAGE,
    AuthError,
    Conflict,
    EnvironmentFailed,
    LslError,
    NotFound,
    ServerError,
    UsageFailure,
)
from lsl.output import ago, details, err, human_bytes, print_json, table

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class State:
    """Per-invocation state: global flags, and the config/client loaded only when a command needs them."""

    def __init__(self, debug: bool, as_json: bool) -> None:
        self.debug = debug
        self.json = as_json
        self._client: Client | None = None
        self._config: configfile.Config | None = None

    @property
    def config(self) -> configfile.Config:
        if self._config is None:
            self._config = configfile.load()
        return self._config

    @property
    def client(self) -> Client:
        if self._client is None:
            config = self.config.require_login()
            self._client = Client(config.url, config.token)
        return self._client


def state() -> State:
    return click.get_current_context().find_object(State) or State(False, False)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--json` on every listing; also honours the global `lsl --json ...`."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys, as the API returns them).")
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        return func(*args, as_json=as_json or state().json, **kwargs)

    return wrapper


def complete_environment(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Tab-complete environment names from the server; silent on any failure (completion must not print errors)."""
    try:
        config = configfile.load().require_login()
        client = Client(config.url, config.token, timeout=(2.0, 3.0))
        names = {env["name"] for env in client.get_all("environments/")}
        return sorted(name for name in names if name.startswith(incomplete))
    except Exception:  # noqa: BLE001 - a completion hook must never crash the shell
        return []


def environment_argument(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("environment", metavar="NAME", shell_complete=complete_environment)(func)


# --- the group -----------------------------------------------------------------------

@click.group(context_settings=CONTEXT, invoke_without_command=True, epilog=EXIT_CODES_HELP)
@click.option("-l", "list_images", is_flag=True, help="List the images (templates) you may use; same as 'lsl images'.")
@click.option("--json", "as_json", is_flag=True, help="JSON output for listings (same as each command's --json).")
@click.option("--debug", is_flag=True, envvar="LSL_DEBUG", help="Show tracebacks for errors.")
@click.version_option(__version__, "-V", "--version", prog_name="lsl")
@click.pass_context
def cli(ctx: click.Context, list_images: bool, as_json: bool, debug: bool) -> Any:
    """LSL: disposable Linux dev environments, with shared terminals.

    \b
    Get started:
      lsl init https://lsl.example.com      # log in, store a token
      lsl images                            # what you can run
      lsl create dev --template debian      # make an environment
      lsl shell dev                         # attach a shared terminal
    """
    ctx.obj = State(debug=debug, as_json=as_json)
    if list_images:
        return ctx.invoke(images, as_json=as_json)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
    return None


# --- login ---------------------------------------------------------------------------

@cli.command()
@click.argument("url", required=False)
@click.option("--token", help="Use this existing API token instead of logging in with a password.")
@click.option("-u", "--username", help="Username (prompted for when omitted).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (for scripts).")
@click.option("--token-name", help="Name of the token to create (default: lsl@HOSTNAME).")
def init(url: str | None, token: str | None, username: str | None, password_stdin: bool, token_name: str | None) -> None:
    """Log in to a server and remember it.

    Stores the server URL, a named API token and this client's id in
    $XDG_CONFIG_HOME/lsl/config.json (mode 0600). LSL_URL / LSL_TOKEN override it.

    \b
    Examples:
      lsl init https://lsl.example.com
      lsl init https://lsl.example.com --token lsl_xxxx
      echo "$PASS" | lsl init http://127.0.0.1:8000 -u alice --password-stdin
    """
    stored = configfile.load_file()
    url = configfile.normalize_url(url or os.environ.get("LSL_URL") or stored.url or _prompt("Server URL"))
    if not token:
        token = _login(url, username, password_stdin, token_name or f"lsl@{socket.gethostname()}")
    whoami = Client(url, token).get("config/")  # proves the token works before we store it
    stored.url, stored.token = url, token
    path = configfile.save(stored)
    user = whoami.get("user", {}).get("username", "?")
    err.print(f"Logged in to {url} as [bold]{user}[/bold] (server {whoami.get('server_version', '?')}); "
              f"config saved to {path}")


def _prompt(label: str, hide: bool = False) -> str:
    if not sys.stdin.isatty():
        raise UsageFailure(f"{label.lower()} is required (no terminal to ask on)")
    return str(click.prompt(label, hide_input=hide))


def _login(url: str, username: str | None, password_stdin: bool, token_name: str) -> str:
    username = username or _prompt("Username")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = _prompt("Password", hide=True)
    answer = Client(url).post("auth/token/", {"username": username, "password": password, "name": token_name})
    return str(answer["key"])


@cli.command()
def logout() -> None:
    """Revoke the stored token on the server and forget it.

    \b
    Example:
      lsl logout
    """
    config = state().config.require_login()
    try:
        state().client.post("tokens/revoke-current/")
        note = "token revoked"
    except AuthError:
        note = "the token was already invalid"
    stored = configfile.load_file()
    if stored.token:
        stored.token = ""
        configfile.save(stored)
    err.print(f"Logged out of {config.url} ({note}).")


@cli.command()
def ping() -> None:
    """Check the connection and login (admins see this client as alive).

    \b
    Example:
      lsl ping
    """
    answer = _ping(state())
    err.print(f"pong from {state().config.url} (client {answer.get('client_id')})")


def _ping(current: State) -> dict[str, Any]:
    body = {"client_id": current.config.client_id, "hostname": socket.gethostname(), "version": __version__}
    return current.client.post("ping/", body)


# --- catalog and environments ---------------------------------------------------------

@cli.command()
@json_option
def images(as_json: bool) -> None:
    """List the images (templates) you may use.

    \b
    Examples:
      lsl images
      lsl -l --json
    """
    templates = state().client.get_all("templates/")
    if as_json:
        return print_json(templates)
    table(templates, TEMPLATE_COLUMNS, empty="no templates available to you")
    return None


TEMPLATE_COLUMNS = [
    ("TEMPLATE", lambda t: t["slug"]),
    ("IMAGE", lambda t: t.get("image")),
    ("CPUS", lambda t: t.get("cpus")),
    ("MEMORY", lambda t: f"{t['memory_mb']}m" if t.get("memory_mb") else None),
    ("DISK", lambda t: _disk_limit(t.get("disk_mb"))),
    ("NETWORK", lambda t: t.get("network_modes")),
    ("DESCRIPTION", lambda t: t.get("description")),
]


def parse_memory(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> int | None:
    """'512m', '2g', '1.5G', '2GiB', '1024' (MiB) → MiB."""
    if value is None:
        return None
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    unit = text[-1] if text and text[-1] in scale else "m"
    number = text[:-1] if text and text[-1] in scale else text
    try:
        megabytes = float(number) * scale[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a size like 512m or 2g") from None
    if megabytes < 1:
        raise click.BadParameter(f"{value!r}: too small")
    return int(megabytes)


def _disk_limit(disk_mb: Any) -> str | None:
    """A disk limit as `lsl` shows sizes (MiB with an m, like memory); 0 is "none" (no limit)."""
    if disk_mb is None:
        return None
    return f"{disk_mb}m" if disk_mb else "none"


def _disk_text(env: dict[str, Any]) -> str | None:
    """`20m (40m used)`, plus the deadline while it is being cleaned up after a stop for disk."""
    limit = _disk_limit(env.get("disk_mb"))
    if limit is None:
        return None
    used = env.get("disk_used_mb")
    text = f"{limit} ({used}m used)" if used is not None else limit
    if env.get("disk_grace_until"):
        text += f"; clean up before {env['disk_grace_until']}"
    return text


def parse_mounts(ctx: click.Context | None, param: click.Parameter | None, values: tuple[str, ...]) -> list[str]:
    """Check `SRC:DST[:ro|rw]` here so a typo is a usage error before anything is created."""
    for spec in values:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise click.BadParameter(f"{spec!r}: expected SRC:DST or SRC:DST:ro")
        if len(parts) == 3 and parts[2] not in ("ro", "rw"):
            raise click.BadParameter(f"{spec!r}: mode must be 'ro' or 'rw', not {parts[2]!r}")
    return list(values)


@cli.command()
@click.argument("name", required=False)
@click.option("-t", "--template", help="Template slug (see 'lsl images').")
@click.option("--from", "from_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Create from an environment file (see 'lsl export'); '-' reads stdin.")
@click.option("--name", "name_option", help="With --from: the new environment's name (overrides the file's).")
@click.option("--team", help="Team slug to create the environment in (its members get access).")
@click.option("--network", type=click.Choice(["host", "bridge", "none"]), help="Network mode.")
@click.option("--mount", "mounts", multiple=True, callback=parse_mounts, metavar="SRC:DST[:ro]",
              help="Bind-mount a host path (repeatable; the server restricts allowed roots).")
@click.option("--cpus", type=click.FloatRange(min=0.1), help="CPU limit, e.g. 1.5.")
@click.option("--memory", callback=parse_memory, help="Memory limit, e.g. 512m or 2g.")
@click.option("--disk", callback=parse_memory, help="Disk limit (workspace and container), e.g. 20g; at most the template's.")
@click.option("--workspace", "workspace", metavar="KEPT",
              help="Attach a kept workspace (a deleted environment's data; see 'lsl workspace ls') instead of a new one.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it runs (with a progress bar).")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for it to run.")
@json_option
def create(name: str | None, template: str | None, from_file: str | None, name_option: str | None, team: str | None,
           network: str | None, mounts: list[str], cpus: float | None, memory: int | None, disk: int | None,
           workspace: str | None, wait: bool, timeout: float, as_json: bool) -> int:
    """Create an environment and wait until it runs.

    The server pulls the image if needed and runs the template's setup; a
    progress bar follows it (live, from the server's event stream). If it
    cannot be created (the image cannot be pulled, a setup step fails...),
    the server's reason is printed and lsl exits 1. With --from, everything
    comes from an environment file (as 'lsl export' writes it); problems in
    it are listed as FILE:LINE:COL: path: message.

    \b
    Examples:
      lsl create dev --template debian
      lsl create api --template python --team platform --network bridge --cpus 2 --memory 2g
      lsl create data --template debian --mount /srv/data:/data:ro
      lsl create --from dev.lsl.yaml --name dev2
      lsl create dev --template debian --workspace dev     # the data of the deleted 'dev'
    """
    client = state().client
    if from_file is not None:
        extra = {"--template": template, "--team": team, "--network": network, "--cpus": cpus, "--memory": memory,
                 "--disk": disk, "--mount": mounts or None, "--workspace": workspace}
        given = [option for option, value in extra.items() if value is not None]
        if given:
            raise UsageFailure(f"{', '.join(given)} cannot be combined with --from (edit the file instead)")
        if name and name_option and name != name_option:
            raise UsageFailure("give the name once (NAME or --name)")
        body: dict[str, Any] | None = None
    else:
        if name_option:
            name = name or name_option
        if not name or not template:
            raise UsageFailure("give NAME and --template (or --from FILE)")
        body = {"name": name, "template": template}
        optional = {"team": team, "network_mode": network, "cpus": cpus, "memory_mb": memory, "disk_mb": disk}
        body.update({key: value for key, value in optional.items() if value is not None})
        if mounts:
            body["mounts"] = mounts
        if workspace:
            body["workspace"] = _find_kept_workspace(client, workspace)["id"]

    from lsl.progress import open_event_stream, polling_allowed, wait_for_environment

    poll = polling_allowed()
    # Subscribe *before* the POST: every status change of the new environment is then an event
    # we will read, however fast the worker is (no race between "created" and "subscribed").
    stream = open_event_stream(client, poll=poll) if wait else None
    try:
        if body is None:
            assert from_file is not None
            env = _create_from_file(client, from_file, name or name_option)
            name = env.get("name") or name or name_option or "?"
        else:
            env = client.post("environments/", body)
        if wait:
            env = wait_for_environment(client, env, timeout, stream=stream, poll=poll)
    finally:
        if stream is not None:
            stream.close()
    if as_json:
        print_json(env)
    _check_created(env, name or "?", waited=wait)
    if not as_json:
        hint = f"; attach with: lsl shell {name}" if env.get("status") == "running" else ""
        err.print(f"{name}: {env.get('status')} ({env.get('id')}){hint}", markup=False)
    return 0


def _check_created(env: dict[str, Any], name: str, *, waited: bool) -> None:
    """Exit non-zero (EnvironmentFailed, exit 1) unless the environment runs (or, without --wait, is on its way)."""
    status = env.get("status")
    if status == "error":
        raise EnvironmentFailed(f"{name}: could not be created: {env.get('last_error') or 'unknown error'}")
    if waited and status in ("stopped", "missing"):
        # Provisioning finished, then the container died (or was removed) straight away.
        reason = env.get("stop_reason") or env.get("last_error") or "no reason given"
        raise EnvironmentFailed(f"{name}: {status} right after it was created ({reason}); see 'lsl info {name}'")


def _create_from_file(client: Client, path: str, name: str | None) -> dict[str, Any]:
    """POST the file to from-yaml; the server's `FILE:LINE:COL: path: message` problems go to stderr one per line."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageFailure(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    filename = "stdin.yaml" if path == "-" else os.path.basename(path)
    body: dict[str, Any] = {"yaml": text, "filename": filename}
    if name:
        body["name"] = name
    try:
        return dict(client.json("POST", "environments/from-yaml/", json=body, params={"name": name} if name else None))
    except (UsageFailure, AuthError) as exc:
        problems = exc.fields.get("yaml") if isinstance(exc.fields, dict) else None
        if not problems:
            raise
        lines = problems if isinstance(problems, list) else [problems]
        for line in lines:
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()
        raise type(exc)(f"{filename}: {len(lines)} problem{'s' if len(lines) != 1 else ''} in the environment file") from None


ENV_COLUMNS = [
    ("NAME", lambda e: e["name"]),
    ("STATUS", lambda e: e.get("status")),
    ("TEMPLATE", lambda e: e.get("template")),
    ("OWNER", lambda e: e.get("owner")),
    ("TEAM", lambda e: e.get("team")),
    ("ROLE", lambda e: e.get("role")),
    ("CREATED", lambda e: ago(e.get("created_at"))),
    ("ID", lambda e: e.get("id")),
]


@cli.command("list")
@click.option("--status", type=click.Choice(["creating", "running", "stopped", "error", "missing"]))
@click.option("--team", help="Only this team's environments.")
@click.option("--owner", help="Only this user's environments.")
@click.option("--template", help="Only environments from this template.")
@click.option("-w", "--watch", is_flag=True,
              help="Keep the list current as things change, until Ctrl-C; with --json, one JSON object per line.")
@json_option
def list_environments(status: str | None, team: str | None, owner: str | None, template: str | None, watch: bool,
                      as_json: bool) -> None:
    """List the environments you can see (alias: ls).

    With --watch the list follows the server's event stream: on a terminal
    the table is redrawn in place (STATUS shows why a stopped or missing one
    stopped: killed, oom, exited N, removed...); piped, each change is one
    line; with --json, each line is one JSON object (NDJSON): a snapshot
    first, then every environment event.

    \b
    Examples:
      lsl list
      lsl ls --status running --json | jq -r '.[].name'
      lsl list --watch
      lsl list --watch --json | jq -c 'select(.environment.status == "stopped")'
    """
    if watch:
        from lsl.progress import polling_allowed
        from lsl.watch import Filters, Watcher, status_text

        columns = [(title, status_text if title == "STATUS" else getter) for title, getter in ENV_COLUMNS]
        watcher = Watcher(state().client, Filters(status, team, owner, template), columns, as_json=as_json,
                          poll=polling_allowed())
        try:
            watcher.run()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends: not an error
        return None
    envs = state().client.get_all("environments/", status=status, team=team, owner=owner, template=template)
    if as_json:
        return print_json(envs)
    table(envs, ENV_COLUMNS, empty="no environments (create one: lsl create NAME --template T)")
    return None


_ls = copy.copy(list_environments)
_ls.hidden = True  # an alias: listed once in --help
cli.add_command(_ls, "ls")


def _lifecycle(action: str) -> click.Command:
    @click.command(action, help=f"{action.capitalize()} an environment.\n\n\b\nExample:\n  lsl {action} dev")
    @environment_argument
    @json_option
    def command(environment: str, as_json: bool) -> None:
        client = state().client
        env = client.find_environment(environment)
        try:
            env = client.post(f"environments/{env['id']}/{action}/")
        except Conflict as exc:
            # The engine refused (a container that cannot start: its reason is the message). That
            # is "failed to start", exit 1, as for `lsl create`; other conflicts (not running,
            # still being created) stay exit 5.
            if action != "stop" and exc.code == "engine_error" and env.get("status") != "creating":
                raise EnvironmentFailed(f"{env['name']}: could not {action}: {exc.message}") from None
            raise
        if as_json:
            print_json(env)
        if action != "stop" and env.get("status") != "running":
            reason = env.get("last_error") or env.get("stop_reason") or "no reason given"
            raise EnvironmentFailed(f"{env['name']}: {env.get('status')} after {action} ({reason}); "
                                    f"see 'lsl info {env['name']}'")
        if not as_json:
            err.print(f"{env['name']}: {env.get('status')}", markup=False)
        return None

    return command


for _action in ("start", "stop", "restart"):
    cli.add_command(_lifecycle(_action))


@cli.command()
@environment_argument
@click.option("--purge", is_flag=True, help="Also delete the workspace volume (its data is lost).")
def rm(environment: str, purge: bool) -> None:
    """Delete an environment.

    Its workspace volume is kept unless --purge: 'lsl workspace ls' lists it,
    'lsl create --workspace NAME' attaches it to a new environment.

    \b
    Examples:
      lsl rm dev
      lsl rm --purge scratch
    """
    client = state().client
    env = client.find_environment(environment)
    client.delete(f"environments/{env['id']}/", purge="true" if purge else "false")
    if purge:
        err.print(f"{env['name']}: removed with its workspace volume", markup=False)
    else:
        err.print(f"{env['name']}: removed; its workspace is kept (lsl workspace ls; "
                  f"lsl create --workspace {env['name']} to use it again)", markup=False)


@cli.command()
@environment_argument
@json_option
def info(environment: str, as_json: bool) -> None:
    """Show one environment in detail.

    \b
    Example:
      lsl info dev
    """
    env = state().client.find_environment(environment)
    if as_json:
        return print_json(env)
    mounts = [f"{m['source']}:{m['target']}{':ro' if m.get('read_only') else ''}" if isinstance(m, dict) else m
              for m in env.get("mounts") or []]
    progress = env.get("progress") or {}
    details([
        ("name", env["name"]), ("id", env["id"]), ("status", env.get("status")), ("node", env.get("node")),
        ("owner", env.get("owner")), ("team", env.get("team")), ("your role", env.get("role")),
        ("template", env.get("template")), ("image", env.get("image")),
        ("cpus", env.get("cpus")), ("memory", f"{env['memory_mb']}m" if env.get("memory_mb") else None),
        ("disk", _disk_text(env)),
        ("pids", env.get("pids")), ("network", env.get("network_mode")), ("mounts", mounts),
        ("workspace", env.get("workspace_volume")), ("container", (env.get("container_id") or "")[:12]),
        ("progress", progress.get("phase")), ("stop reason", env.get("stop_reason")),
        ("last error", env.get("last_error")),
        ("created", env.get("created_at")), ("started", env.get("started_at")), ("stopped", env.get("stopped_at")),
    ])
    return None


# --- files, environment files, snapshots ----------------------------------------------

@cli.command()
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory (into DST, created if missing).")
def cp(source: str, destination: str, recursive: bool) -> None:
    """Copy a file or directory to or from an environment.

    Exactly one side is NAME:PATH (environment name or id, absolute path
    inside). A file goes to exactly DST (into DST if it ends with '/') and
    keeps its mode. With -r a directory is copied *into* the directory DST,
    under its own name. Transfers run as the environment's user.

    \b
    Examples:
      lsl cp notes.txt dev:/workspace/notes.txt
      lsl cp dev:/workspace/build.log .
      lsl cp -r src dev:/workspace/            # → /workspace/src
      lsl cp -r dev:/workspace/src backup/     # → backup/src
    """
    from lsl.transfer import Remote, download, parse_side, upload

    src, dst = parse_side(source), parse_side(destination)
    if isinstance(src, Remote) == isinstance(dst, Remote):
        raise UsageFailure("exactly one of SRC and DST must be NAME:/absolute/path")
    client = state().client
    if isinstance(dst, Remote):
        summary = upload(client, str(src), dst, recursive)
    else:
        assert isinstance(src, Remote)
        summary = download(client, src, str(dst), recursive)
    err.print(summary, markup=False)


@cli.command()
@environment_argument
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), help="File to write (default: stdout).")
def export(environment: str, output: str | None) -> None:
    """Print an environment as an environment file (YAML).

    Template, team, network, limits and mounts; 'lsl create --from FILE'
    makes a new environment from it.

    \b
    Examples:
      lsl export dev > dev.lsl.yaml
      lsl export dev -o dev.lsl.yaml && lsl create --from dev.lsl.yaml --name dev2
    """
    client = state().client
    env = client.find_environment(environment)
    text = client.request("GET", f"environments/{env['id']}/export/").text
    if output in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(text)
    err.print(f"wrote {output}", markup=False)


@cli.command()
@environment_argument
@click.argument("slug")
@click.option("--team", "teams", multiple=True, metavar="TEAM", help="Team that may use the snapshot (repeatable).")
@click.option("-d", "--description", help="Description of the new template.")
@click.option("--no-workspace", is_flag=True, help="Leave the workspace's files out.")
@json_option
def snapshot(environment: str, slug: str, teams: tuple[str, ...], description: str | None, no_workspace: bool,
             as_json: bool) -> None:
    """Save an environment (with its workspace) as a private template.

    You (and the --team teams) can then create environments from SLUG.

    \b
    Examples:
      lsl snapshot dev dev-base
      lsl snapshot dev dev-base --team platform -d "dev with tools"
    """
    client = state().client
    env = client.find_environment(environment)
    body: dict[str, Any] = {"slug": slug, "include_workspace": not no_workspace}
    if teams:
        body["teams"] = list(teams)
    if description:
        body["description"] = description
    err.print(f"{env['name']}: saving snapshot {slug}…", markup=False)
    template = client.json("POST", f"environments/{env['id']}/snapshot/", json=body, timeout=(5.0, None))
    if as_json:
        return print_json(template)
    table([template], TEMPLATE_COLUMNS)
    err.print(f"create from it: lsl create NAME --template {template.get('slug', slug)}", markup=False)
    return None


# --- kept workspaces -----------------------------------------------------------------------

WORKSPACE_COLUMNS = [
    ("ENVIRONMENT", lambda w: w.get("environment_name")),
    ("TEMPLATE", lambda w: w.get("template_slug") or "-"),
    ("DISK", lambda w: _disk_limit(w.get("disk_mb")) or "-"),
    ("DELETED", lambda w: ago(w.get("deleted_at"))),
    ("DOCKER VOLUME", lambda w: w.get("volume_name")),
    ("ID", lambda w: w.get("id")),
]


def _find_kept_workspace(client: Client, name: str) -> dict[str, Any]:
    """A kept workspace by its deleted environment's name or its id (the newest when names repeat)."""
    kept = client.get_all("workspaces/")
    matches = [w for w in kept if name in (w.get("id"), w.get("volume_name"))] or \
        [w for w in kept if w.get("environment_name") == name]
    if not matches:
        raise NotFound(f"no kept workspace named {name!r} (see: lsl workspace ls)")
    return matches[0]  # the server lists the newest first


@cli.group(context_settings=CONTEXT)
def workspace() -> None:
    """Kept workspaces: the data of environments deleted without --purge.

    A kept workspace counts in your disk quota until you attach it to a new
    environment (lsl create --workspace) or purge it (lsl workspace rm).

    \b
    Examples:
      lsl workspace ls
      lsl create dev --template debian --workspace dev
      lsl workspace rm old-experiment
    """


@workspace.command("ls")
@json_option
def workspace_ls(as_json: bool) -> None:
    """List your kept workspaces, newest first."""
    kept = state().client.get_all("workspaces/")
    if as_json:
        return print_json(kept)
    table(kept, WORKSPACE_COLUMNS, empty="no kept workspaces (lsl rm keeps an environment's workspace unless --purge)")
    return None


@workspace.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask (the data is deleted).")
def workspace_rm(names: tuple[str, ...], yes: bool) -> None:
    """Delete kept workspaces and their data (by environment name or id)."""
    client = state().client
    found = [_find_kept_workspace(client, name) for name in names]
    if not yes:
        if not sys.stdin.isatty():
            raise UsageFailure("this deletes data: add --yes (no terminal to ask on)")
        listed = ", ".join(str(w.get("environment_name")) for w in found)
        if not click.confirm(f"Delete the data of {listed}?", err=True):
            raise click.Abort()
    for kept in found:
        client.delete(f"workspaces/{kept['id']}/")
        err.print(f"kept workspace {kept.get('environment_name')} ({kept.get('volume_name')}) deleted", markup=False)


# --- team volumes and quotas ------------------------------------------------------------

VOLUME_COLUMNS = [
    ("NAME", lambda v: v.get("name")),
    ("TEAM", lambda v: v.get("team")),
    ("CREATOR", lambda v: v.get("created_by")),
    ("MOUNT", lambda v: v.get("mount")),
    ("DOCKER VOLUME", lambda v: v.get("volume_name")),
    ("CREATED", lambda v: ago(v.get("created_at"))),
    ("ID", lambda v: v.get("id")),
]


@cli.group(context_settings=CONTEXT)
def volume() -> None:
    """Team volumes: named volumes a team's environments can share.

    \b
    Examples:
      lsl volume create cache --team platform
      lsl create dev --template debian --team platform --mount volume:cache:/cache
      lsl volume ls
      lsl volume rm cache
    """


@volume.command("ls")
@click.option("--team", help="Only this team's volumes.")
@json_option
def volume_ls(team: str | None, as_json: bool) -> None:
    """List your teams' volumes."""
    volumes = state().client.get_all("volumes/", team=team)
    if as_json:
        return print_json(volumes)
    table(volumes, VOLUME_COLUMNS, empty="no team volumes (create one: lsl volume create NAME --team T)")
    return None


@volume.command("create")
@click.argument("name")
@click.option("--team", required=True, help="Team that owns the volume (you must be a member).")
@json_option
def volume_create(name: str, team: str, as_json: bool) -> None:
    """Create a team volume."""
    created = state().client.post("volumes/", {"team": team, "name": name})
    if as_json:
        return print_json(created)
    err.print(f"volume {created.get('name', name)} created for team {created.get('team', team)}; "
              f"mount it with --mount {created.get('mount') or f'volume:{name}:/mnt/{name}'}", markup=False)
    return None


@volume.command("rm")
@click.argument("name")
@click.option("--team", help="The volume's team (when several of your teams have one with this name).")
def volume_rm(name: str, team: str | None) -> None:
    """Delete a team volume and its data (refused while an environment mounts it)."""
    client = state().client
    matches = [v for v in client.get_all("volumes/", team=team) if name in (v.get("name"), str(v.get("id")))]
    if not matches:
        raise NotFound(f"no team volume named {name!r}" + (f" in team {team!r}" if team else ""))
    if len(matches) > 1:
        teams = ", ".join(sorted(str(v.get("team")) for v in matches))
        raise UsageFailure(f"{name!r} is ambiguous (teams {teams}), add --team")
    client.delete(f"volumes/{matches[0]['id']}/")
    err.print(f"volume {matches[0].get('name')} of team {matches[0].get('team')} deleted", markup=False)


def _usage_of(used: Any, limit: Any, unit: str = "") -> str:
    used_text = f"{used:g}" if isinstance(used, float) else str(used)
    limit_text = "unlimited" if not limit else (f"{limit:g}" if isinstance(limit, float) else str(limit)) + unit
    return f"{used_text}{unit} / {limit_text}"


@cli.command()
@json_option
def quota(as_json: bool) -> None:
    """Show your quotas and your teams' (usage / limit; CPUs and memory count running environments,
    disk the disk limits of all; TEAMS and VOLUMES count the teams and team volumes you created).

    \b
    Example:
      lsl quota
    """
    answer = state().client.get("quotas/")
    if as_json:
        return print_json(answer)
    user = answer.get("user") or {}
    rows = [{"scope": "user", "name": user.get("name"), **user}]
    rows += [{"scope": "team", "name": team.get("team"), **team} for team in answer.get("teams") or []]

    def column(key: str, unit: str = "") -> Callable[[dict[str, Any]], str]:
        return lambda row: _usage_of((row.get("usage") or {}).get(key, 0), (row.get("limits") or {}).get(key, 0), unit)

    table(rows, [("SCOPE", lambda r: r["scope"]), ("NAME", lambda r: r.get("name")),
                 ("ENVIRONMENTS", column("environments")), ("CPUS", column("cpus")),
                 ("MEMORY", column("memory_mb", "m")), ("DISK", column("disk_mb", "m")),
                 ("TEAMS", lambda r: column("teams")(r) if r["scope"] == "user" else ""),
                 ("VOLUMES", lambda r: column("team_volumes")(r) if r["scope"] == "user" else "")])
    return None


# --- exec ------------------------------------------------------------------------------

@cli.command("exec")
@environment_argument
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-w", "--workdir", help="Working directory inside the environment.")
@click.option("-e", "--env", "env_vars", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
def exec_command(environment: str, command: tuple[str, ...], workdir: str | None, env_vars: tuple[str, ...]) -> int:
    """Run a command in an environment (exits with its code).

    Output streams as it comes; no terminal is allocated. Put the command
    after `--` so its own options are not taken for lsl's.

    \b
    Examples:
      lsl exec dev -- uname -a
      lsl exec dev -w /workspace -e CI=1 -- make test
    """
    body: dict[str, Any] = {"command": list(command)}
    if workdir:
        body["workdir"] = workdir
    if env_vars:
        body["env"] = dict(_key_value(item) for item in env_vars)
    client = state().client
    env = client.find_environment(environment)
    response = client.request("POST", f"environments/{env['id']}/exec/", json=body, stream=True, timeout=(5.0, None))
    return _stream_exec(response)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageFailure(f"--env {item!r}: expected KEY=VALUE")
    return key, value


def _stream_exec(response: Any) -> int:
    """Copy `{"o": base64}` lines to stdout as they arrive; the last line carries the exit code."""
    stdout = sys.stdout.buffer
    exit_code: Any = None
    with response:
        for line in response.iter_lines():
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                raise ServerError(f"unexpected exec output from the server: {line[:80]!r}") from None
            if "o" in message:
                stdout.write(base64.b64decode(message["o"]))
                stdout.flush()
            elif "exit_code" in message:
                exit_code = message["exit_code"]
            elif "error" in message:
                raise ServerError(f"exec failed: {message['error']}")
    if exit_code is None:
        raise ServerError("the command's output ended without an exit code (connection lost?)")
    return int(exit_code) if isinstance(exit_code, int) else 1


# --- access ----------------------------------------------------------------------------

def _subject(user: str | None, team: str | None) -> tuple[str, str]:
    if (user is None) == (team is None):
        raise UsageFailure("give exactly one of --user or --team")
    return ("user", user) if user is not None else ("team", team or "")


@cli.command()
@environment_argument
@click.option("--user", help="Username to share with.")
@click.option("--team", help="Team slug to share with.")
@click.option("--role", type=click.Choice(["viewer", "member", "admin"]), default="viewer", show_default=True,
              help="viewer: watch; member: type, start/stop; admin: also share and delete.")
def share(environment: str, user: str | None, team: str | None, role: str) -> None:
    """Give a user or a team a role on an environment.

    The role replaces any role they had before.

    \b
    Examples:
      lsl share dev --user bob --role member
      lsl share dev --team platform --role viewer
    """
    kind, name = _subject(user, team)
    client = state().client
    env = client.find_environment(environment)
    grant = client.post(f"environments/{env['id']}/access/", {kind: name, "role": role})
    err.print(f"{env['name']}: {grant.get('kind', kind)} {grant.get('name', name)} is now {grant.get('role', role)}")


@cli.command()
@environment_argument
@click.option("--user", help="Username to remove.")
@click.option("--team", help="Team slug to remove.")
def unshare(environment: str, user: str | None, team: str | None) -> None:
    """Remove a user's or a team's access.

    \b
    Example:
      lsl unshare dev --user bob
    """
    kind, name = _subject(user, team)
    client = state().client
    env = client.find_environment(environment)
    grants = client.get(f"environments/{env['id']}/access/")
    grant = next((g for g in grants if g.get("kind") == kind and g.get("name") == name), None)
    if grant is None:
        raise NotFound(f"{kind} {name!r} has no access to {env['name']}")
    client.delete(f"environments/{env['id']}/access/{grant['id']}/")
    err.print(f"{env['name']}: removed access for {kind} {name}")


@cli.command()
@environment_argument
@json_option
def access(environment: str, as_json: bool) -> None:
    """List who has access to an environment.

    \b
    Example:
      lsl access dev
    """
    client = state().client
    env = client.find_environment(environment)
    grants = client.get(f"environments/{env['id']}/access/")
    if as_json:
        return print_json(grants)
    err.print(f"[dim]{env['name']} is owned by {env.get('owner')}{' (team ' + env['team'] + ')' if env.get('team') else ''}[/dim]")
    table(grants, [("KIND", lambda g: g.get("kind")), ("NAME", lambda g: g.get("name")),
                   ("ROLE", lambda g: g.get("role")), ("ID", lambda g: g.get("id"))], empty="not shared with anyone")
    return None


# --- sessions --------------------------------------------------------------------------

@cli.command()
@environment_argument
@click.option("--live", is_flag=True, help="Only sessions still running.")
@json_option
def sessions(environment: str, live: bool, as_json: bool) -> None:
    """List an environment's terminal sessions.

    \b
    Examples:
      lsl sessions dev
      lsl sessions dev --live --json
    """
    client = state().client
    env = client.find_environment(environment)
    rows = client.get_all(f"environments/{env['id']}/sessions/", live="true" if live else None)
    if as_json:
        return print_json(rows)
    table(rows, [
        ("ID", lambda s: s.get("id")),
        ("NAME", lambda s: s.get("name")),
        ("CREATOR", lambda s: s.get("creator")),
        ("STATE", lambda s: "live" if s.get("live") else (s.get("end_reason") or "ended")),
        ("EXIT", lambda s: s.get("exit_code")),
        ("PEOPLE", lambda s: [p.get("user") for p in s.get("participants") or []]),
        ("CREATED", lambda s: ago(s.get("created_at"))),
    ], empty=f"no sessions on {env['name']} (open one: lsl shell {env['name']})")
    return None


@cli.command()
@click.argument("session")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (default SESSION.cast; '-' for stdout).")
def record(session: str, output: str | None) -> None:
    """Download a session's recording (asciicast v2).

    Play it with 'asciinema play FILE'.

    \b
    Example:
      lsl record 3f2c9a7e-... -o demo.cast && asciinema play demo.cast
    """
    response = state().client.request("GET", f"sessions/{session}/recording/", stream=True)
    output = output or f"{session}.cast"
    with response:
        if output == "-":
            for chunk in response.iter_content(65536):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        size = 0
        with open(output, "wb") as handle:
            for chunk in response.iter_content(65536):
                handle.write(chunk)
                size += len(chunk)
    err.print(f"wrote {output} ({human_bytes(size)})")


@cli.command()
@environment_argument
@click.option("--session", "session_id", help="Join this session (see 'lsl sessions NAME').")
@click.option("--new", is_flag=True, help="Open a new session instead of joining the newest live one.")
@click.option("--read-only", is_flag=True, help="Watch only: send no keystrokes.")
def shell(environment: str, session_id: str | None, new: bool, read_only: bool) -> int:
    """Attach to a shared terminal session.

    Joins the newest live session, or opens one.

    Everyone attached sees the same screen. Type Enter ~ . to detach and leave
    the shell running for the others; the session's exit code becomes lsl's.
    If the connection drops (a server restart, a network outage), lsl
    reconnects by itself and redraws the screen; it gives up after 120 s
    (exit 6).

    \b
    Examples:
      lsl shell dev
      lsl shell dev --new
      lsl shell dev --session 3f2c9a7e-... --read-only
    """
    if session_id and new:
        raise UsageFailure("--session and --new cannot be used together")
    from lsl.shell import attach, pick_session

    current = state()
    env = current.client.find_environment(environment)
    session = pick_session(current.client, env, session_id, new)
    return attach(current.client, env, session, read_only=read_only, ping=lambda: _ping(current))


@cli.command()
@environment_argument
@click.argument("ports", nargs=-1, required=True, metavar="[LOCAL:]REMOTE...")
@json_option
def forward(environment: str, ports: tuple[str, ...], as_json: bool) -> int:
    """Forward local TCP ports to ports inside an environment, until Ctrl-C.

    Listens on 127.0.0.1:LOCAL (LOCAL omitted: the same as REMOTE; 0: any
    free port) and carries each connection over an authenticated websocket
    to 127.0.0.1:REMOTE inside the environment: no published container ports,
    no host networking. Needs the member role. A connection to a port nothing
    listens on is closed, with a note on stderr, and forwarding goes on; if
    the environment stops, lsl says so and exits 1. --json prints what it
    bound as one JSON line.

    \b
    Examples:
      lsl forward dev 3000                  # http://127.0.0.1:3000/ -> dev:3000
      lsl forward dev 8080:3000 5432
      lsl forward dev 0:8000 --json         # [{"local": 41234, "remote": 8000, "url": ...}]
    """
    from lsl.forward import forward as run_forward
    from lsl.forward import parse_specs

    specs = parse_specs(ports)  # bad specs fail before any request (exit 2)
    client = state().client
    env = client.find_environment(environment)
    return run_forward(client, env, specs, as_json=as_json)


# --- monitoring ------------------------------------------------------------------------

@cli.command()
@click.option("-w", "--watch", is_flag=True, help="Keep refreshing (Ctrl-C to quit).")
@click.option("-n", "--interval", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@json_option
def monitor(watch: bool, interval: float, as_json: bool) -> None:
    """Show host load and per-environment CPU and memory.

    \b
    Examples:
      lsl monitor
      lsl monitor --watch -n 5
    """
    from lsl.monitor import render_monitor

    client = state().client
    if as_json:
        return print_json(client.get("monitor/"))
    if not watch:
        from lsl.output import print_stripped

        print_stripped(render_monitor(client.get("monitor/")))
        return None
    from rich.live import Live

    from lsl.output import out

    with Live(render_monitor(client.get("monitor/")), console=out, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render_monitor(client.get("monitor/")), refresh=True)
        except KeyboardInterrupt:
            pass
    return None


# --- completion ------------------------------------------------------------------------

@cli.command()
@click.argument("shell_name", metavar="SHELL", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell_name: str) -> None:
    """Print the completion script for bash, zsh or fish.

    \b
    Examples:
      eval "$(lsl completion bash)"          # in ~/.bashrc
      eval "$(lsl completion zsh)"           # in ~/.zshrc
      lsl completion fish > ~/.config/fish/completions/lsl.fish
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell_name)
    assert completer is not None  # the Choice above only allows the built-in shells
    click.echo(completer(cli, {}, "lsl", "_LSL_COMPLETE").source())


# --- ports and public preview links (issue 14) ---------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `1h`, `7d`."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
    number = value[:-1] if value[-1:] in _DURATION_UNITS else value
    try:
        amount = float(number)
    except ValueError:
        raise UsageFailure(f"--expires {text!r}: expected a duration such as 30m, 1h, 7d or a number of seconds") from None
    if not (amount > 0 and amount < float("inf")):  # NaN compares false both ways
        raise UsageFailure(f"--expires {text!r}: the duration must be positive")
    return round(amount * _DURATION_UNITS[unit])


def _port_rows(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Listening and declared ports as one list, one row per port."""
    declared = {d["port"]: d for d in answer.get("declared") or []}
    rows = [{"port": p["port"], "name": (declared.get(p["port"]) or {}).get("name", ""),
             "state": "listening (localhost only)" if p.get("loopback_only") else "listening",
             "declared": p["port"] in declared, "preview_url": p.get("preview_url")}
            for p in answer.get("listening") or []]
    rows += [{"port": d["port"], "name": d.get("name", ""), "state": "declared", "declared": True,
              "preview_url": d.get("preview_url")} for d in declared.values() if not d.get("listening")]
    return sorted(rows, key=lambda r: r["port"])


@cli.command()
@environment_argument
@json_option
def ports(environment: str, as_json: bool) -> None:
    """List an environment's ports: those something listens on, and those its template declares.

    PREVIEW is the browser preview's URL (members and admins); reach a port from this machine with
    'lsl forward'. The server looks every few seconds (CHECKED says when).

    \b
    Examples:
      lsl ports dev
      lsl ports dev --json
    """
    client = state().client
    env = client.find_environment(environment)
    answer = client.get(f"environments/{env['id']}/ports/")
    if as_json:
        return print_json(answer)
    if answer.get("checked_at"):
        err.print(f"[dim]{env['name']}: checked {ago(answer['checked_at'])}[/dim]")
    elif env.get("status") == "running":
        err.print(f"[dim]{env['name']}: not checked yet (the worker looks every few seconds)[/dim]")
    table(_port_rows(answer), [
        ("PORT", lambda r: r["port"]),
        ("STATE", lambda r: r["state"]),
        ("NAME", lambda r: r["name"] or "-"),
        ("PREVIEW", lambda r: r["preview_url"] or "-"),
    ], empty=f"nothing listens on a TCP port in {env['name']}" + ("" if env.get("status") == "running"
                                                                   else f" ({env.get('status')})"))
    return None


@cli.group(context_settings=CONTEXT)
def preview() -> None:
    """Public preview links: anyone holding one may open a port's preview without signing in.

    Making and revoking them needs the admin role on the environment. A link expires (default: the
    server's LSL_PREVIEW_LINK_TTL) and its URL is shown only when it is made.

    \b
    Examples:
      lsl preview link dev 3000 --expires 1h
      lsl preview links dev
      lsl preview revoke dev 5f0c…
    """


@preview.command("link")
@environment_argument
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--expires", "expires", metavar="DURATION", help="How long it works: 30m, 1h, 7d, or seconds "
              "(default: the server's LSL_PREVIEW_LINK_TTL).")
@json_option
def preview_link(environment: str, port: int, expires: str | None, as_json: bool) -> None:
    """Make a public link to PORT of an environment; prints its URL (shown this once).

    \b
    Examples:
      lsl preview link dev 3000                 # the server's default lifetime
      lsl preview link dev 3000 --expires 2h
    """
    client = state().client
    env = client.find_environment(environment)
    body: dict[str, Any] = {"port": port}
    if expires is not None:
        body["expires_in"] = _parse_duration(expires)
    answer = client.post(f"environments/{env['id']}/ports/links/", body)
    if as_json:
        return print_json(answer)
    err.print(f"{env['name']}: public link to port {port} (id {answer['id']}), until {answer['expires_at']}; "
              f"anyone with the URL may open it. It is not shown again.")
    click.echo(answer["url"])
    return None


@preview.command("links")
@environment_argument
@json_option
def preview_links(environment: str, as_json: bool) -> None:
    """List an environment's public preview links (admin role).

    \b
    Example:
      lsl preview links dev
    """
    client = state().client
    env = client.find_environment(environment)
    links = client.get(f"environments/{env['id']}/ports/").get("links")
    if links is None:
        raise AuthError(f"only admins of {env['name']} may see its public links (you are {env.get('role')})")
    if as_json:
        return print_json(links)
    table(links, [
        ("ID", lambda link: link.get("id")),
        ("PORT", lambda link: link.get("port")),
        ("TOKEN", lambda link: f"{link.get('token_hint')}…"),
        ("BY", lambda link: link.get("created_by") or "-"),
        ("EXPIRES", lambda link: link.get("expires_at")),
        ("STATE", lambda link: "active" if link.get("active") else "revoked" if link.get("revoked_at") else "expired"),
    ], empty=f"no public links on {env['name']}")
    return None


@preview.command("revoke")
@environment_argument
@click.argument("link_id", metavar="LINK_ID")
def preview_revoke(environment: str, link_id: str) -> None:
    """Revoke a public preview link (its id from 'lsl preview links'; a unique prefix will do).

    \b
    Example:
      lsl preview revoke dev 5f0c2a1e
    """
    client = state().client
    env = client.find_environment(environment)
    wanted = link_id.strip().lower()
    if not wanted:
        raise UsageFailure("LINK_ID must not be empty")
    links = client.get(f"environments/{env['id']}/ports/").get("links")
    if links is None:
        raise AuthError(f"only admins of {env['name']} may revoke its public links (you are {env.get('role')})")
    matches = [link for link in links if str(link.get("id", "")).startswith(wanted)]
    if not matches:
        raise NotFound(f"no public link {link_id!r} on {env['name']} (see 'lsl preview links {env['name']}')")
    if len(matches) > 1:
        raise UsageFailure(f"{link_id!r} matches {len(matches)} links on {env['name']}: give more of the id")
    link = matches[0]
    client.delete(f"environments/{env['id']}/ports/links/{link['id']}/")
    err.print(f"{env['name']}: revoked the public link to port {link['port']} ({link['token_hint']}…)")


# --- entry point -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LSL_DEBUG", "") not in ("", "0")
    sys.exit(run(args, debug))


def run(args: list[str], debug: bool) -> int:
    try:
        result = cli.main(args=args, prog_name="lsl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except LslError as exc:
        return _fail(exc.message, exc.exit_code, debug)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        return _fail(exc.format_message() + hint, USAGE, debug)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code, debug)
    except (click.Abort, KeyboardInterrupt):
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # `lsl list | head`: the reader left; nothing useful to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)", 1, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"lsl: error: {message}\n")
    sys.stderr.flush()
    return code
