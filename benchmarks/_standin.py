"""Stand-ins for scale benchmarks, built offline in seconds: a tiny random text backbone, and synthetic text sources.

    from _standin import standin_backbone, write_text_source
    model = standin_backbone("runs/bench/tiny-bert", hidden=32, layers=1)
    csv = write_text_source("runs/bench/texts.csv", 1_000_000, seed=0)       # or fmt="parquet" / "jsonl"

The backbone is a random-initialised BERT with a WordPiece tokenizer over a small English word list, saved as
a transformers folder (``backbone.model = <folder>``). Its features mean nothing; it exercises the whole
extraction path (tokenize, forward, cast, compress, write, commit) at a fraction of a real model's cost.
The sources hold distinct texts of 1 .. 12 words and a 3-class label that follows the words; they are the
same for the same seed and written in chunks, so 10^6 rows never sit in memory at once.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import numpy as np

WORDS = ("good bad great awful fine movie film plot actor scene love hate boring fun slow fast music "
         "story ending happy sad dark light long short best worst really very quite not").split()
LABELS = ("negative", "neutral", "positive")
_POSITIVE = {"good", "great", "love", "best", "fun", "happy"}
_NEGATIVE = {"bad", "awful", "hate", "worst", "boring", "sad"}
FORMATS = ("csv", "parquet", "jsonl")
MAX_ROWS = len(WORDS) ** 5  # distinct row-number suffixes (24.3 million)


def standin_backbone(folder: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 2,
                     max_length: int = 64, seed: int = 0) -> Path:
    """Save a random-initialised BERT (``layers`` x ``hidden``) + WordPiece tokenizer into ``folder``; returns it.

    The same arguments give the same weights (and so the same weight hashes in a store's provenance).
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # A dict, not a vocab file: transformers 5 builds the tokenizer from `vocab` and ignores `vocab_file`.
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")  # as BERT folders ship it
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_length)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def text_rows(n_rows: int, seed: int = 0, chunk_rows: int = 65_536) -> Iterator[tuple[list[str], list[str]]]:
    """(texts, labels) chunks of at most ``chunk_rows``: ``n_rows`` distinct texts in all, the same for a seed.

    Texts are 1 .. 12 random words (the label follows them), then 5 words spelling the row number in base
    30, so no two rows repeat (a source that deduplicates keeps every row).
    """
    if not 0 <= n_rows <= MAX_ROWS or chunk_rows <= 0:
        raise ValueError(f"n_rows must be in 0 .. {MAX_ROWS} and chunk_rows > 0, got {n_rows} and {chunk_rows}")
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    positive = np.isin(words, list(_POSITIVE)).astype(np.int64) - np.isin(words, list(_NEGATIVE))
    base = len(WORDS)
    for start in range(0, n_rows, chunk_rows):
        n = min(chunk_rows, n_rows - start)
        lengths = rng.integers(1, 13, size=n)
        picks = rng.integers(0, base, size=(n, 12))
        index = np.arange(start, start + n)
        tags = np.stack([(index // base**k) % base for k in (4, 3, 2, 1, 0)], axis=1)
        texts, labels = [], []
        for row, length, tag in zip(picks, lengths, tags):
            chosen = row[:length]
            score = int(positive[chosen].sum())
            texts.append(" ".join([*words[chosen], *words[tag]]))
            labels.append(LABELS[0 if score < 0 else 2 if score > 0 else 1])
        yield texts, labels


def write_text_source(path: str | Path, n_rows: int, *, seed: int = 0, fmt: str | None = None,
                      row_group_rows: int = 65_536) -> Path:
    """Write ``n_rows`` synthetic labelled texts (columns ``text``, ``label``) to ``path``; returns it.

    ``fmt``: "csv", "parquet" or "jsonl" (default: from the file's suffix). Rows are produced and written
    ``row_group_rows`` at a time (for Parquet, one row group each); see :func:`text_rows`.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; valid: {list(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = text_rows(n_rows, seed, row_group_rows)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("text", pa.string()), ("label", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for texts, labels in chunks:
                writer.write_table(pa.table({"text": texts, "label": labels}, schema=schema))
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for texts, labels in chunks:
                out.writerows(zip(texts, labels))
        else:
            for texts, labels in chunks:
                f.writelines(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels))
    return path
