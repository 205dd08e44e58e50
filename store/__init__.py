"""maxa stores: the on-disk format of feature and target stores (Zarr v3).

Nothing in this package imports torch or timm; the writer and reader are the only code that know
the layout.
"""

from store.catalogue import feature_store_path, list_stores, store_root_of, store_summary, target_store_path
from runtime.errors import MaxaError, StoreError, StoreMismatchError
from store.lease import LeaseInfo, read_lease
from store.reader import FeatureStore, TargetStore, check_aligned, open_features, open_store, open_targets
from store.spec import FORMAT_VERSION, FeatureSpec, LayerSpec, TargetSpec, content_key
from store.verify import VerifyReport, verify_store
from store.writer import ArrayDef, StoreWriter, remove_store

__all__ = [
    "FORMAT_VERSION",
    "ArrayDef",
    "FeatureSpec",
    "FeatureStore",
    "LeaseInfo",
    "LayerSpec",
    "MaxaError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriter",
    "TargetSpec",
    "TargetStore",
    "VerifyReport",
    "check_aligned",
    "content_key",
    "feature_store_path",
    "list_stores",
    "open_features",
    "open_store",
    "open_targets",
    "read_lease",
    "remove_store",
    "store_root_of",
    "store_summary",
    "target_store_path",
    "verify_store",
]
