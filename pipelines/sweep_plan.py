"""Planning a sweep: every store and probe a validated sweep file needs, against a store root.

:func:`plan_sweep` turns a :class:`~pipelines.sweep_jobs.SweepFile` (read by
:mod:`pipelines.sweep_file`, where the file's schema is described) into a job graph — target stores
and feature stores (one per backbone × dataset split, extracted once however many experiments need
it), then every probe — and marks what the store root already holds (complete stores; finished
result records) as skipped. Nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from store.spec import DEFAULT_TARGET_SIZE
from pipelines.sweep_jobs import (
    FAILED,
    SKIP,
    TODO,
    FeatureJob,
    ProbeJob,
    ProbeSpec,
    SplitRef,
    SweepFile,
    SweepPlan,
    TargetJob,
    first_line,
    recorded_run_identity,
    run_identity,
)
from probe.config import config_identity

__all__ = ["plan_sweep", "make_reader", "planned_backbone", "planned_weights_id"]


def planned_weights_id(entry: Any, weights: str) -> str:
    """The weights id :func:`extract.backbones.load_backbone` gives, without loading anything (a weights
    file is hashed). Raises :class:`WeightsUnavailableError` where loading would."""
    from extract.backbones import resolve_weights

    return resolve_weights(entry, weights)[0]


def planned_backbone(name: str, weights: str, layers: tuple[int, ...] | None) -> Any:
    """A :class:`LoadedBackbone` without a model: enough for a store's spec, key and path."""
    import dataclasses

    from extract.backbone_registry import entry_geometry, get_backbone_entry
    from extract.backbones import LoadedBackbone

    entry = get_backbone_entry(name)
    if layers is not None:
        entry = dataclasses.replace(entry, layers=tuple(layers))
    return LoadedBackbone(entry, None, planned_weights_id(entry, weights), entry_geometry(entry))  # type: ignore[arg-type]


def make_reader(ref: SplitRef) -> Any:
    from extract.datasets import create_dataset

    return create_dataset(ref.reader, ref.root, ref.split, **ref.options_dict())


# -- what the store root holds ---------------------------------------------------------------------
def _stored_attrs(path: Any) -> dict[str, Any] | None:
    """A store's attributes (``key``, ``complete``, ``num_shards``, ...); ``None`` where there is none."""
    from store import read_attrs

    return read_attrs(path)


def _unfinished_shards(path: Any) -> list[int]:
    """The shards of an incomplete feature store not yet flagged done."""
    import numpy as np

    from store import open_features

    done = open_features(path, allow_incomplete=True).shard_done()
    return [int(s) for s in np.flatnonzero(~done)]


