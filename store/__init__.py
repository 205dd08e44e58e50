"""maxa stores: the on-disk format of feature and target stores (Zarr v3).

Nothing in this package imports torch or timm. It is the only code that knows the layout of a
store root (stores, leases, results, runs) and the only code that does storage I/O, all of it
through :class:`store.location.Location` (a local folder or an fsspec URL with its options).
"""

from store.catalogue import feature_store_path, list_stores, store_root_of, store_summary, target_store_path
from runtime.errors import MaxaError, StoreError, StoreMismatchError
from store._layout import COMPRESSIONS, read_attrs
from store.lease import LeaseInfo, read_lease
from store.location import Location, as_location
from store.checks import check_aligned
from store.reader import FeatureStore, TargetStore, open_features, open_store, open_targets
from store.spec import FORMAT_VERSION, FeatureSpec, LayerSpec, TargetSpec, content_key
from store.verify import VerifyReport, verify_store
from store.writer import ArrayDef, StoreWriter, feature_array_name, feature_arrays, remove_store

__all__ = [
    "COMPRESSIONS",
    "FORMAT_VERSION",
    "ArrayDef",
    "FeatureSpec",
    "FeatureStore",
    "LeaseInfo",
    "Location",
    "LayerSpec",
    "MaxaError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriter",
    "TargetSpec",
    "TargetStore",
    "VerifyReport",
    "as_location",
    "check_aligned",
    "content_key",
    "feature_array_name",
    "feature_arrays",
    "feature_store_path",
    "list_stores",
    "open_features",
    "open_store",
    "open_targets",
    "read_attrs",
    "read_lease",
    "remove_store",
    "store_root_of",
    "store_summary",
    "target_store_path",
    "verify_store",
]
