"""Configuration of the extraction stage: where examples come from, which backbone, how to store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

BAD_INPUT_POLICIES = ("error", "skip")
SOURCE_FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "hf", "webdataset")
AUTOCAST = ("auto", "float16", "bfloat16", "off")
DEFAULT_BLOCK_ROWS = 1 << 16  # source rows per planning piece (ExtractConfig.block_rows)


def check_split_rules(splits: dict[str, float], split_column: str | None, max_examples: dict[str, int]) -> None:
    """The split fractions and caps every source config takes (text or image)."""
    if split_column is None:
        total = sum(splits.values())
        if not splits or abs(total - 1.0) > 1e-6 or min(splits.values()) <= 0:
            raise ValueError(f"source.splits must be positive fractions summing to 1, got {splits}")
    for split, n in max_examples.items():
        if n < 1:
            raise ValueError(f"source.max_examples[{split!r}] must be >= 1, got {n}")


@dataclass
class SourceConfig:
    path: str = ""
    """A CSV/TSV/JSONL/Parquet file, a `datasets` load_from_disk folder, a hub dataset name (format=hf),
    webdataset tar shards (one .tar, a brace pattern such as shards-{000000..000009}.tar, or a folder of
    *.tar files, read in name order), or pkg://<package>/<path> for data shipped inside an installed package."""
    format: str = "auto"
    """csv, tsv, jsonl, parquet, hf or webdataset; auto = from the suffix (.tar = webdataset), and a folder
    is webdataset when it holds *.tar files, else hf."""
    text_column: str = "text"
    """Column holding the input text. webdataset: a member's extension (txt = the <key>.txt file) or a
    field of the sample's <key>.json member."""
    label_column: str | None = "label"
    """Column holding the class label (any type; classes are its sorted distinct values). None = unlabelled.
    webdataset: a member's extension (cls) or a json field, as for text_column."""
    id_column: str | None = None
    """Column holding a stable example id; None = a content hash of the text (webdataset: the sample's
    __key__, a stable source key)."""
    encoding: str = "utf-8"
    """Text encoding of CSV/TSV/JSONL files and of webdataset text members."""
    dedupe: bool = True
    """Drop repeated texts, keeping the first occurrence (duplicates would leak across splits)."""
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    """Split fractions, assigned by a hash of the example id (stable under reordering, adding rows)."""
    split_column: str | None = None
    """Use this column's values as split names instead of hashing (a DatasetDict's own splits win too)."""
    max_examples: dict[str, int] = field(default_factory=dict)
    """Cap per split, e.g. {train = 4000}; the subset is drawn by hash, never the first N rows."""
    bad_input: str = "error"
    """A row that cannot become an example (empty or undecodable text, missing label, bad target, unparsable
    line): "error" stops and names it; "skip" leaves it out and records its id and reason in the store."""
    task: str = "classification"
    """What the targets are: "classification" (one class per row, label_column), "multilabel" (a list of
    labels per row, or a string split on label_delimiter), "regression" (numbers: label_column, or several
    target_columns) or "tagging" (text_column holds a list of words, or a string split on whitespace, and
    label_column one tag per word; tags are aligned to the first sub-word token of each word)."""
    text_pair_column: str | None = None
    """A second text per row, encoded together with text_column as one sequence through the tokenizer's pair
    API (a cross-encoder: [CLS] a [SEP] b [SEP] for BERT, with its token_type_ids and truncation rule)."""
    label_delimiter: str | None = None
    """multilabel: split a string label on this (e.g. "|"); list values are taken as they are."""
    target_columns: list[str] | None = None
    """regression: several numeric target columns (default: label_column alone)."""
    group_column: str | None = None
    """Draw the split by a hash of this column's value instead of the example id, so every row of a group
    (a document, a chapter, a speaker) lands in the same split: nothing of a group on both sides."""

    def __post_init__(self) -> None:
        from ._targets import check_task_options

        if not self.path:
            raise ValueError("source.path is required: a data file, a datasets folder, or pkg://package/path")
        check_task_options(self.task, self.label_column, self.label_delimiter, self.target_columns,
                           self.text_pair_column)
        if self.bad_input not in BAD_INPUT_POLICIES:
            raise ValueError(f"source.bad_input must be one of {BAD_INPUT_POLICIES}, got {self.bad_input!r}")
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source.format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        check_split_rules(self.splits, self.split_column, self.max_examples)