# -- the planner ----------------------------------------------------------------------------------
class _Planner:
    """Makes each target and feature job once, caching readers and model-less backbones (and why
    one could not be had: the jobs needing it fail with that reason, the rest plan normally)."""

    def __init__(self, sweep: SweepFile, root: Any) -> None:
        self.sweep, self.root = sweep, root
        self.size = int(sweep.extract.get("target_size", DEFAULT_TARGET_SIZE[0]))
        self.readers: dict[SplitRef, Any] = {}
        self.reader_errors: dict[SplitRef, str] = {}
        self.backbones: dict[tuple[str, str, Any], Any] = {}
        self.backbone_errors: dict[tuple[str, str, Any], str] = {}
        self.targets: dict[str, TargetJob] = {}
        self.features: dict[str, FeatureJob] = {}

    def reader_for(self, ref: SplitRef) -> Any:
        if ref not in self.readers and ref not in self.reader_errors:
            try:
                self.readers[ref] = make_reader(ref)
            except Exception as e:  # noqa: BLE001 - a bad root fails its jobs, not the sweep
                self.reader_errors[ref] = first_line(e).replace("pass --root", f"pass --data-root {ref.dataset}=PATH")
        return self.readers.get(ref)

    def image_ids(self, ref: SplitRef) -> list[str]:
        r = self.readers[ref]
        return list(r.image_ids[:ref.limit] if ref.limit is not None else r.image_ids)

    def backbone_for(self, bk: tuple[str, str, Any]) -> None:
        if bk not in self.backbones and bk not in self.backbone_errors:
            try:
                self.backbones[bk] = planned_backbone(*bk)
            except Exception as e:  # noqa: BLE001
                self.backbone_errors[bk] = first_line(e)

    def target_job(self, ref: SplitRef) -> str:
        from extract.target_store import target_spec_for
        from extract.targets import TargetConfig
        from store.catalogue import target_store_path

        jid = f"targets {ref.label}"
        if jid in self.targets:
            return jid
        size = self.size
        job = self.targets[jid] = TargetJob(id=jid, split=ref, size=(size, size))
        reader = self.reader_for(ref)
        if reader is None:
            job.status, job.error = FAILED, self.reader_errors[ref]
        else:
            spec = target_spec_for(reader, self.image_ids(ref), TargetConfig(size=(size, size)))
            job.path = target_store_path(self.root, spec)
            meta = _stored_attrs(job.path)
            if meta and meta.get("complete") and meta.get("key") == spec.key:
                job.status = SKIP
        return jid

    def feature_job(self, b: str, w: str, layers: Any, ref: SplitRef) -> str:
        from extract.runner import feature_spec_for
        from store.catalogue import feature_store_path

        jid = f"features {b} {ref.label}" + (f" layers {','.join(map(str, layers))}" if layers else "") \
            + ("" if w == "pretrained" else f" ({Path(w).name if '/' in w else w})")
        if jid in self.features:
            return jid
        job = self.features[jid] = FeatureJob(id=jid, backbone=b, weights=w, layers=layers, split=ref)
        bk = (b, w, layers)
        self.backbone_for(bk)
        reader = self.reader_for(ref)
        if bk in self.backbone_errors:
            job.status, job.error = FAILED, self.backbone_errors[bk]
            return jid
        if reader is None:
            job.status, job.error = FAILED, self.reader_errors[ref]
            return jid
        ids = self.image_ids(ref)
        if not ids:
            job.status, job.error = FAILED, f"dataset {ref.reader!r} split {ref.split!r} has no images"
            return jid
        spec = feature_spec_for(self.backbones[bk], reader, ids,
                                compression=str(self.sweep.extract.get("compression") or "none"))
        job.planned_backbone, job.reader = self.backbones[bk], reader
        job.path, job.key = feature_store_path(self.root, spec), spec.key
        self._mark_stored(job, spec, reader, len(ids))
        return jid

    def _mark_stored(self, job: FeatureJob, spec: Any, reader: Any, num_images: int) -> None:
        """Shards to write (all, or a partial store's unfinished ones); ``skip`` for a complete store."""
        from extract.runner import check_reusable, default_shard_size

        meta = _stored_attrs(job.path)
        if meta and meta.get("key") == spec.key:
            job.num_shards = int(meta["num_shards"])
            if meta.get("complete"):
                job.status = SKIP
                if meta.get("num_bad"):
                    try:
                        check_reusable(job.path, reader, skip_bad=bool(self.sweep.extract.get("skip_bad", False)))
                    except Exception as e:  # noqa: BLE001 - reported as this job's failure
                        job.status, job.error = FAILED, first_line(e)
            else:
                job.missing_shards = _unfinished_shards(job.path)
        else:
            shard = int(self.sweep.extract.get("shard_size") or default_shard_size(spec.layers))
            job.num_shards = -(-num_images // shard)
            job.missing_shards = list(range(job.num_shards))

    def probe_job(self, ps: ProbeSpec, finished: Any) -> ProbeJob:
        ds = self.sweep.datasets[ps.dataset]
        ftr = self.feature_job(ps.backbone, ps.weights, ps.layers, ds.train)
        fev = self.feature_job(ps.backbone, ps.weights, ps.layers, ds.eval)
        ttr, tev = self.target_job(ds.train), self.target_job(ds.eval)
        job = ProbeJob(id=f"probe {ps.backbone} {ps.dataset} {ps.task} {ps.variant} {ps.head} seed {ps.seed}",
                       spec=ps, train=ftr, eval=fev, train_targets=ttr, eval_targets=tev)
        f_tr, f_ev = self.features[ftr], self.features[fev]
        failed = [d for d in (f_tr, f_ev, self.targets[ttr], self.targets[tev]) if d.status == FAILED]
        if failed:
            job.status, job.error = FAILED, f"needs {failed[0].id}: {failed[0].error}"
        elif f_tr.key and f_ev.key and run_identity(f_tr.key, f_ev.key, job.config) in finished:
            job.status = SKIP
        return job


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The settings of probe config ``b`` that differ from ``a``'s (defaults filled in), as text."""
    import json

    ca, cb = json.loads(config_identity(a)), json.loads(config_identity(b))
    return ", ".join(f"{k} {json.dumps(cb[k])}" for k in sorted(cb) if ca.get(k) != cb[k])


def _skip_unneeded_stores(probes: list[ProbeJob], targets: dict[str, TargetJob],
                          features: dict[str, FeatureJob]) -> None:
    """Stores whose every probe is finished need no extraction (a probe already read them)."""
    todo = [j for j in probes if j.status == TODO]
    needed_f = {j.train for j in todo} | {j.eval for j in todo}
    needed_t = {j.train_targets for j in todo} | {j.eval_targets for j in todo}
    for jid, fj in features.items():
        if fj.status == TODO and jid not in needed_f:
            fj.status = SKIP
    for jid, tj in targets.items():
        if tj.status == TODO and jid not in needed_t:
            tj.status = SKIP


def plan_sweep(sweep: SweepFile, store_root: Any) -> SweepPlan:
    """Every store and probe ``sweep`` needs, each once, marked ``skip`` where ``store_root`` holds it.

    Nothing is written. A dataset split that cannot be read or a backbone whose weights cannot be had
    marks its jobs (and the probes needing them) ``failed`` with the reason; the rest plan normally.
    ``store_root`` is a folder, a URL or a :class:`store.Location` (which carries storage options).
    """
    from store import as_location
    from store.results import read_results

    root = as_location(store_root)
    planner = _Planner(sweep, root)
    finished = {recorded_run_identity(r) for r in read_results(root)} - {None}
    probes: list[ProbeJob] = []
    seen: set[tuple[Any, ...]] = set()
    first: dict[str, ProbeJob] = {}  # by id: the first job of these stores, task, variant, head and seed
    for ps in sweep.probes:
        job = planner.probe_job(ps, finished)
        ident = (job.train, job.eval, config_identity(job.config))
        if ident in seen:
            continue  # asked for by two experiments with the same settings: run once
        seen.add(ident)
        if job.id in first:  # the same probe with other settings (another experiment's epochs, lr, …)
            job.id = f"{job.id} ({_differences(first[job.id].config, job.config)})"
        else:
            first[job.id] = job
        probes.append(job)
    _skip_unneeded_stores(probes, planner.targets, planner.features)
    return SweepPlan(sweep=sweep, store_root=root, targets=planner.targets, features=planner.features, probes=probes)
