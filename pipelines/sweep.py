"""``maxa sweep``: run a sweep file's extractions and probes on dask, skipping what is already done.

Planning (:mod:`pipelines.sweep_plan`) gives a job graph: target stores and feature stores (each once,
train and eval splits), then probes that need two feature stores and two target stores. Execution
submits what is ready and follows completions:

* a **target store** is one task (``build_target_store`` in a worker, under its own lease);
* a **feature store** is created by this coordinator, which holds its lease, then split into one task
  per missing shard; each shard is written whole by one worker (zarr shards must have one writer),
  which opens the store without claiming the lease; when every shard is flagged done the
  coordinator finalizes the store (complete) and releases the lease;
* a **probe** is one task once its four stores are complete; it appends its result atomically.

A job that fails (bad dataset root, weights that cannot be had, a crash) fails its dependents only;
everything else runs, and :class:`SweepSummary` lists each failure in one line. Stopped at any
point and started again, a sweep skips complete stores and recorded probes, and resumes partial
stores by shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.sweep_plan import (
    FeatureJob,
    ProbeJob,
    SweepFile,
    SweepPlan,
    TargetJob,
    _first_line,
    load_sweep,
    plan_sweep,
)
from store.errors import MaxaError

__all__ = ["SweepSummary", "Failure", "run_sweep", "format_plan", "plan_from_file"]


@dataclass
class Failure:
    job: str
    reason: str

    def line(self) -> str:
        return f"{self.job}: {self.reason}"


@dataclass
class SweepSummary:
    """What a sweep did (or, with ``dry_run``, would do)."""

    plan: SweepPlan
    dry_run: bool = False
    extractions: int = 0  # stores written (or finished) in this run: feature + target
    shards: int = 0  # feature shards written in this run
    probes: int = 0  # probes trained in this run
    skipped: int = 0  # jobs found done in the store root
    failures: list[Failure] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def planned(self) -> int:
        return len(self.plan.targets) + len(self.plan.features) + len(self.plan.probes)

    def failure_lines(self) -> list[str]:
        return [f.line() for f in self.failures]

    def describe(self) -> str:
        what = "would run" if self.dry_run else "ran"
        if self.dry_run:
            c = self.plan.counts()
            return (f"sweep {self.plan.sweep.name}: {self.planned} jobs planned; {what} "
                    f"{c['targets']['todo'] + c['features']['todo']} extractions and {c['probes']['todo']} probes; "
                    f"{self.skipped} already done; {len(self.failures)} cannot run")
        return (f"sweep {self.plan.sweep.name}: {self.planned} jobs planned; {what} {self.extractions} extractions "
                f"({self.shards} shards) and {self.probes} probes; {self.skipped} already done; "
                f"{len(self.failures)} failed ({self.seconds:.0f} s)")


def plan_from_file(path: str | Path, store_root: str | Path, *, data_roots: Any = None,
                   storage_options: dict[str, Any] | None = None) -> SweepPlan:
    """Validate the sweep file, then plan it against ``store_root``."""
    return plan_sweep(load_sweep(path, data_roots), store_root, storage_options=storage_options)


# -- executors ------------------------------------------------------------------------------------
class _InlineFuture:
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


class _Inline:
    """Runs each task at once in this process (``workers=0``): debugging, and machines without dask."""

    def __init__(self) -> None:
        self._done: list[_InlineFuture] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **_kw: Any) -> _InlineFuture:
        f = _InlineFuture(fn, args)
        self._done.append(f)
        return f

    def next_done(self, timeout: float | None = None) -> _InlineFuture | None:
        """The next finished task; ``None`` when there is none (after sleeping ``timeout`` s, if given)."""
        if self._done:
            return self._done.pop(0)
        if timeout:
            time.sleep(timeout)
        return None

    def close(self) -> None:
        pass


class _Dask:
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
class _Progress:
    def __init__(self, plan: SweepPlan, enabled: bool) -> None:
        self.enabled = enabled
        self.counts = {k: {"planned": 0, "done": 0, "skipped": 0, "failed": 0} for k in ("targets", "features", "probes")}
        for kind, jobs in (("targets", plan.targets.values()), ("features", plan.features.values()), ("probes", plan.probes)):
            for j in jobs:
                self.counts[kind]["planned"] += 1
                if j.status == "skip":
                    self.counts[kind]["skipped"] += 1
                elif j.status == "failed":
                    self.counts[kind]["failed"] += 1
        self.total_shards = sum(len(f.missing_shards) for f in plan.features.values() if f.status == "todo")
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

    def __enter__(self) -> "_Progress":
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


# -- the coordinator ------------------------------------------------------------------------------
def run_sweep(
    path_or_plan: str | Path | SweepPlan | SweepFile,
    store_root: str | Path | None = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    data_roots: dict[str, str] | list[str] | None = None,
    dry_run: bool = False,
    show_progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_event: Callable[[str, str], None] | None = None,
) -> SweepSummary:
    """Plan and run a sweep; returns what was done, skipped and what failed (and why).

    Args:
        path_or_plan: a sweep TOML file, a parsed :class:`SweepFile` or a :class:`SweepPlan`.
        store_root: where stores and results live (a plan carries its own).
        workers: ``LocalCluster`` workers (default: one per GPU, else a few CPU workers); ``0`` runs every
            task in this process, one after another.
        scheduler: address of an existing dask scheduler (``tcp://head:8786``) instead of a local cluster.
        data_roots: ``{dataset name: root}`` (or ``NAME=PATH`` items) overriding the file's roots.
        dry_run: plan only; nothing is written.
        show_progress: a rich progress display on stderr.
        storage_options: fsspec options for an ``s3://`` store root.
        on_event: called with ``(event, job id)`` — ``"done"``, ``"failed"`` — as jobs finish (tests use it).
    """
    t0 = time.perf_counter()
    if isinstance(path_or_plan, SweepPlan):
        plan = path_or_plan
    else:
        if store_root is None:
            raise MaxaError("run_sweep needs a store root (where stores and results live).")
        sweep = path_or_plan if isinstance(path_or_plan, SweepFile) else load_sweep(path_or_plan, data_roots)
        plan = plan_sweep(sweep, store_root, storage_options=storage_options)
    summary = SweepSummary(plan=plan, dry_run=dry_run)
    for jobs in (plan.targets.values(), plan.features.values(), plan.probes):
        for j in jobs:
            if j.status == "skip":
                summary.skipped += 1
            elif j.status == "failed":
                summary.failures.append(Failure(j.id, j.error))
    todo = [j for j in (*plan.targets.values(), *plan.features.values(), *plan.probes) if j.status == "todo"]
    if dry_run or not todo:
        summary.seconds = time.perf_counter() - t0
        return summary
    executor: Any = _Inline() if workers == 0 and not scheduler else _Dask(workers, scheduler)
    try:
        with _Progress(plan, show_progress) as progress:
            _execute(plan, executor, summary, progress, on_event)
    finally:
        executor.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _execute(plan: SweepPlan, ex: Any, summary: SweepSummary, progress: _Progress,
             on_event: Callable[[str, str], None] | None) -> None:
    from extract.runner import ExtractConfig, finalize_feature_store, open_feature_store
    from pipelines.distributed import build_targets_task, extract_shards_task, probe_task
    from store.errors import StoreBusyError
    from store.lease import wait_settings

    root, so = plan.store_root, plan.storage_options
    settings = tuple(sorted((k, v) for k, v in plan.sweep.extract.items()))
    state: dict[str, str] = {}  # job id -> ok | failed | running
    for j in (*plan.targets.values(), *plan.features.values(), *plan.probes):
        state[j.id] = {"skip": "ok", "failed": "failed", "todo": "pending"}[j.status]
    futures: dict[Any, tuple[str, Any]] = {}  # future -> (kind, job id / shard info)
    writers: dict[str, Any] = {}  # feature job id -> coordinator's StoreWriter (holds the lease)
    shard_left: dict[str, set[int]] = {}
    shard_acc: dict[str, dict[str, Any]] = {}
    order = {j.id: i for i, j in enumerate(plan.features.values())}
    # Feature stores another live coordinator (another sweep, a `maxa extract`) is writing: job id ->
    # (when we first found it busy, when to look again). Its probes wait; the store is reused once it
    # is complete, or taken over if that writer's lease goes stale.
    waiting: dict[str, tuple[float, float]] = {}
    max_wait, poll = wait_settings()

    def event(name: str, jid: str) -> None:
        if on_event is not None:
            on_event(name, jid)

    def fail(kind: str, job: Any, reason: str) -> None:
        state[job.id] = "failed"
        summary.failures.append(Failure(job.id, reason))
        progress.job(kind, "failed")
        event("failed", job.id)

    def finish(kind: str, job: Any) -> None:
        state[job.id] = "ok"
        progress.job(kind, "done")
        event("done", job.id)

    def start_targets(job: TargetJob) -> None:
        state[job.id] = "running"
        f = ex.submit(build_targets_task, job.split, root, job.size, settings, so, priority=10,
                      key=f"targets-{job.split.dataset}-{job.split.split}")
        futures[f] = ("targets", job.id)

    def start_features(job: FeatureJob) -> None:
        state[job.id] = "running"
        try:
            config = ExtractConfig.from_dict({**plan.sweep.extract, "limit": job.split.limit, "wait_timeout": 0})
            writer = open_feature_store(job.planned_backbone, job.reader, root, config, storage_options=so)
        except StoreBusyError as e:  # another live writer: look again later, unless we waited long enough
            first = waiting.get(job.id, (time.monotonic(), 0.0))[0]
            if max_wait is not None and time.monotonic() - first > max_wait:
                waiting.pop(job.id, None)
                fail("features", job, f"waited {max_wait:.0f} s ($MAXA_LEASE_WAIT_S) for {e.holder}, which is still "
                                      f"writing {job.path}")
                return
            if job.id not in waiting:
                progress.note(f"{job.id}: {e.holder} is writing this store; its probes start once it is complete")
                event("waiting", job.id)
            state[job.id] = "waiting"
            waiting[job.id] = (first, time.monotonic() + poll)
            return
        except Exception as e:  # noqa: BLE001
            waiting.pop(job.id, None)
            fail("features", job, _first_line(e))
            return
        waiting.pop(job.id, None)
        if writer.complete:  # someone else finished it meanwhile
            summary.skipped += 1
            finish("features", job)
            return
        writers[job.id] = writer  # registered first: the sweep releases every registered lease however it ends
        missing = writer.missing_shards()
        shard_left[job.id] = set(missing)
        shard_acc[job.id] = {"bad": [], "clipped": 0, "images": 0}
        if not missing:
            complete_features(job)
            return
        for s in missing:
            f = ex.submit(extract_shards_task, job.backbone, job.weights, job.layers, job.split, root, (s,), settings, so,
                          priority=-order[job.id], key=f"extract-{job.backbone.replace(':', '_')}-{job.split.dataset}-"
                                                       f"{job.split.split}-shard{s}")
            futures[f] = ("shard", (job.id, s))

    def complete_features(job: FeatureJob) -> None:
        writer = writers.pop(job.id)
        acc = shard_acc.pop(job.id)
        try:
            finalize_feature_store(writer, bad_images=acc["bad"], clipped_values=acc["clipped"])
        except Exception as e:  # noqa: BLE001
            writer.close()
            fail("features", job, _first_line(e))
            return
        summary.extractions += 1
        finish("features", job)

    def start_probe(job: ProbeJob) -> None:
        state[job.id] = "running"
        f_tr, f_ev = plan.features[job.train], plan.features[job.eval]
        t_tr, t_ev = plan.targets[job.train_targets], plan.targets[job.eval_targets]
        identity = (f_tr.key, f_ev.key, job.spec.task, job.spec.variant, job.spec.head, job.spec.seed)
        device = str(job.spec.settings_dict().get("device", "auto"))
        f = ex.submit(probe_task, f_tr.path, f_ev.path, t_tr.path, t_ev.path, job.config, identity, root, device, so,
                      priority=100, key=f"probe-{job.spec.task}-{job.spec.variant}-{job.spec.head}-s{job.spec.seed}")
        futures[f] = ("probe", job.id)

    def schedule() -> None:
        for job in plan.targets.values():
            if state[job.id] == "pending":
                start_targets(job)
        for job in plan.features.values():
            if state[job.id] == "pending" or (state[job.id] == "waiting" and time.monotonic() >= waiting[job.id][1]):
                start_features(job)
        for job in plan.probes:
            if state[job.id] != "pending":
                continue
            deps = [job.train, job.eval, job.train_targets, job.eval_targets]
            if any(state[d] == "failed" for d in deps):
                bad = next(d for d in deps if state[d] == "failed")
                reason = next((f.reason for f in summary.failures if f.job == bad), "failed")
                fail("probes", job, f"needs {bad}, which failed: {reason}")
            elif all(state[d] == "ok" for d in deps):
                start_probe(job)

    try:
        schedule()
        while True:
            f = ex.next_done(timeout=poll if waiting else None)
            if f is None:
                if not waiting:
                    break
                schedule()  # look at the busy stores again
                continue
            entry = futures.pop(f, None)
            if entry is None:  # a cancelled shard of a store that already failed
                continue
            kind, info = entry
            err = f.exception() if f.status == "error" else None
            if f.status == "cancelled":
                err = RuntimeError("task cancelled")
            if kind == "shard":
                jid, shard = info
                job = plan.features[jid]
                if state[jid] == "failed":
                    continue
                if err is not None:
                    for other, (k2, i2) in list(futures.items()):  # stop the store's other shards
                        if k2 == "shard" and i2[0] == jid:
                            other.cancel()
                            futures.pop(other, None)
                    writers.pop(jid).close()  # finished shards stay flagged: a re-run resumes
                    shard_acc.pop(jid, None)
                    fail("features", job, _first_line(err))
                else:
                    shards, images, bad, clipped = f.result()
                    acc = shard_acc[jid]
                    acc["bad"].extend(bad)
                    acc["clipped"] += clipped
                    summary.shards += len(shards)
                    progress.shard(len(shards))
                    shard_left[jid].difference_update(shards)
                    if not shard_left[jid]:
                        complete_features(job)
            elif kind == "targets":
                job = plan.targets[info]
                if err is not None:
                    fail("targets", job, _first_line(err))
                else:
                    path, reused, _n = f.result()
                    if reused:
                        summary.skipped += 1
                    else:
                        summary.extractions += 1
                    finish("targets", job)
            else:
                job = next(p for p in plan.probes if p.id == info)
                if err is not None:
                    fail("probes", job, _first_line(err))
                else:
                    record = f.result()
                    if record.pop("_reused", False):
                        summary.skipped += 1
                    else:
                        summary.probes += 1
                    summary.records.append(record)
                    finish("probes", job)
            schedule()
    finally:
        for w in writers.values():  # interrupted: release leases; finished shards are kept
            w.close()


# -- the plan as text -----------------------------------------------------------------------------
def format_plan(plan: SweepPlan) -> Any:
    """A rich table of every job: what would be extracted, probed, skipped, or cannot run."""
    from rich.table import Table

    table = Table(title=f"sweep {plan.sweep.name} → {plan.store_root}")
    for col in ("job", "action", "detail"):
        table.add_column(col, overflow="fold")
    labels = {"todo": "run", "skip": "skip (done)", "failed": "cannot run"}
    for t in plan.targets.values():
        table.add_row(t.id, labels[t.status], t.error or (t.path or ""))
    for fj in plan.features.values():
        detail = fj.error or fj.path or ""
        if fj.status == "todo" and fj.num_shards:
            detail = f"{len(fj.missing_shards)}/{fj.num_shards} shards to write → {detail}"
        table.add_row(fj.id, labels[fj.status], detail)
    for p in plan.probes:
        table.add_row(p.id, labels[p.status], p.error or f"experiment {p.spec.experiment}")
    return table
