"""Where a sweep's tasks run, and its progress display.

:class:`InlineExecutor` runs each task at once in this process (``workers=0``); :class:`DaskExecutor`
submits to a dask cluster (a local one by default). Both answer ``submit`` and ``next_done``, which
is all the sweep coordinator (:mod:`pipelines.sweep`) uses. :class:`SweepProgress` counts jobs by
kind and draws them with rich.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pipelines.sweep_jobs import FAILED, SKIP, TODO, SweepPlan

__all__ = ["InlineExecutor", "DaskExecutor", "SweepProgress"]


# -- executors ------------------------------------------------------------------------------------
class InlineFuture:
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        try:
            self._result = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported like a dask task error
            self._error = e

    def exception(self) -> BaseException | None:
        return self._error

    @property
    def status(self) -> str:
        return "error" if self._error is not None else "finished"

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        pass


class InlineExecutor:
    """Runs each task at once in this process (``workers=0``): debugging, and machines without dask."""

    def __init__(self) -> None:
        self._done: list[InlineFuture] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **_kw: Any) -> InlineFuture:
        f = InlineFuture(fn, args)
        self._done.append(f)
        return f

    def next_done(self, timeout: float | None = None) -> InlineFuture | None:
        """The next finished task; ``None`` when there is none (after sleeping ``timeout`` s, if given)."""
        if self._done:
            return self._done.pop(0)
        if timeout:
            time.sleep(timeout)
        return None

    def close(self) -> None:
        pass


class DaskExecutor:
    def __init__(self, workers: int | None, scheduler: str | None) -> None:
        from distributed import Client

        from pipelines.distributed import start_local_cluster

        self.cluster = None
        if scheduler:
            self.client = Client(scheduler, set_as_default=False)
        else:
            self.cluster = start_local_cluster(workers)
            self.client = Client(self.cluster, set_as_default=False)
        self._pending: list[Any] = []

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0, key: str = "task") -> Any:
        import uuid

        f = self.client.submit(fn, *args, priority=priority, pure=False, key=f"{key}-{uuid.uuid4().hex[:8]}")
        self._pending.append(f)
        return f

    def next_done(self, timeout: float | None = None) -> Any:
        """The next finished task; ``None`` when nothing is pending or ``timeout`` s pass first."""
        from distributed import wait

        if not self._pending:
            if timeout:
                time.sleep(timeout)
            return None
        done = [f for f in self._pending if f.done()]
        if not done:
            with self.client.as_current():
                try:
                    wait(self._pending, timeout=timeout, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    return None
            done = [f for f in self._pending if f.done()]
        f = done[0]
        self._pending.remove(f)
        return f

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


# -- progress -------------------------------------------------------------------------------------
class SweepProgress:
    def __init__(self, plan: SweepPlan, enabled: bool) -> None:
        self.enabled = enabled
        self.counts = {k: {"planned": 0, "done": 0, "skipped": 0, "failed": 0} for k in ("targets", "features", "probes")}
        for kind, jobs in (("targets", plan.targets.values()), ("features", plan.features.values()), ("probes", plan.probes)):
            for j in jobs:
                self.counts[kind]["planned"] += 1
                if j.status == SKIP:
                    self.counts[kind]["skipped"] += 1
                elif j.status == FAILED:
                    self.counts[kind]["failed"] += 1
        self.total_shards = sum(len(f.missing_shards) for f in plan.features.values() if f.status == TODO)
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._tasks = {k: self._progress.add_task(self._text(k), total=self.counts[k]["planned"],
                                                      completed=self.counts[k]["skipped"] + self.counts[k]["failed"])
                           for k in self.counts}
            self._shards = self._progress.add_task("feature shards", total=max(self.total_shards, 0))

    def _text(self, kind: str) -> str:
        c = self.counts[kind]
        return (f"{kind:<9} planned {c['planned']:>4} · done {c['done']:>4} · skipped {c['skipped']:>4} · "
                f"failed {c['failed']:>3}")

    def __enter__(self) -> "SweepProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def job(self, kind: str, outcome: str) -> None:
        self.counts[kind][outcome] += 1
        if self._progress is not None:
            self._progress.update(self._tasks[kind], description=self._text(kind), advance=1)

    def shard(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._shards, advance=n)

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, highlight=False, markup=False)
