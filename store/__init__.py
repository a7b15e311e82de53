"""unipt.store — the Zarr v3 feature store (format versions 1 and 2).

Imports none of unipt's other subpackages: a store can be read with nothing but this package.
"""

from ._dtypes import STORAGE_DTYPES, ValueRangeError, bytes_per_row, dequantize, quantize, round_trip
from ._export import export_webdataset
from ._index import compact_index, rebuild_index
from ._maintenance import Problem, VerifyReport, describe, remove_part, verify
from ._format import (CLASSIFICATION, DEFAULT_DTYPE, FORMAT_VERSION, IGNORE_INDEX, MULTILABEL, REGRESSION, TAGGING,
                      TARGETS, TASK_KINDS, layer_key, part_key)
from ._pairs import PairIndex, SplitPairs, stored_ids
from ._provenance import ProvenanceMismatch, check_provenance, files_sha256, provenance_diff, weight_files
from ._store import (CorruptChunkError, FeatureStore, IncompleteStoreError, PartData, PartFolder, PartInfo, PartWriter,
                     SplitStatus, StoreError)

__all__ = [
    "FeatureStore",
    "PairIndex",
    "SplitPairs",
    "stored_ids",
    "PartInfo",
    "PartData",
    "PartWriter",
    "StoreError",
    "ValueRangeError",
    "dequantize",
    "quantize",
    "round_trip",
    "bytes_per_row",
    "CorruptChunkError",
    "IncompleteStoreError",
    "PartFolder",
    "SplitStatus",
    "ProvenanceMismatch",
    "check_provenance",
    "files_sha256",
    "verify",
    "VerifyReport",
    "Problem",
    "describe",
    "remove_part",
    "compact_index",
    "rebuild_index",
    "export_webdataset",
    "provenance_diff",
    "weight_files",
    "FORMAT_VERSION",
    "TASK_KINDS",
    "TARGETS",
    "CLASSIFICATION",
    "MULTILABEL",
    "REGRESSION",
    "TAGGING",
    "IGNORE_INDEX",
    "STORAGE_DTYPES",
    "DEFAULT_DTYPE",
    "layer_key",
    "part_key",
]
