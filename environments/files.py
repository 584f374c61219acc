"""File transfer into and out of an environment.

Every byte goes through a process running *as the environment user* (`cat`, `tar`),
so the kernel enforces exactly what that user could do in a shell: no upload can
write as root, no download can read a file the user could not. On top of that:

* a path must be absolute, normalised (no `.`, `..`, `//`) and inside the allowed
  roots: /workspace, the user's home, /tmp and the environment's mount targets;
* the path is also resolved *inside the container* (symlinks followed, as the
  user) and the result must still be inside the roots;
* writes into a read-only mount are refused;
* an uploaded tar is checked before anything is extracted: absolute member names,
  `..`, links pointing outside the extraction directory and device files are refused.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from lsl_site.errors import InvalidInput

from environments import nodes, runtime, services
from environments.models import Environment

CHUNK = 256 * 1024
TAR_TYPES = ("application/x-tar", "application/tar")


class PathRefused(InvalidInput):
    """A path (or tar member) that is not allowed: a 400 with {"path": [reason]}."""

    def __init__(self, message: str, field: str = "path") -> None:
        super().__init__({field: [message]})


class TransferFailed(runtime.EngineError):
    """The command inside the environment failed (permission denied, no space...): a 409 with its message."""


def allowed_roots(env: Environment) -> list[str]:
    home = services.shell_environment(env)["HOME"]
    roots = [runtime.WORKSPACE_PATH, home, "/tmp", *(m["target"] for m in env.mounts)]
    return list(dict.fromkeys(posixpath.normpath(r) for r in roots))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_path(env: Environment, path: str | None, *, write: bool) -> str:
    """The path if allowed (lexically); raises PathRefused saying why not."""
    if not path:
        raise PathRefused("give the path: ?path=/workspace/...")
    if "\x00" in path:
        raise PathRefused("the path contains a NUL byte")
    if not path.startswith("/"):
        raise PathRefused(f"{path!r} is not absolute (it must start with '/')")
    if ".." in path.split("/"):
        raise PathRefused(f"{path!r}: '..' is not allowed")
    trimmed = path.rstrip("/") or "/"
    if posixpath.normpath(trimmed) != trimmed:
        raise PathRefused(f"{path!r} is not normalised (write it as {posixpath.normpath(trimmed)!r})")
    roots = allowed_roots(env)
    if not any(_inside(trimmed, root) for root in roots):
        raise PathRefused(f"{path!r} is outside the allowed locations: {', '.join(roots)}")
    if write:
        for mount in env.mounts:
            if mount.get("read_only") and _inside(trimmed, mount["target"]):
                raise PathRefused(f"{path!r} is in a read-only mount ({mount['target']})")
    return trimmed


# Prints "TYPE SIZE MODE" then the resolved path (symlinks followed; a missing tail kept as is).
_PROBE = r'''
p="$1"; rest=""
if [ -d "$p" ]; then t=directory; s="$(du -sk "$p" 2>/dev/null | cut -f1)"; s=$(( ${s:-0} * 1024 )); m="$(stat -c %a "$p")"
elif [ -f "$p" ]; then t=file; s="$(stat -c %s "$p")"; m="$(stat -c %a "$p")"
elif [ -e "$p" ]; then t=other; s=0; m=0
else t=missing; s=0; m=0
fi
echo "$t $s $m"
while [ ! -e "$p" ] && [ ! -L "$p" ] && [ "$p" != / ]; do rest="/${p##*/}$rest"; p="${p%/*}"; [ -n "$p" ] || p=/; done
r="$(readlink -f "$p")" || exit 3
[ "$r" = / ] && r=""
echo "$r$rest"
'''


@dataclass(frozen=True)
class Probe:
    kind: str  # file, directory, other, missing
    size: int
    mode: int
    resolved: str


def probe(env: Environment, path: str) -> Probe:
    user, user_env = services.shell_identity(env)
    result = nodes.engine_for(env).exec_run(env.container_id, ["/bin/sh", "-c", _PROBE, "lsl-probe", path], user=user, environment=user_env)
    lines = result.output.decode(errors="replace").splitlines()
    if result.exit_code != 0 or len(lines) < 2:
        raise PathRefused(f"{path!r}: cannot resolve it inside the environment")
    kind, size, mode = (lines[0].split() + ["0", "0"])[:3]
    return Probe(kind=kind, size=int(size or 0), mode=int(mode or "0", 8), resolved=lines[1] or "/")


def _check_resolved(env: Environment, path: str, found: Probe) -> None:
    if not any(_inside(found.resolved, root) for root in allowed_roots(env)):
        raise PathRefused(f"{path!r} leads (through a symbolic link) to {found.resolved!r}, outside the allowed locations")


def _require_running(env: Environment) -> None:
    from lsl_site.errors import Conflict

    if env.status != "running" or not env.container_id:
        raise Conflict(f"the environment is {env.status}, not running: start it to transfer files", code="not_running")


# --- download -------------------------------------------------------------------------

@dataclass
class Download:
    kind: str  # "file" or "tar"
    name: str  # a file name for Content-Disposition
    size: int | None  # exact for files, estimated for tar
    mode: int
    chunks: Iterator[bytes]


def download(env: Environment, path: str | None, *, as_tar: bool = False) -> Download:
    """Stream a file (raw bytes) or a directory (tar, entries under its base name)."""
    _require_running(env)
    path = check_path(env, path, write=False)
    found = probe(env, path)
    if found.kind == "missing":
        from rest_framework.exceptions import NotFound

        raise NotFound(f"{path!r}: no such file or directory in the environment")
    _check_resolved(env, path, found)
    user, user_env = services.shell_identity(env)
    name = posixpath.basename(path) or "root"
    if found.kind == "file" and not as_tar:
        output = nodes.engine_for(env).exec_output(env.container_id, ["cat", path], user=user, environment=user_env)
        return Download("file", name, found.size, found.mode, _checked(output, path))
    if found.kind not in ("file", "directory"):
        raise PathRefused(f"{path!r} is neither a file nor a directory")
    parent = posixpath.dirname(path) or "/"
    output = nodes.engine_for(env).exec_output(env.container_id, ["tar", "-c", "-f", "-", "-C", parent, name], user=user, environment=user_env)
    return Download("tar", f"{name}.tar", found.size or None, found.mode, _checked(output, path))


def _checked(output: runtime.ExecOutput, path: str) -> Iterator[bytes]:
    """Stdout chunks; a failure after the headers went out can only cut the stream (the client sees it short)."""
    yield from output.chunks
    code = output.exit_code()
    if code != 0:
        message = bytes(output.stderr).decode(errors="replace").strip()
        raise TransferFailed(f"reading {path!r} failed (exit {code}): {message}")


# --- upload ---------------------------------------------------------------------------

@dataclass
class Uploaded:
    path: str
    kind: str  # "file" or "directory"
    bytes: int
    entries: int


def _spooled(body: IO[bytes]) -> tuple[IO[bytes], int]:
    """The body as a seekable file (request bodies under ASGI already are: spooled to disk) and its size."""
    seekable = getattr(body, "seekable", None)
    if seekable is not None and seekable():
        try:
            start = body.tell()
            body.seek(0, os.SEEK_END)
            size = body.tell() - start
            body.seek(start)
            return body, size
        except (OSError, ValueError):
            pass
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    shutil.copyfileobj(body, spool, CHUNK)
    size = spool.tell()
    spool.seek(0)
    return spool, size


def _stream(body: IO[bytes], counter: list[int]) -> Iterator[bytes]:
    while True:
        chunk = body.read(CHUNK)
        if not chunk:
            return
        counter[0] += len(chunk)
        yield chunk


def check_tar_member(member: tarfile.TarInfo) -> str | None:
    """Why this member may not be extracted, or None."""
    name = member.name
    if name.startswith("/") or posixpath.isabs(name):
        return f"{name!r}: absolute member names are not allowed"
    if ".." in name.split("/"):
        return f"{name!r}: '..' is not allowed in member names"
    if member.isdev():
        return f"{name!r}: device files and FIFOs are not allowed"
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            return f"{name!r}: symbolic link to an absolute path ({target!r}) is not allowed"
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if joined == ".." or joined.startswith("../"):
            return f"{name!r}: symbolic link leads outside the upload ({target!r})"
    if member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            return f"{name!r}: hard link to {target!r} is not allowed"
    return None


def _validate_tar(body: IO[bytes]) -> int:
    """Read every member header (skipping data) and refuse the archive at the first bad member."""
    start = body.tell()
    count = 0
    try:
        with tarfile.open(fileobj=body, mode="r:") as archive:
            for member in archive:
                problem = check_tar_member(member)
                if problem:
                    raise PathRefused(f"refused archive member {problem}", field="archive")
                count += 1
    except tarfile.TarError as exc:
        raise PathRefused(f"not a valid (uncompressed) tar archive: {exc}", field="archive") from None
    body.seek(start)
    return count


# Paths are absolute (checked above), so none can be taken for an option.
# umask 000 so tar -p restores the archived modes exactly (busybox tar applies the umask for non-root).
_EXTRACT = 'mkdir -p "$1" && cd "$1" && umask 000 && exec tar -x -o -p -f -'
_WRITE = 'mkdir -p "$(dirname "$1")" && cat > "$1" && { [ -z "$2" ] || chmod "$2" "$1"; }'


def upload(env: Environment, path: str | None, body: IO[bytes], *, as_tar: bool, mode: str | None = None) -> Uploaded:
    """Write a single file at `path`, or extract a tar archive into the directory `path` (created if missing)."""
    _require_running(env)
    path = check_path(env, path, write=True)
    if mode is not None and (not mode.isdigit() or any(c not in "01234567" for c in mode) or len(mode) > 4):
        raise PathRefused(f"mode {mode!r} is not an octal file mode such as 644 or 0755", field="mode")
    if not as_tar and path in allowed_roots(env):
        raise PathRefused(f"{path!r} is a directory: upload a tar archive into it, or name a file inside it")
    found = probe(env, path)
    _check_resolved(env, path, found)
    if as_tar and found.kind not in ("directory", "missing"):
        raise PathRefused(f"{path!r} exists and is not a directory: a tar archive is extracted into a directory")
    if not as_tar and found.kind == "directory":
        raise PathRefused(f"{path!r} is a directory: name the file to write, or upload a tar archive")
    user, user_env = services.shell_identity(env)
    body, _size = _spooled(body)
    entries = _validate_tar(body) if as_tar else 1
    counter = [0]
    if as_tar:
        command = ["/bin/sh", "-c", _EXTRACT, "lsl-upload", path]
    else:
        command = ["/bin/sh", "-c", _WRITE, "lsl-upload", path, mode or ""]
    result = nodes.engine_for(env).exec_with_stdin(env.container_id, command, _stream(body, counter), user=user, environment=user_env)
    if result.exit_code != 0:
        message = result.output.decode(errors="replace").strip()
        raise TransferFailed(f"writing {path!r} failed (exit {result.exit_code}): {message}")
    return Uploaded(path=path, kind="directory" if as_tar else "file", bytes=counter[0], entries=entries)


def is_tar_request(content_type: str | None, fmt: str | None) -> bool:
    return (fmt or "").lower() == "tar" or (content_type or "").split(";")[0].strip().lower() in TAR_TYPES


def content_disposition(name: str) -> str:
    from urllib.parse import quote

    safe = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(name)}"


def as_async(chunks: Iterator[bytes]) -> Any:
    """An async iterator over a blocking one (each step on a worker thread): Django streams it without
    buffering the whole response, which it does for a plain iterator under ASGI."""
    from asgiref.sync import sync_to_async

    sentinel = object()

    def step() -> Any:
        return next(chunks, sentinel)

    async def generate() -> Any:
        while True:
            chunk = await sync_to_async(step, thread_sensitive=False)()
            if chunk is sentinel:
                return
            yield chunk

    return generate()
