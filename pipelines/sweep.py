"""``maxa sweep``: run a sweep file's extractions and probes on dask, skipping what is already done.

Planning (:mod:`pipelines.sweep_plan`, of a file read by :mod:`pipelines.sweep_file`) gives a job
graph: target stores and feature stores (each once, train and eval splits), then probes that need two
feature stores and two target stores. Execution (:class:`_Execution`, each job's :class:`JobState`)
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
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from pipelines.sweep_executors import DaskExecutor, InlineExecutor, SweepProgress
from pipelines.sweep_file import load_sweep
from pipelines.sweep_jobs import (
    FAILED,
    SKIP,
    TODO,
    FeatureJob,
    ProbeJob,
    SweepFile,
    SweepPlan,
    TargetJob,
    first_line,
    run_identity,
)
from pipelines.sweep_plan import plan_sweep
from runtime.errors import MaxaError

__all__ = ["SweepSummary", "Failure", "run_sweep", "format_plan", "plan_from_file"]


@dataclass
class Failure:
    job: str
    reason: str

    def line(self) -> str:
        return f"{self.job}: {self.reason}"


def _root_cause(reason: str) -> str:
    """``reason`` without its leading "needs JOB: " / "needs JOB, which failed: " links."""
    while reason.startswith("needs ") and ": " in reason:
        reason = reason.split(": ", 1)[1]
    return reason


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

    def grouped_failure_lines(self, named: int = 2) -> list[str]:
        """One line per cause, in order of first appearance: a job that cannot run because a job it
        needs cannot (a dataset root that is not there stops every store and probe of that dataset)
        counts under that job's cause; a group names its first ``named`` jobs and counts the rest."""
        groups: dict[str, list[Failure]] = {}
        for f in self.failures:
            groups.setdefault(_root_cause(f.reason), []).append(f)
        lines = []
        for cause, failures in groups.items():
            if len(failures) == 1:
                lines.append(failures[0].line())
                continue
            jobs = "; ".join(f.job for f in failures[:named])
            more = f"; and {len(failures) - named} more" if len(failures) > named else ""
            lines.append(f"{len(failures)} jobs ({jobs}{more}): {cause}")
        return lines

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


def plan_from_file(path: str | Path, store_root: Any, *, data_roots: Any = None) -> SweepPlan:
    """Validate the sweep file, then plan it against ``store_root`` (a folder, URL or store Location)."""
    return plan_sweep(load_sweep(path, data_roots), store_root)


# -- the coordinator ------------------------------------------------------------------------------
def run_sweep(
    path_or_plan: str | Path | SweepPlan | SweepFile,
    store_root: Any = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    data_roots: dict[str, str] | list[str] | None = None,
    dry_run: bool = False,
    show_progress: bool = False,
    on_event: Callable[[str, str], None] | None = None,
) -> SweepSummary:
    """Plan and run a sweep; returns what was done, skipped and what failed (and why).

    Args:
        path_or_plan: a sweep TOML file, a parsed :class:`SweepFile` or a :class:`SweepPlan`.
        store_root: where stores and results live: a folder, URL or store Location (a plan carries its own).
        workers: ``LocalCluster`` workers (default: one per GPU, else a few CPU workers); ``0`` runs every
            task in this process, one after another.
        scheduler: address of an existing dask scheduler (``tcp://head:8786``) instead of a local cluster.
        data_roots: ``{dataset name: root}`` (or ``NAME=PATH`` items) overriding the file's roots.
        dry_run: plan only; nothing is written.
        show_progress: a rich progress display on stderr.
        on_event: called with ``(event, job id)`` — ``"done"``, ``"failed"`` — as jobs finish (tests use it).
    """
    t0 = time.perf_counter()
    if isinstance(path_or_plan, SweepPlan):
        plan = path_or_plan
    else:
        if store_root is None:
            raise MaxaError("run_sweep needs a store root (where stores and results live).")
        sweep = path_or_plan if isinstance(path_or_plan, SweepFile) else load_sweep(path_or_plan, data_roots)
        plan = plan_sweep(sweep, store_root)
    summary = SweepSummary(plan=plan, dry_run=dry_run)
    for j in plan.jobs():
        if j.status == SKIP:
            summary.skipped += 1
        elif j.status == FAILED:
            summary.failures.append(Failure(j.id, j.error))
    todo = [j for j in plan.jobs() if j.status == TODO]
    if dry_run or not todo:
        summary.seconds = time.perf_counter() - t0
        return summary
    executor: Any = InlineExecutor() if workers == 0 and not scheduler else DaskExecutor(workers, scheduler)
    try:
        with SweepProgress(plan, show_progress) as progress:
            _Execution(plan, executor, summary, progress, on_event).run()
    finally:
        executor.close()
    summary.seconds = time.perf_counter() - t0
    return summary


