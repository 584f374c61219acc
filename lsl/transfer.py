"""`lsl cp`: copy files and directories to and from an environment over `/api/v1/environments/{id}/files/`.

Uploads stream the body (a file as is, a directory as a tar spooled to a temporary
file first); downloads stream to disk, and a directory's tar is checked member by
member before anything is extracted. A progress bar (stderr, terminals only) shows
transfers larger than 1 MiB.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lsl.client import Client
from lsl.errors import LslError, ServerError, UsageFailure
from lsl.output import err, human_bytes

PROGRESS_THRESHOLD = 1024 * 1024
CHUNK = 256 * 1024
# NAME:/abs/path — an environment name (letters, digits, '_', '.', '-') or id, then an absolute path.
REMOTE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(/.*)$")


@dataclass
class Remote:
    environment: str
    path: str


def parse_side(text: str) -> Remote | str:
    match = REMOTE_RE.match(text)
    return Remote(match.group(1), match.group(2)) if match else text


@contextmanager
def progress_bar(label: str, total: int | None) -> Iterator[Any]:
    """Yields `advance(n)`; draws a bar on a terminal for transfers above the threshold, else nothing."""
    show = err.is_terminal and (total is None or total > PROGRESS_THRESHOLD)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True, disable=not show)
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


class _Reader:
    """A file object for `requests` that reports progress; `__len__` makes requests send Content-Length."""

    def __init__(self, handle: IO[bytes], size: int, advance: Any) -> None:
        self.handle, self.size, self.advance = handle, size, advance

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.handle.read(CHUNK if n is None or n < 0 else n)
        self.advance(len(data))
        return data


def _put(client: Client, env: dict[str, Any], path: str, handle: IO[bytes], size: int, label: str,
         *, tar: bool = False, mode: int | None = None) -> dict[str, Any]:
    params: dict[str, str] = {"path": path}
    if mode is not None:
        params["mode"] = f"{mode:04o}"
    headers = {"Content-Type": "application/x-tar" if tar else "application/octet-stream", "Content-Length": str(size)}
    with progress_bar(label, size) as advance:
        response = client.request("PUT", f"environments/{env['id']}/files/", params=params, headers=headers,
                                  data=_Reader(handle, size, advance), timeout=(5.0, None))
    try:
        return dict(response.json())
    except ValueError:
        return {}


def upload(client: Client, local: str, remote: Remote, recursive: bool) -> str:
    source = Path(local)
    if not source.exists():
        raise UsageFailure(f"{local}: no such file or directory")
    env = client.find_environment(remote.environment)
    if source.is_dir():
        if not recursive:
            raise UsageFailure(f"{local} is a directory (use -r to copy it)")
        # The tar holds the directory under its base name; the server extracts it into the destination directory.
        target = remote.path.rstrip("/") or "/"
        base = source.resolve().name
        with tempfile.TemporaryFile(prefix="lsl-cp-") as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as archive:
                archive.add(str(source), arcname=base, recursive=True)
            size = spool.tell()
            spool.seek(0)
            result = _put(client, env, target, spool, size, f"{base}/ → {env['name']}:{target}", tar=True)
        where = posixpath.join(target, base)
        return f"{local} → {env['name']}:{where} ({result.get('entries', '?')} entries, {human_bytes(size)})"
    if not source.is_file():
        raise UsageFailure(f"{local}: not a regular file")
    target = remote.path
    if target.endswith("/"):
        target = target + source.name
    size = source.stat().st_size
    mode = stat.S_IMODE(source.stat().st_mode)
    with source.open("rb") as handle:
        _put(client, env, target, handle, size, f"{source.name} → {env['name']}:{target}", mode=mode)
    return f"{local} → {env['name']}:{target} ({human_bytes(size)})"


def download(client: Client, remote: Remote, local: str, recursive: bool) -> str:
    env = client.find_environment(remote.environment)
    response = client.request("GET", f"environments/{env['id']}/files/", params={"path": remote.path},
                              stream=True, timeout=(5.0, None))
    with response:
        kind = response.headers.get("X-LSL-File-Type", "file")
        name = posixpath.basename(remote.path.rstrip("/")) or "root"
        if kind == "directory":
            if not recursive:
                raise UsageFailure(f"{env['name']}:{remote.path} is a directory (use -r to copy it)")
            return _download_directory(response, env, remote, Path(local), name)
        dest = Path(local)
        if dest.is_dir() or local.endswith("/"):
            dest.mkdir(parents=True, exist_ok=True)
            dest = dest / name
        expected = _int(response.headers.get("Content-Length"))
        written = _stream_to(response, dest, expected, f"{env['name']}:{remote.path} → {dest}")
        if expected is not None and written != expected:
            raise ServerError(f"the download was cut short ({written} of {expected} bytes); {dest} is incomplete")
        mode = response.headers.get("X-LSL-Mode")
        if mode:
            try:
                os.chmod(dest, int(mode, 8) & 0o7777)
            except ValueError:
                pass
    return f"{env['name']}:{remote.path} → {dest} ({human_bytes(written)})"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream_to(response: Any, dest: Path, total: int | None, label: str) -> int:
    written = 0
    try:
        with dest.open("wb") as handle, progress_bar(label, total) as advance:
            for chunk in response.iter_content(CHUNK):
                handle.write(chunk)
                written += len(chunk)
                advance(len(chunk))
    except OSError as exc:
        if isinstance(exc, (IsADirectoryError, PermissionError, FileNotFoundError)):
            raise LslError(f"{dest}: {exc.strerror}") from None
        raise LslError(f"download failed: {exc}") from None
    return written


def _download_directory(response: Any, env: dict[str, Any], remote: Remote, dest: Path, name: str) -> str:
    """The tar's entries are under the directory's base name: it lands in `dest/NAME` (dest created if missing)."""
    estimate = _int(response.headers.get("X-LSL-Size-Estimate"))
    with tempfile.TemporaryFile(prefix="lsl-cp-") as spool:
        size = 0
        try:
            with progress_bar(f"{env['name']}:{remote.path} → {dest}", estimate) as advance:
                for chunk in response.iter_content(CHUNK):
                    spool.write(chunk)
                    size += len(chunk)
                    advance(len(chunk))
        except Exception as exc:  # noqa: BLE001 - a connection cut midway
            raise ServerError(f"the download was cut short after {human_bytes(size)}: {exc}") from None
        spool.seek(0)
        try:
            with tarfile.open(fileobj=spool, mode="r:") as archive:
                members = archive.getmembers()
                problems = [problem for member in members if (problem := unsafe_member(member))]
                if problems:
                    raise LslError("refusing to extract the archive: " + "; ".join(problems[:5]))
                dest.mkdir(parents=True, exist_ok=True)
                archive.extractall(dest, members=members, filter=_keep_modes)
        except tarfile.TarError as exc:
            raise ServerError(f"the server sent a broken archive ({exc})") from None
    return f"{env['name']}:{remote.path} → {dest / name} ({len(members)} entries, {human_bytes(size)})"


def _keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" filter (no escaping the destination), but keeping group/other write bits (no setuid)."""
    checked = tarfile.tar_filter(member, dest)
    if member.mode is None or member.issym() or member.islnk():
        return checked
    return checked.replace(mode=member.mode & 0o1777, deep=False)


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be extracted (absolute, '..', links leaving the tree, devices), or None."""
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        return f"{name!r}: absolute member name"
    if ".." in name.replace("\\", "/").split("/"):
        return f"{name!r}: '..' in member name"
    if member.isdev():
        return f"{name!r}: device file or FIFO"
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            return f"{name!r}: symbolic link to an absolute path"
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if joined == ".." or joined.startswith("../"):
            return f"{name!r}: symbolic link out of the archive"
    if member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            return f"{name!r}: hard link out of the archive"
    return None
