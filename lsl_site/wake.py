"""Wake-ups between LSL's processes, so that nobody waits for a polling interval.

A *topic* ("events": a new event row; "tasks": a queued task) has listeners in any number of
processes. `notify(topic)` wakes them all:
- on this host, through a Unix datagram socket per listener in `VAR_DIR/wake/` (the default,
  single-machine setup: daphne and the worker share var/);
- on every host, through Redis pub/sub when LSL_REDIS_URL is set.

Wake-ups carry no data and may be lost (a full socket buffer means the listener is awake
already; a Redis outage means none arrive): listeners still poll the database, only slower.
A listener killed with -9 leaves its socket file behind; the next notify finds nobody there
(ECONNREFUSED) and removes it.

Threading: `notify` may be called from any thread. A `Listener` belongs to one thread or loop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)


def _dir() -> Path:
    path = Path(settings.VAR_DIR) / "wake"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Listener:
    """This process's wake-up socket for one topic (fileno() for select/add_reader)."""

    def __init__(self, topic: str) -> None:
        self.path = _dir() / f"{topic}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        """Read every pending wake-up; returns how many."""
        count = 0
        while True:
            try:
                self.sock.recv(64)
                count += 1
            except (BlockingIOError, InterruptedError):
                return count
            except OSError:
                return count

    def wait(self, timeout: float) -> int:
        """Block up to `timeout` seconds for a wake-up (for threads); returns how many were read (each
        notify sends one), 0 if none came."""
        import select

        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            return max(self.drain(), 1)
        return 0

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def notify(topic: str) -> None:
    _notify_local(topic)
    if settings.REDIS_URL:
        _notify_redis(topic)


_sender_lock = threading.Lock()
_sender: socket.socket | None = None


def _sending_socket() -> socket.socket:
    """One unbound datagram socket per process for every notify (sendto is thread-safe): a wake-up
    is on the path of every write a user waits for, so it costs as few system calls as it can."""
    global _sender
    if _sender is None:
        with _sender_lock:
            if _sender is None:
                sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sender.setblocking(False)
                _sender = sender
    return _sender


def _notify_local(topic: str) -> None:
    prefix = f"{topic}-"
    try:
        entries = list(os.scandir(Path(settings.VAR_DIR) / "wake"))
    except FileNotFoundError:
        return  # no wake directory yet: nobody listens
    sender = _sending_socket()
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".sock")):
            continue
        try:
            sender.sendto(b"1", entry.path)
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full of wake-ups it has not read: it is awake
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                try:
                    os.unlink(entry.path)  # its process died without cleaning up
                except FileNotFoundError:
                    pass


_redis_lock = threading.Lock()
_redis_client: object | None = None
_redis_down_until = 0.0


def redis_channel(topic: str) -> str:
    return f"lsl:{topic}"


def _notify_redis(topic: str) -> None:
    """Best effort: a Redis outage slows other hosts down to their polling interval, nothing more."""
    global _redis_client, _redis_down_until
    if time.monotonic() < _redis_down_until:
        return
    try:
        with _redis_lock:
            if _redis_client is None:
                import redis

                _redis_client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
        _redis_client.publish(redis_channel(topic), b"1")  # type: ignore[attr-defined]
    except Exception as exc:  # ConnectionError, timeouts, DNS: all mean "not now"
        _redis_down_until = time.monotonic() + 2.0
        log.warning("wake: Redis publish failed (%s); other hosts will poll", exc.__class__.__name__)


def relay_redis_in_thread(topic: str, stopping: threading.Event) -> None:
    """For threaded listeners (the worker): pass Redis wake-ups from other hosts on to this host's
    listeners of `topic`; reconnects with backoff. Does nothing without Redis."""
    if not settings.REDIS_URL:
        return

    def run() -> None:
        import redis

        backoff = 0.5
        while not stopping.is_set():
            try:
                client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
                pubsub = client.pubsub()
                pubsub.subscribe(redis_channel(topic))
                backoff = 0.5
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        _notify_local(topic)
            except Exception as exc:
                log.info("wake: Redis listener for %s lost (%s); retrying", topic, exc.__class__.__name__)
                stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    threading.Thread(target=run, name=f"lsl-wake-{topic}", daemon=True).start()