class JobState(Enum):
    """Where a job is while a sweep runs (a plan's ``skip`` starts as OK, ``failed`` as FAILED)."""

    PENDING = "pending"  # to run once its dependencies are OK
    RUNNING = "running"  # submitted (a feature store: its shards are)
    WAITING = "waiting"  # a feature store another live writer holds: looked at again later
    OK = "ok"  # done in this run, or found done
    FAILED = "failed"


_START_STATE = {TODO: JobState.PENDING, SKIP: JobState.OK, FAILED: JobState.FAILED}

# what a submitted task is, as the coordinator's future map records it
_SHARD, _TARGETS, _PROBE = "shard", "targets", "probe"


class _Execution:
    """The coordinator: submits every job once what it needs is OK, and follows completions."""

    def __init__(self, plan: SweepPlan, ex: Any, summary: SweepSummary, progress: SweepProgress,
                 on_event: Callable[[str, str], None] | None) -> None:
        from store.lease import wait_settings

        self.plan, self.ex, self.summary, self.progress, self.on_event = plan, ex, summary, progress, on_event
        self.root = plan.store_root
        self.settings = tuple(sorted((k, v) for k, v in plan.sweep.extract.items()))
        self.state: dict[str, JobState] = {j.id: _START_STATE[j.status] for j in plan.jobs()}
        self.futures: dict[Any, tuple[str, Any]] = {}  # future -> (_SHARD/_TARGETS/_PROBE, job id / (job id, shard))
        self.writers: dict[str, Any] = {}  # feature job id -> coordinator's StoreWriter (holds the lease)
        self.shard_left: dict[str, set[int]] = {}
        self.shard_acc: dict[str, dict[str, Any]] = {}
        self.order = {j.id: i for i, j in enumerate(plan.features.values())}
        # Feature stores another live coordinator (another sweep, a `maxa extract`) is writing: job id ->
        # (when we first found it busy, when to look again). Its probes wait; the store is reused once it
        # is complete, or taken over if that writer's lease goes stale.
        self.waiting: dict[str, tuple[float, float]] = {}
        self.max_wait, self.poll = wait_settings()
        self.handlers = {_SHARD: self.shard_done, _TARGETS: self.targets_done, _PROBE: self.probe_done}

    # -- outcomes ---------------------------------------------------------------------------------
    def event(self, name: str, jid: str) -> None:
        if self.on_event is not None:
            self.on_event(name, jid)

    def fail(self, kind: str, job: Any, reason: str) -> None:
        self.state[job.id] = JobState.FAILED
        self.summary.failures.append(Failure(job.id, reason))
        self.progress.job(kind, "failed")
        self.event("failed", job.id)

    def finish(self, kind: str, job: Any) -> None:
        self.state[job.id] = JobState.OK
        self.progress.job(kind, "done")
        self.event("done", job.id)

    # -- starting jobs ----------------------------------------------------------------------------
    def start_targets(self, job: TargetJob) -> None:
        from pipelines.distributed import build_targets_task

        self.state[job.id] = JobState.RUNNING
        f = self.ex.submit(build_targets_task, job.split, self.root, job.size, self.settings, priority=10,
                           key=f"targets-{job.split.dataset}-{job.split.split}")
        self.futures[f] = (_TARGETS, job.id)

    def start_features(self, job: FeatureJob) -> None:
        """Open the store (taking its lease), then submit a task per missing shard."""
        from runtime.errors import StoreBusyError

        self.state[job.id] = JobState.RUNNING
        try:
            writer = self._open_store(job)
        except StoreBusyError as e:  # another live writer: look again later, unless we waited long enough
            self._store_busy(job, e)
            return
        except Exception as e:  # noqa: BLE001
            self.waiting.pop(job.id, None)
            self.fail("features", job, first_line(e))
            return
        self.waiting.pop(job.id, None)
        if writer.complete:  # someone else finished it meanwhile
            self.summary.skipped += 1
            self.finish("features", job)
            return
        self.writers[job.id] = writer  # registered first: the sweep releases every registered lease however it ends
        missing = writer.missing_shards()
        self.shard_left[job.id] = set(missing)
        self.shard_acc[job.id] = {"bad": [], "clipped": 0, "images": 0}
        if not missing:
            self.complete_features(job)
            return
        self._submit_shards(job, missing)

    def _open_store(self, job: FeatureJob) -> Any:
        from extract.runner import ExtractConfig, open_feature_store

        config = ExtractConfig.from_dict({**self.plan.sweep.extract, "limit": job.split.limit, "wait_timeout": 0})
        return open_feature_store(job.planned_backbone, job.reader, self.root, config)

    def _store_busy(self, job: FeatureJob, e: Any) -> None:
        first = self.waiting.get(job.id, (time.monotonic(), 0.0))[0]
        if self.max_wait is not None and time.monotonic() - first > self.max_wait:
            self.waiting.pop(job.id, None)
            self.fail("features", job, f"waited {self.max_wait:.0f} s ($MAXA_LEASE_WAIT_S) for {e.holder}, which is "
                                       f"still writing {job.path}")
            return
        if job.id not in self.waiting:
            self.progress.note(f"{job.id}: {e.holder} is writing this store; its probes start once it is complete")
            self.event("waiting", job.id)
        self.state[job.id] = JobState.WAITING
        self.waiting[job.id] = (first, time.monotonic() + self.poll)

    def _submit_shards(self, job: FeatureJob, shards: list[int]) -> None:
        from pipelines.distributed import extract_shards_task

        for s in shards:
            f = self.ex.submit(extract_shards_task, job.backbone, job.weights, job.layers, job.split, self.root, (s,),
                               self.settings, priority=-self.order[job.id],
                               key=f"extract-{job.backbone.replace(':', '_')}-{job.split.dataset}-"
                                   f"{job.split.split}-shard{s}")
            self.futures[f] = (_SHARD, (job.id, s))

    def complete_features(self, job: FeatureJob) -> None:
        from extract.runner import finalize_feature_store

        writer = self.writers.pop(job.id)
        acc = self.shard_acc.pop(job.id)
        try:
            finalize_feature_store(writer, bad_images=acc["bad"], clipped_values=acc["clipped"])
        except Exception as e:  # noqa: BLE001
            writer.close()
            self.fail("features", job, first_line(e))
            return
        self.summary.extractions += 1
        self.finish("features", job)

    def start_probe(self, job: ProbeJob) -> None:
        from pipelines.distributed import probe_task

        self.state[job.id] = JobState.RUNNING
        plan = self.plan
        f_tr, f_ev = plan.features[job.train], plan.features[job.eval]
        t_tr, t_ev = plan.targets[job.train_targets], plan.targets[job.eval_targets]
        identity = run_identity(f_tr.key, f_ev.key, job.config)
        device = str(job.spec.settings_dict().get("device", "auto"))
        f = self.ex.submit(probe_task, f_tr.path, f_ev.path, t_tr.path, t_ev.path, job.config, identity, self.root,
                           device, priority=100,
                           key=f"probe-{job.spec.task}-{job.spec.variant}-{job.spec.head}-s{job.spec.seed}")
        self.futures[f] = (_PROBE, job.id)

    def schedule(self) -> None:
        """Start what can start: pending stores, busy stores due a look, probes whose stores are OK."""
        state = self.state
        for job in self.plan.targets.values():
            if state[job.id] is JobState.PENDING:
                self.start_targets(job)
        for job in self.plan.features.values():
            if state[job.id] is JobState.PENDING or \
                    (state[job.id] is JobState.WAITING and time.monotonic() >= self.waiting[job.id][1]):
                self.start_features(job)
        for job in self.plan.probes:
            if state[job.id] is not JobState.PENDING:
                continue
            deps = [job.train, job.eval, job.train_targets, job.eval_targets]
            bad = next((d for d in deps if state[d] is JobState.FAILED), None)
            if bad is not None:
                reason = next((f.reason for f in self.summary.failures if f.job == bad), "failed")
                self.fail("probes", job, f"needs {bad}, which failed: {reason}")
            elif all(state[d] is JobState.OK for d in deps):
                self.start_probe(job)

    # -- following completions --------------------------------------------------------------------
    def run(self) -> None:
        """Schedule, then handle each finished task until nothing is pending or waiting."""
        try:
            self.schedule()
            while True:
                f = self.ex.next_done(timeout=self.poll if self.waiting else None)
                if f is None:
                    if not self.waiting:
                        break
                    self.schedule()  # look at the busy stores again
                    continue
                entry = self.futures.pop(f, None)
                if entry is None:  # a cancelled shard of a store that already failed
                    continue
                kind, info = entry
                err = f.exception() if f.status == "error" else None
                if f.status == "cancelled":
                    err = RuntimeError("task cancelled")
                if kind == _SHARD and self.state[info[0]] is JobState.FAILED:
                    continue  # a shard of a store that already failed
                self.handlers[kind](f, info, err)
                self.schedule()
        finally:
            for w in self.writers.values():  # interrupted: release leases; finished shards are kept
                w.close()

    def shard_done(self, f: Any, info: tuple[str, int], err: BaseException | None) -> None:
        jid, _shard = info
        job = self.plan.features[jid]
        if err is not None:
            for other, (k2, i2) in list(self.futures.items()):  # stop the store's other shards
                if k2 == _SHARD and i2[0] == jid:
                    other.cancel()
                    self.futures.pop(other, None)
            self.writers.pop(jid).close()  # finished shards stay flagged: a re-run resumes
            self.shard_acc.pop(jid, None)
            self.fail("features", job, first_line(err))
            return
        shards, images, bad, clipped = f.result()
        acc = self.shard_acc[jid]
        acc["bad"].extend(bad)
        acc["clipped"] += clipped
        self.summary.shards += len(shards)
        self.progress.shard(len(shards))
        self.shard_left[jid].difference_update(shards)
        if not self.shard_left[jid]:
            self.complete_features(job)

    def targets_done(self, f: Any, jid: str, err: BaseException | None) -> None:
        job = self.plan.targets[jid]
        if err is not None:
            self.fail("targets", job, first_line(err))
            return
        path, reused, _n = f.result()
        if reused:
            self.summary.skipped += 1
        else:
            self.summary.extractions += 1
        self.finish("targets", job)

    def probe_done(self, f: Any, jid: str, err: BaseException | None) -> None:
        job = next(p for p in self.plan.probes if p.id == jid)
        if err is not None:
            self.fail("probes", job, first_line(err))
            return
        record = f.result()
        if record.pop("_reused", False):
            self.summary.skipped += 1
        else:
            self.summary.probes += 1
        self.summary.records.append(record)
        self.finish("probes", job)


# -- the plan as text -----------------------------------------------------------------------------
def format_plan(plan: SweepPlan) -> Any:
    """A rich table of every job: what would be extracted, probed, skipped, or cannot run."""
    from rich.table import Table

    table = Table(title=f"sweep {plan.sweep.name} → {plan.store_root}")
    for col in ("job", "action", "detail"):
        table.add_column(col, overflow="fold")
    labels = {TODO: "run", SKIP: "skip (done)", FAILED: "cannot run"}
    for t in plan.targets.values():
        table.add_row(t.id, labels[t.status], t.error or str(t.path or ""))
    for fj in plan.features.values():
        detail = fj.error or str(fj.path or "")
        if fj.status == TODO and fj.num_shards:
            detail = f"{len(fj.missing_shards)}/{fj.num_shards} shards to write → {detail}"
        table.add_row(fj.id, labels[fj.status], detail)
    for p in plan.probes:
        table.add_row(p.id, labels[p.status], p.error or f"experiment {p.spec.experiment}")
    return table
