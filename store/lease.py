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
from store.location import Location, as_location

__all__ = ["LeaseInfo", "StoreLease", "acquire_lease", "lease_location", "read_lease", "remove_lease", "wait_settings"]

DEFAULT_HEARTBEAT = 30.0


def wait_settings() -> tuple[float | None, float]:
    """How long to wait for another live writer (``$MAXA_LEASE_WAIT_S``, default: as long as it is
    alive) and how often to look again (``$MAXA_LEASE_POLL_S``, default 2 s)."""
    return settings.lease_wait_s(), settings.lease_poll_s()


def lease_location(store: str | Location) -> Location:
    """The lease beside a store: ``<name>.zarr.lease``."""
    return as_location(store).with_suffix_added(L.LEASE_SUFFIX)


def _takeover_markers(lease: Location) -> list[Location]:
    prefix = f"{lease.name}.takeover-"
    return [lease.parent / name for name, is_dir in lease.parent.children() if not is_dir and name.startswith(prefix)]


def remove_lease(store: str | Location) -> None:
    """Remove a store's lease and any takeover markers (after the store itself is gone)."""
    lease = lease_location(store)
    for loc in [lease, *_takeover_markers(lease)]:
        loc.delete()


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


def _read(loc: Location) -> LeaseInfo | None:
    """What the lease file at ``loc`` says, or ``None`` if there is none."""
    blob = loc.read_bytes()
    if blob is None:
        return None
    mtime = loc.mtime()
    try:
        d = json.loads(blob.decode())
        return LeaseInfo(owner=dict(d["owner"]), heartbeat=float(d["heartbeat"]), started=str(d.get("started", "")),
                         extra={k: v for k, v in d.items() if k not in ("owner", "heartbeat", "started", "heartbeat_utc")})
    except Exception:  # noqa: BLE001 - being written right now, or garbage: judge by its age
        return LeaseInfo(owner={"host": "?", "pid": None, "uuid": "unreadable"}, heartbeat=mtime, raw_ok=False)


def read_lease(store: str | Location) -> LeaseInfo | None:
    """The lease beside the store at ``store``, or ``None`` if nobody holds it."""
    return _read(lease_location(store))


class StoreLease:
    """The lease on one store, held by this process once :meth:`try_claim` or :meth:`take_over`
    succeeded. Release with :meth:`release` (idempotent)."""

    def __init__(self, store: str | Location, *, stale_after: float | None = None,
                 heartbeat_every: float | None = None) -> None:
        self._store = as_location(store)
        self.store_path = str(store)
        self.location = lease_location(self._store)
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
        return _read(self.location)

    def try_claim(self) -> bool:
        """Claim a free lease atomically."""
        with self._lock:
            self.held = self.location.create(self._blob())
            return self.held

    def take_over(self, stale: LeaseInfo) -> bool:
        """Replace the stale lease ``stale``; of several callers at most one succeeds."""
        marker = self.location.with_suffix_added(f".takeover-{stale.uuid}")
        if not marker.create(self._blob()):
            held = _read(marker)
            # a taker-over that died before finishing leaves its marker: expire it like a lease
            if held is not None and time.time() - held.heartbeat > self.stale_after:
                marker.delete()
            return False
        current = self.read()
        if current is None or current.uuid != stale.uuid:  # released or taken over meanwhile
            marker.delete()
            return False
        with self._lock:
            self.location.write_bytes(self._blob())
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
            self.location.write_bytes(self._blob())
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
                    remove_lease(self._store)
            except Exception:  # noqa: BLE001 - it goes stale by itself
                pass


def acquire_lease(
    store: str | Location,
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
    store_path = str(store)
    lease = StoreLease(store, stale_after=stale_after)
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
