"""Names and constants of the unipt feature-store format (versions 1 and 2).

A store is a Zarr v3 group::

    <root>/                      attrs: unipt = {format_version, provenance, layers, layer_widths, plan,
                                 chunk_checksum, task, ...}; unipt_sha256 = record_digest(unipt)
      <split>/                   one group per split (train, validation, test, ...)
        part-000000/             one immutable part = a contiguous range of source examples
          layer_000 ... layer_L  layout "tokens": (total_tokens, D_l) ragged tokens, CSR rows, no padding;
                                 layout "maps": (n_examples, H_l, W_l, C_l) one fixed-shape map per example
          layer_000_view1 ...    stores with stochastic views (root "views" = {count: K, splits}), parts of
                                 the view splits only: view v >= 1 of each layer, shaped like view 0
                                 (layer_NNN itself); the same offsets, lengths and targets serve every view
          offsets                (n_examples + 1,) int64: example i owns rows offsets[i]:offsets[i+1]
          example_id             (n_examples,) str: stable content hash or source key
          <target column>        the task's targets (TARGETS): classification "label" (n_examples,) int64,
                                 an index into label_names, -1 = unlabelled; multilabel "labels"
                                 (n_examples, C) uint8 multi-hot; regression "target" (n_examples, k)
                                 float32; tagging "token_label" (total_tokens,) int32, one per stored
                                 token (CSR rows like the layers), -100 = ignored
          length                 (n_examples,) int32: tokens per example
                                 attrs: unipt_part = {...}; unipt_commit = {..., record_sha256} written LAST

      _skipped/                  source rows left out as bad input (extraction with bad_input = "skip"):
        example_id, source_row, reason   one entry per row; attrs: unipt_commit = {n, reasons} written LAST
      _claims/<split>/<part>.json  transient (not Zarr): which run is writing which part right now

A part is visible to readers only once its ``unipt_commit`` attribute exists (the commit marker). Names
starting with "_" are the store's own records, never splits. Every chunk ends in a CRC-32C that reads check;
the root and commit records carry the sha256 of their canonical JSON (docs/store-format.md, "Integrity").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Version 2 adds the root "task" record ({kind, names}) and the target columns of tasks other than
# single-label classification. A classification store is still written as version 1 with no task record,
# exactly as before, so version 1 stays what every older unipt reads; version 2 only where it differs.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Task kinds, and the per-part column that holds each kind's targets: (column, dtype, rows per example:
# "example" = one row per example, "token" = one per stored token).
CLASSIFICATION, MULTILABEL, REGRESSION, TAGGING = "classification", "multilabel", "regression", "tagging"
TASK_KINDS = (CLASSIFICATION, MULTILABEL, REGRESSION, TAGGING)
TARGETS = {
    CLASSIFICATION: ("label", "int64", "example"),
    MULTILABEL: ("labels", "uint8", "example"),
    REGRESSION: ("target", "float32", "example"),
    TAGGING: ("token_label", "int32", "token"),
}
IGNORE_INDEX = -100  # a token target that is not scored (special tokens, non-first sub-words); PyTorch's default

# Attribute keys. Everything unipt writes lives under one key so user attrs never collide.
ROOT_ATTR = "unipt"
ROOT_DIGEST_ATTR = "unipt_sha256"  # beside ROOT_ATTR: record_digest of it, written with it at creation
PART_ATTR = "unipt_part"
COMMIT_ATTR = "unipt_commit"
RECORD_DIGEST = "record_sha256"  # inside a commit record: record_digest of what it vouches for

# Every chunk of a layer, scale and column array ends in a CRC-32C of its stored bytes (Zarr v3's crc32c
# codec, inside the sharding codec for sharded arrays), checked by every read. Recorded in the root
# metadata as "chunk_checksum"; stores written before it have no such key and no chunk checksums.
CHUNK_CHECKSUM = "crc32c"

# Per-example columns every part has, beside the per-layer arrays.
OFFSETS = "offsets"
EXAMPLE_ID = "example_id"
LABEL = "label"
LENGTH = "length"

# Store-level records beside the splits.
SKIPPED = "_skipped"
SOURCE_ROW = "source_row"
REASON = "reason"

# Layouts: how a layer array's rows relate to examples (root attribute "layout"; absent = tokens).
TOKENS = "tokens"  # rows are token vectors (D,), example i owns rows offsets[i]:offsets[i+1]
MAPS = "maps"  # rows are whole feature maps (H, W, C), channels last: example i is row i (length 1)
LAYOUTS = (TOKENS, MAPS)

# Storage dtypes live in _dtypes.py (float16 default: half of float32's bytes at ~5e-4 relative error).
DEFAULT_DTYPE = "float16"

# Blosc codecs by name, both with bit shuffle (measured on real MiniLM float16 activations, one thread:
# bit shuffle beats byte shuffle on size for both codecs and even decodes zstd faster, docs/benchmarks.md):
#   zstd-3: ~1.78 bytes/value, encodes ~0.4 GB/s, decodes ~2 GB/s   (default: stores travel and last)
#   lz4-5:  ~1.80 bytes/value, encodes ~1.6 GB/s, decodes ~3 GB/s   (for CPU-bound extraction)
COMPRESSIONS = {"zstd": ("zstd", 3), "lz4": ("lz4", 5)}
DEFAULT_COMPRESSION = "zstd"

# Target uncompressed bytes per inner chunk and per shard. A shard is what lands as one object
# (file / S3 key); chunks inside it are the unit of decoding.
CHUNK_BYTES = 1 << 21  # 2 MiB
SHARD_BYTES = 1 << 25  # 32 MiB


def layer_key(layer: int, view: int = 0) -> str:
    """Array name of hidden-state layer ``layer`` (0 = embedding output); ``view`` >= 1: that stochastic view of
    it (view 0, the eval-mode cache, keeps the name every store has always used)."""
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    return f"layer_{layer:03d}" + (f"{VIEW_SUFFIX}{view}" if view else "")


# Stochastic views (extract.views = K > 1): the root record "views" = {"count": K, "splits": [...]}; parts
# of those splits hold layer_NNN (view 0) and layer_NNN_view1 ... layer_NNN_view{K-1}, and their commit
# record says "views": K. Readers that know nothing of views read layer_NNN = view 0, the eval-mode cache,
# exactly what a K = 1 store holds: so views need no new format version (docs/store-format.md).
VIEWS = "views"
VIEW_SUFFIX = "_view"


def part_key(index: int) -> str:
    """Group name of part ``index`` within its split; sorts in index order."""
    return f"part-{index:06d}"


def part_index(key: str) -> int:
    if not key.startswith("part-"):
        raise ValueError(f"not a part name: {key!r} (expected 'part-NNNNNN')")
    return int(key[len("part-") :])


def record_digest(record: Any) -> str:
    """sha256 of a JSON record in canonical form (sorted keys, no whitespace): the same for the record as
    written and as any JSON reader reads it back, so an edit to a single value changes it."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