@dataclass
class BackboneConfig:
    model: str = ""
    """A local transformers folder, pkg://<package>/<path>, or a hub id already in the local cache."""
    max_length: int = 128
    """Tokens per example after truncation (special tokens included)."""
    revision: str | None = None
    """Hub revision, when `model` is a hub id."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    autocast: str = "auto"
    """Forward-pass precision on GPU: auto (= float16), float16, bfloat16 or off. CPU runs float32."""
    image_size: int | None = None
    """Image backbones: resize every image to this square size (pixels) instead of the processor's own size
    (e.g. 112 for 28-pixel Fashion-MNIST through a ViT made for 224: 4x fewer tokens to run and store).
    Processors that resize the shortest edge and centre-crop keep doing so at this size; the others squash a
    non-square image to the square."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("backbone.model is required: a local folder, pkg://package/path, or a hub id")
        if self.max_length < 2:
            raise ValueError(f"backbone.max_length must be >= 2, got {self.max_length}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"backbone.autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"backbone.image_size must be >= 8 pixels or unset, got {self.image_size}")


@dataclass
class ExtractConfig:
    layers: str | Sequence[int] = "all"
    """Hidden states to store: "all" (embeddings + every layer), "stages" (a CNN: the last map of each
    resolution plus the final output; others: all) or indices (0 = embeddings / the first map, -1 = last)."""
    dtype: str = "float16"
    """Storage dtype: float16 (default, half of float32's bytes), bfloat16 (same size, float32's range: for
    models whose activations overflow float16), int8 (per-token absmax scale, ~half of float16's bytes)
    or float32 (exact)."""
    compression: str = "zstd"
    """Blosc codec (bit-shuffled): zstd (default, the smallest stores) or lz4 (~4x faster to write, ~1 % larger:
    for extraction on a CPU that has no core to spare for compression)."""
    batch_size: int = 32
    """Examples per forward pass (batches are built from length-sorted examples)."""
    part_size: int = 1024
    """Examples per part: the unit of work, resume and shuffling. Image parts are decoded and processed whole
    while the previous part runs, so two parts' pixel arrays are in memory (512 images at 224 px: ~300 MB)."""
    block_rows: int = DEFAULT_BLOCK_ROWS
    """Source rows per planning piece: a text source is read and planned a piece at a time (memory stays flat
    however long it is), and each piece's parts are a random sample of that piece (docs/distributed.md,
    "Sources at scale"). Fixed for a store once it is created."""
    splits: Sequence[str] | None = None
    """Which splits to extract (None = every split of the source)."""
    writer_queue: int = 8
    """Batches the background writer may hold before the forward pass waits for it."""
    workers: int = 0
    """0 = extract in this process; N = start a local dask cluster of N worker processes (parts are tasks)."""
    scheduler: str | None = None
    """Address of an existing dask scheduler (tcp://host:8786): parts run on its workers (SLURM, k8s, one
    worker per GPU). Overrides `workers`."""
    retries: int = 2
    """Times dask re-runs a part whose worker died or failed (parts are idempotent)."""
    max_grid: int | None = None
    """CNN feature maps: average-pool any map larger than max_grid x max_grid (by the smallest whole factor that
    fits) before storing it. Early stages are large (MobileNetV2 at 128 px: its 24 x 32 x 32 stride-4 map holds
    more values than its 32-, 96- and 320-channel later stage maps together); 8 keeps a grid the UniPT CNN
    variant still pools by windows. Measured sizes and accuracies: docs/benchmarks.md, "Vision"."""
    claim_ttl: float = 120.0
    """Seconds without a heartbeat after which another run may take over a part this run claimed (a run
    killed on the same host is taken over at once). Several runs may extract into one store together."""
    views: int = 1
    """Stochastic views stored per example of the views_splits (recipe: ``[extract] views = 4``). View 0 is
    the eval-mode cache (identical to a views = 1 store); views 1 .. K-1 run the backbone with its train-mode
    dropout (normalisation statistics frozen) and, for images, a random resized crop and flip before the
    image processor. Seeded by the view and example ids (an image's augmentation by its own id; a batch's
    dropout by its examples' ids in order, which a part fixes): resumed and distributed runs store the same
    views. The trainer serves one view per example per epoch (train.views, train.view_schedule). Those splits'
    stores grow ~K x, and extraction runs K forward passes per example; 1 = a plain eval-mode cache."""
    views_splits: Sequence[str] = ("train",)
    """Splits that get the views (when views > 1). Evaluation splits stay eval-mode only: a model is scored,
    and its best epoch picked, on what inference computes (the frozen backbone in eval mode, no augmentation)."""
    augment_scale: Sequence[float] = (0.08, 1.0)
    """Images, views >= 1: the random crop's area as a fraction of the image's, drawn uniformly from this
    range (torchvision's RandomResizedCrop default; e.g. (0.5, 1.0) for a milder crop)."""
    augment_ratio: Sequence[float] = (3 / 4, 4 / 3)
    """Images, views >= 1: the crop's aspect ratio (width / height), drawn log-uniformly from this range."""
    augment_flip: float = 0.5
    """Images, views >= 1: probability of a horizontal flip (0 = never)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.part_size < 1 or self.block_rows < 1:
            raise ValueError(f"batch_size, part_size and block_rows must be >= 1, got {self.batch_size}, "
                             f"{self.part_size}, {self.block_rows}")
        if isinstance(self.layers, str) and self.layers not in ("all", "stages"):
            raise ValueError(f"extract.layers must be 'all', 'stages' or a list of indices, got {self.layers!r}")
        if self.max_grid is not None and self.max_grid < 1:
            raise ValueError(f"extract.max_grid must be >= 1 or unset, got {self.max_grid}")
        if self.workers < 0 or self.retries < 0:
            raise ValueError(f"workers and retries must be >= 0, got {self.workers}, {self.retries}")
        if self.claim_ttl <= 0:
            raise ValueError(f"claim_ttl must be > 0 seconds, got {self.claim_ttl}")
        if self.writer_queue < 1:
            raise ValueError(f"writer_queue must be >= 1, got {self.writer_queue}")
        if self.views < 1:
            raise ValueError(f"extract.views must be >= 1 (1 = the eval-mode cache only), got {self.views}")
        if isinstance(self.views_splits, str) or not all(isinstance(s, str) for s in self.views_splits):
            raise ValueError(f"extract.views_splits must be a list of split names, got {self.views_splits!r}")
        self.views_splits = list(self.views_splits)
        self.augment_scale, self.augment_ratio = tuple(self.augment_scale), tuple(self.augment_ratio)
        if len(self.augment_scale) != 2 or not 0 < self.augment_scale[0] <= self.augment_scale[1] <= 1:
            raise ValueError(f"extract.augment_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{list(self.augment_scale)}")
        if len(self.augment_ratio) != 2 or not 0 < self.augment_ratio[0] <= self.augment_ratio[1]:
            raise ValueError(f"extract.augment_ratio must be (low, high) with 0 < low <= high, got "
                             f"{list(self.augment_ratio)}")
        if not 0 <= self.augment_flip <= 1:
            raise ValueError(f"extract.augment_flip is a probability in [0, 1], got {self.augment_flip}")
