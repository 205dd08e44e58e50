"""A writer lease: one writer per store at a time, so two people asking for the same extraction
share one store instead of computing it twice.

The lease is a small JSON object beside the store, ``<name>.zarr.lease``::

    {"owner": {"host": ..., "pid": ..., "uuid": ...}, "started": ..., "heartbeat": <unix time>, ...}

* **Claiming is atomic.** Local disks: ``os.open(O_CREAT | O_EXCL)``. Object stores: a conditional
  put (``If-None-Match: *``, s3fs ``pipe_file(mode="create")``), honoured by AWS S3 (since 2024),
  MinIO and moto. An S3-compatible server that ignores the condition gives a weaker guarantee: two
  writers may both claim and both compute shards; the store still is never corrupt, because both
  write identical whole shards, flags only after data and the completion mark last.
* **Heartbeat.** The holder rewrites the lease when each shard is on disk and from a background
  thread every ``heartbeat_every`` seconds (default 30).
* **Waiting.** A second writer that finds a live lease polls (``poll_every``, default 2 s), saying
  once ``waiting for <owner> extracting <store>…``, until the store is complete (it then reuses
  it), the lease is released (it claims it), the lease goes stale, or ``wait_timeout`` passes
  (default: no limit; ``$MAXA_LEASE_WAIT_S``).
* **Stale.** No heartbeat for ``stale_after`` seconds (default 300; ``$MAXA_LEASE_STALE_S``), or an
  owner pid that is dead on this same host. The lease excludes other processes only: a lease
  held by this same process (a writer never closed) is taken over at once. A stale lease is taken over through a second atomic
  claim, ``<lease>.takeover-<stale uuid>``, so that of several waiters exactly one takes over; it
  then writes only the shards not flagged done.

Timestamps are the writers' clocks: hosts sharing a root should keep them roughly in sync (NTP),
well within ``stale_after``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from runtime import settings
from store import _layout as L
from runtime.errors import StoreBusyError

__all__ = ["LeaseInfo", "StoreLease", "acquire_lease", "lease_path", "read_lease", "wait_settings"]

DEFAULT_HEARTBEAT = 30.0


def wait_settings() -> tuple[float | None, float]:
    """How long to wait for another live writer (``$MAXA_LEASE_WAIT_S``, default: as long as it is
    alive) and how often to look again (``$MAXA_LEASE_POLL_S``, default 2 s)."""
    return settings.lease_wait_s(), settings.lease_poll_s()


def lease_path(store_path: str) -> str:
    return str(store_path).rstrip("/") + L.LEASE_SUFFIX


@dataclass
class LeaseInfo:
    """What a lease file says: who holds the store and when they last showed signs of life."""

    owner: dict[str, Any]
    heartbeat: float
    started: str = ""
    raw_ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        return str(self.owner.get("uuid", ""))

    def describe(self) -> str:
        ago = max(0.0, time.time() - self.heartbeat)
        return (f"pid {self.owner.get('pid')} on {self.owner.get('host')} (lease {self.uuid[:8]}, "
                f"last heartbeat {ago:.0f} s ago)")

    def stale_reason(self, stale_after: float) -> str | None:
        """Why this lease is stale, or ``None`` if it is live."""
        age = time.time() - self.heartbeat
        if age > stale_after:
            return f"no heartbeat for {age:.0f} s"
        if self.owner.get("host") == socket.gethostname():
            if not _pid_alive(self.owner.get("pid")):
                return f"owner pid {self.owner.get('pid')} is not running on this host"
            if self.owner.get("pid") == os.getpid():
                return "held by an earlier writer in this same process"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "owner": self.owner, "started": self.started, "heartbeat": self.heartbeat,
                "heartbeat_utc": datetime.fromtimestamp(self.heartbeat, timezone.utc).isoformat(timespec="seconds")}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, TypeError, ValueError):
        return True  # exists but not ours, or unknowable: assume alive
    return True


# -- storage backends: local (os) or fsspec ------------------------------------------------------
class _Backend:
    def __init__(self, path: str, storage_options: L.StorageOptions) -> None:
        self.remote = L.is_remote(path)
        if self.remote:
            self.fs, self.path = L.fs_path(path, storage_options)
        else:
            self.fs, self.path = None, path

    def create(self, path: str, data: bytes) -> bool:
        """Write ``data`` to ``path`` only if nothing is there (atomic); ``False`` if taken."""
        if not self.remote:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without exclusive create: weaker, check-then-put
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        finally:
            self.fs.invalidate_cache(path)
        return True

    def overwrite(self, path: str, data: bytes) -> None:
        if not self.remote:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache(path)

    def read(self, path: str) -> tuple[bytes, float] | None:
        """``(contents, modification time)`` or ``None`` if absent."""
        try:
            if not self.remote:
                with open(path, "rb") as f:
                    return f.read(), os.path.getmtime(path)
            self.fs.invalidate_cache(path)
            # a PUT is atomic, so an unreadable lease object is garbage, not half-written: stale
            return self.fs.cat_file(path), 0.0
        except (FileNotFoundError, IsADirectoryError):
            return None

    def delete(self, path: str) -> None:
        try:
            if not self.remote:
                os.remove(path)
            else:
                self.fs.rm_file(path)
                self.fs.invalidate_cache(path)
        except FileNotFoundError:
            pass

    def takeover_markers(self, lease: str) -> list[str]:
        if not self.remote:
            d, base = os.path.split(lease)
            try:
                names = os.listdir(d or ".")
            except FileNotFoundError:
                return []
            return [os.path.join(d, n) for n in names if n.startswith(base + ".takeover-")]
        self.fs.invalidate_cache(lease)
        return [p for p in self.fs.glob(lease + ".takeover-*")]


def _parse(blob: bytes | None, mtime: float) -> LeaseInfo | None:
    if blob is None:
        return None
    try:
        d = json.loads(blob.decode())
        return LeaseInfo(owner=dict(d["owner"]), heartbeat=float(d["heartbeat"]), started=str(d.get("started", "")),
                         extra={k: v for k, v in d.items() if k not in ("owner", "heartbeat", "started", "heartbeat_utc")})
    except Exception:  # noqa: BLE001 - being written right now, or garbage: judge by its age
        return LeaseInfo(owner={"host": "?", "pid": None, "uuid": "unreadable"}, heartbeat=mtime, raw_ok=False)


def read_lease(store_path: str, storage_options: L.StorageOptions = None) -> LeaseInfo | None:
    """The lease beside the store at ``store_path``, or ``None`` if nobody holds it."""
    b = _Backend(lease_path(store_path), storage_options)
    got = b.read(b.path)
    return _parse(*got) if got else None


class StoreLease:
    """The lease on one store, held by this process once :meth:`try_claim` or :meth:`take_over`
    succeeded. Release with :meth:`release` (idempotent)."""

    def __init__(self, store_path: str, storage_options: L.StorageOptions = None, *,
                 stale_after: float | None = None, heartbeat_every: float | None = None) -> None:
        self.store_path = str(store_path)
        self.url = lease_path(self.store_path)
        self._b = _Backend(self.url, storage_options)
        self.path = self._b.path
        self.stale_after = stale_after if stale_after is not None else settings.lease_stale_s()
        self.heartbeat_every = heartbeat_every or min(DEFAULT_HEARTBEAT, max(0.5, self.stale_after / 4))
        self.info = LeaseInfo(owner={"host": socket.gethostname(), "pid": os.getpid(), "uuid": uuid.uuid4().hex},
                              heartbeat=time.time(), started=_now(),
                              extra={"store": self.store_path, "argv": " ".join(sys.argv)[:500]})
        self.held = False
        self.took_over = False
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _blob(self) -> bytes:
        self.info.heartbeat = time.time()
        return json.dumps(self.info.to_dict(), sort_keys=True).encode()

    def read(self) -> LeaseInfo | None:
        got = self._b.read(self.path)
        return _parse(*got) if got else None

    def try_claim(self) -> bool:
        """Claim a free lease atomically."""
        with self._lock:
            self.held = self._b.create(self.path, self._blob())
            return self.held

    def take_over(self, stale: LeaseInfo) -> bool:
        """Replace the stale lease ``stale``; of several callers at most one succeeds."""
        marker = f"{self.path}.takeover-{stale.uuid}"
        if not self._b.create(marker, self._blob()):
            got = self._b.read(marker)
            held = _parse(*got) if got else None
            # a taker-over that died before finishing leaves its marker: expire it like a lease
            if held is not None and time.time() - held.heartbeat > self.stale_after:
                self._b.delete(marker)
            return False
        current = self.read()
        if current is None or current.uuid != stale.uuid:  # released or taken over meanwhile
            self._b.delete(marker)
            return False
        with self._lock:
            self._b.overwrite(self.path, self._blob())
            self.held = self.took_over = True
        return True

    def refresh(self) -> bool:
        """Rewrite the heartbeat; ``False`` (and :attr:`lost`) if someone else took the lease over."""
        if not self.held:
            return False
        with self._lock:
            current = self.read()
            if current is not None and current.uuid != self.info.uuid:
                if not self.lost:
                    print(f"maxa: lost the lease on {self.store_path} to {current.describe()}; "
                          "finishing anyway (shards are identical)", file=sys.stderr)
                self.lost = True
                return False
            self._b.overwrite(self.path, self._blob())
            return True

    def start_heartbeat(self) -> None:
        if self._thread is not None:
            return

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_every) and not self.lost:
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a missed beat is not fatal; the next one may work
                    pass

        self._thread = threading.Thread(target=beat, name="maxa-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (if it is still ours) and takeover markers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.held:
            return
        with self._lock:
            self.held = False
            try:
                current = self.read()
                if current is None or current.uuid == self.info.uuid:
                    self._b.delete(self.path)
                    for m in self._b.takeover_markers(self.path):
                        self._b.delete(m)
            except Exception:  # noqa: BLE001 - it goes stale by itself
                pass


def acquire_lease(
    store_path: str,
    storage_options: L.StorageOptions = None,
    *,
    is_done: Callable[[], bool],
    wait_timeout: float | None = None,
    poll_every: float | None = None,
    stale_after: float | None = None,
    log: Callable[[str], None] | None = None,
) -> StoreLease | None:
    """Hold the lease on ``store_path``, waiting while another live writer holds it.

    Returns ``None`` as soon as ``is_done()`` says the store is complete (reuse it, nothing to
    write); raises :class:`StoreError` when ``wait_timeout`` seconds pass.
    """
    lease = StoreLease(store_path, storage_options, stale_after=stale_after)
    env_timeout, env_poll = wait_settings()
    timeout = wait_timeout if wait_timeout is not None else env_timeout
    poll = poll_every if poll_every is not None else env_poll
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    start = time.monotonic()
    announced = ""
    while True:
        if is_done():
            return None
        if lease.try_claim():
            return lease
        other = lease.read()
        if other is None:  # released between our claim and our read: claim again
            time.sleep(0.05)
            continue
        reason = other.stale_reason(lease.stale_after)
        if reason is not None:
            if lease.take_over(other):
                say(f"maxa: took over the stale lease on {store_path} ({reason}); writing the missing shards")
                return lease
            time.sleep(min(poll, 0.2))
            continue
        if timeout is not None and time.monotonic() - start >= timeout:
            raise StoreBusyError(
                f"timed out after {timeout:.0f} s waiting for {other.describe()} extracting {store_path}; "
                "wait longer ($MAXA_LEASE_WAIT_S), or if that writer is gone, wait for its lease to go stale "
                f"(no heartbeat for {lease.stale_after:.0f} s, $MAXA_LEASE_STALE_S).",
                holder=other.describe(),
            )
        if announced != other.uuid:
            say(f"maxa: waiting for {other.describe()} extracting this store… ({store_path})")
            announced = other.uuid
        time.sleep(poll)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
