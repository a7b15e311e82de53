"""Names and constants of the unipt feature-store format (version 1).

A store is a Zarr v3 group::

    <root>/                      attrs: unipt = {format_version, provenance, layers, layer_widths, ...}
      <split>/                   one group per split (train, validation, test, ...)
        part-000000/             one immutable part = a contiguous range of source examples
          layer_000 ... layer_L  (total_tokens, D_l) ragged tokens, CSR rows, no padding
          offsets                (n_examples + 1,) int64: example i owns rows offsets[i]:offsets[i+1]
          example_id             (n_examples,) str: stable content hash or source key
          label                  (n_examples,) int64: index into attrs.label_names, -1 = unlabelled
          length                 (n_examples,) int32: tokens per example
                                 attrs: unipt_part = {...}; unipt_commit = {...} written LAST

A part is visible to readers only once its ``unipt_commit`` attribute exists (the commit marker).
"""

from __future__ import annotations

FORMAT_VERSION = 1

# Attribute keys. Everything unipt writes lives under one key so user attrs never collide.
ROOT_ATTR = "unipt"
PART_ATTR = "unipt_part"
COMMIT_ATTR = "unipt_commit"

# Per-example columns every part has, beside the per-layer arrays.
OFFSETS = "offsets"
EXAMPLE_ID = "example_id"
LABEL = "label"
LENGTH = "length"

# Storage dtypes live in _dtypes.py (float16 default: half of float32's bytes at ~5e-4 relative error).
DEFAULT_DTYPE = "float16"

# Blosc codecs by name, all with byte shuffle (it puts float16's exponent bytes side by side). Measured on
# real MiniLM float16 activations (docs/benchmarks.md): lz4 ~1.80 bytes/value, encodes at ~2.5 GB/s and
# decodes at ~9 GB/s per core; zstd level 3 is ~4 % smaller but ~7x slower both ways. lz4 is the default
# because extraction and training are CPU-bound; choose zstd for stores that travel over a network.
COMPRESSIONS = {"lz4": ("lz4", 5), "zstd": ("zstd", 3)}
DEFAULT_COMPRESSION = "lz4"

# Target uncompressed bytes per inner chunk and per shard. A shard is what lands as one object
# (file / S3 key); chunks inside it are the unit of decoding.
CHUNK_BYTES = 1 << 21  # 2 MiB
SHARD_BYTES = 1 << 25  # 32 MiB


def layer_key(layer: int) -> str:
    """Array name of hidden-state layer ``layer`` (0 = embedding output)."""
    return f"layer_{layer:03d}"


def part_key(index: int) -> str:
    """Group name of part ``index`` within its split; sorts in index order."""
    return f"part-{index:06d}"


def part_index(key: str) -> int:
    if not key.startswith("part-"):
        raise ValueError(f"not a part name: {key!r} (expected 'part-NNNNNN')")
    return int(key[len("part-") :])
