"""Which stores belong together: a feature store and its targets, a training and an eval store.

Each check refuses, in one line that names the fix, a pairing that would make a probe's number
mean something else than it says (another dataset, backbone, image order or target definition).
"""

from __future__ import annotations

from typing import Any

from runtime.errors import StoreMismatchError
from store.reader import FeatureStore, TargetStore

__all__ = ["check_aligned", "check_eval_pair", "check_target_definitions"]


def check_aligned(features: FeatureStore, targets: TargetStore) -> None:
    """Refuse a feature and a target store that do not index the same images of the same dataset
    in the same order."""
    f, t = features.spec, targets.spec
    if f.dataset_id != t.dataset_id:
        raise StoreMismatchError(
            f"feature store {features.path} ({f.dataset}/{f.split}, dataset {f.dataset_id}) and target store "
            f"{targets.path} ({t.dataset}/{t.split}, dataset {t.dataset_id}) come from different datasets; give "
            "the target store built by `maxa extract` from the same dataset split."
        )
    if f.image_ids_hash != t.image_ids_hash or len(features) != len(targets):
        raise StoreMismatchError(
            f"feature store {features.path} ({f.dataset}/{f.split}, {len(features)} images, ids {f.image_ids_hash}) "
            f"and target store {targets.path} ({t.dataset}/{t.split}, {len(targets)} images, ids {t.image_ids_hash}) "
            "index different images; extract both from the same dataset split (and --limit)."
        )


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def check_eval_pair(train: FeatureStore, evaluation: FeatureStore) -> None:
    """Refuse to score a probe trained on ``train`` on an eval store where the number would mean
    something else: another dataset, other features, or training images.

    Raises:
        StoreMismatchError: naming the two stores, what differs, and the fix.
    """
    f, e = train.spec, evaluation.spec
    if f.dataset_id != e.dataset_id:
        raise StoreMismatchError(
            f"eval store {evaluation.path} is from another dataset ({e.dataset}/{e.split}, dataset {e.dataset_id}) "
            f"than the training store {train.path} ({f.dataset}/{f.split}, dataset {f.dataset_id}); a probe is "
            "scored on a held-out split of the dataset it was trained on: pass that split's store as --eval-store."
        )
    if f.backbone_identity() != e.backbone_identity():
        what = _differences(f.backbone_identity(), e.backbone_identity()) if f.layers == e.layers else "layers differ"
        raise StoreMismatchError(
            f"train store {train.path} and eval store {evaluation.path} hold features of different backbones, "
            f"weights, preprocessing, layers or quantization ({what}); extract the eval split with the same backbone, "
            "weights and --compression."
        )
    shared = set(train.image_ids) & set(evaluation.image_ids)
    if shared:
        some = ", ".join(sorted(shared)[:5])
        raise StoreMismatchError(
            f"train store {train.path} ({f.split}) and eval store {evaluation.path} ({e.split}) share "
            f"{len(shared)} image(s) (e.g. {some}): scoring on training images would inflate the result; "
            "evaluate on a split that holds none of the training images."
        )


def check_target_definitions(train_targets: TargetStore, eval_targets: TargetStore) -> None:
    """Refuse a training and an eval target store whose targets are defined differently (size,
    boundary width, classes, …): the metric would compare unlike things."""
    d_train, d_eval = train_targets.spec.definition(), eval_targets.spec.definition()
    if d_train != d_eval:
        raise StoreMismatchError(
            f"target stores {train_targets.path} and {eval_targets.path} define their targets differently "
            f"({_differences(d_train, d_eval)}); build both splits' targets with the same settings."
        )
