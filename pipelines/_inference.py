"""Inference: frozen backbone + trained side network (+ its head) as one module that predicts from raw text.

It predicts what the checkpoint's task predicts (a class, a set of labels, values, one tag per word), from
the inputs its store was made of: texts, pairs of texts (encoded together, as extraction encoded them) or
lists of words. Its logits equal the cached path's (the side network fed from the store) on the same examples, because
every step between text and side network is the one training saw:

* the same backbone, checked by the sha256 of its weight and tokenizer files against the checkpoint's store;
* the extraction code's own tokenisation (same ``max_length``, truncation) and forward pass (eval mode,
  ``output_hidden_states``, the same autocast rule on GPU);
* the same hidden states (the checkpoint's layers, 0 = embeddings), padding zeroed as the loader pads;
* the same rounding: activations go through the dtype of the store the side network was trained from
  (float16, bfloat16, int8; float32 is exact), then back to float32, as the loader dequantises them.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from unipt.extract import (
    BackboneConfig,
    BadInputError,
    SourceConfig,
    SourceData,
    TextEncoder,
    TextInputs,
    backbone_hashes,
    load_source,
    resolve_model_dir,
)
from unipt.store import STORAGE_DTYPES, FeatureStore, StoreError, ValueRangeError, check_provenance, round_trip
from unipt.train import Task, check_store_matches, checkpoint_task, load_checkpoint, task_for
from unipt.train._checkpoint import read_checkpoint_config

_HASH_FIELDS = ("weights_sha256", "tokenizer_sha256")
_INPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".txt")
_OUTPUT_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class Predictions:
    records: list[dict[str, Any]]  # per input, the task's prediction by name (Task.predictions)
    logits: torch.Tensor | list[torch.Tensor]  # the side network's raw outputs: (B, K), or per token a list of
    #                                           (tokens, K), one per input
    label_names: list[str]  # the task's classes, labels, targets or tags
    task: str = "classification"

    @property
    def labels(self) -> list[Any]:
        """The predicted class (classification), label set (multilabel), values (regression) or tags."""
        key = {"classification": "label", "multilabel": "labels", "tagging": "tags"}.get(self.task)
        return [r[key] if key else [r[n] for n in self.label_names] for r in self.records]

    @property
    def probabilities(self) -> torch.Tensor:
        """(B, C) class probabilities (classification: softmax; multilabel: per-label sigmoid)."""
        if self.task not in ("classification", "multilabel"):
            raise ValueError(f"a {self.task} prediction has no class probabilities")
        return torch.tensor([[r[f"prob_{n}"] for n in self.label_names] for r in self.records]).reshape(
            len(self.records), len(self.label_names))


class SideNetworkPredictor(nn.Module):
    """Raw texts -> frozen backbone -> selected hidden states -> side network + head -> class logits."""

    def __init__(self, encoder: TextEncoder, side_network: nn.Module, *, layers: Sequence[int],
                 storage_dtype: str, label_names: Sequence[str], task: Task | None = None,
                 text_pair_column: str | None = None):
        super().__init__()
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
        out_of_range = [l for l in layers if not 0 <= l < encoder.num_hidden_states]
        if out_of_range:
            raise ValueError(f"side network reads hidden states {out_of_range}; the backbone has 0 .. "
                             f"{encoder.num_hidden_states - 1}")
        self.encoder = encoder  # tokenizer + padding + forward: the extraction code path itself
        self.backbone = encoder.model  # registered, so .to() / .parameters() see it; frozen, eval
        self.side_network = side_network.eval().requires_grad_(False)
        self.layers = list(layers)
        self.storage_dtype = storage_dtype
        self.label_names = list(label_names)
        self.task = task or task_for("classification", self.label_names)
        self.text_pair_column = text_pair_column  # the store was made of pairs: its second text's column

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, backbone: str | None = None, *, device: str = "auto",
                        store: str | FeatureStore | None = None, autocast: str = "auto") -> "SideNetworkPredictor":
        """Assemble a checkpoint with its backbone.

        ``backbone``: the model folder (or pkg:// path); default: where the store's backbone was found at
        extraction. ``store``: read the backbone location, ``max_length`` and storage dtype from this store
        rather than from the checkpoint (or the store it recorded). ``autocast``: the backbone's precision
        on GPU, as in extraction (auto = float16); CPU runs float32.
        """
        check_device(device)
        config = read_checkpoint_config(checkpoint)
        record = _inference_record(checkpoint, config, store)
        if record.get("modality", "text") != "text":
            raise ValueError(f"checkpoint {checkpoint} was trained on {record['modality']} features; `unipt predict` "
                             "labels raw texts. For images, extract them into a store (`unipt extract`) and score "
                             "it with `unipt eval`.")
        spec, folder = find_backbone(checkpoint, backbone or record.get("backbone"), config["store"])
        # A side network that runs a frozen backbone block itself (SHERL) reads it from the folder found here.
        options = {"backbone": str(folder)} if "backbone" in config["model"] else None
        side_network, config = load_checkpoint(checkpoint, map_location="cpu", model_options=options)
        encoder = TextEncoder(BackboneConfig(model=str(folder), max_length=int(record["max_length"]),
                                             device=device, autocast=autocast))
        check_widths(encoder, config["layers"], config["layer_widths"], spec)
        return cls(encoder, side_network.to(encoder.device), layers=config["layers"],
                   storage_dtype=record["storage_dtype"], label_names=config["store"]["label_names"],
                   task=checkpoint_task(config), text_pair_column=record.get("text_pair_column"))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def train(self, mode: bool = True) -> "SideNetworkPredictor":
        # Inference only: the backbone's dropout stays off (the store was extracted in eval mode).
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                words: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """Outputs of a batch: (B, K), or (B, N, K) for a per-token task; inputs as for ``encoder.tokenize``."""
        return self.logits(self.encoder.tokenize(texts, pairs, words))

    @torch.no_grad()
    def logits(self, features: list[dict[str, list[int]]]) -> torch.Tensor:
        """Outputs (B, K) or (B, N, K) of a batch of tokenised inputs (``encoder.tokenize`` output)."""
        self.encoder.device = self.device  # the encoder pads onto its device: follow any .to() of this module
        hidden, mask = self.encoder.hidden_states(features)  # every hidden state (B, N, D), mask (B, N)
        inputs = [self._as_stored(hidden[l].masked_fill(~mask[..., None], 0.0), l) for l in self.layers]
        with side_autocast(self.device):
            return self.side_network(inputs, mask).float()  # (B, C)

    def predict(self, inputs: Sequence[str] | TextInputs, *, batch_size: int = 32,
                progress: bool = False) -> Predictions:
        """The task's predictions for any number of inputs (texts, or TextInputs with pairs or words), batched
        longest first and returned in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs = inputs if isinstance(inputs, TextInputs) else TextInputs(list(inputs))
        self._check_inputs(inputs)
        features = self.encoder.tokenize(inputs.texts, inputs.pairs, inputs.words) if len(inputs.texts) else []
        order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # less padding
        records: list[dict[str, Any]] = [{} for _ in features]
        outputs: list[torch.Tensor] = [torch.empty(0) for _ in features]
        with tqdm(total=len(features), desc="predict", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = [features[i] for i in rows]
                scores = self.logits(batch).cpu()
                for i, record, score in zip(rows, self.task.predictions(scores, _word_starts(batch, scores)),
                                            self._unpadded(scores, batch)):
                    records[i], outputs[i] = record, score
                bar.update(len(rows))
        logits = outputs if self.task.per_token or not outputs else torch.stack(outputs)
        return Predictions(records, logits, self.label_names, self.task.kind)

    def _check_inputs(self, inputs: TextInputs) -> None:
        if self.task.per_token and inputs.words is None:
            raise ValueError("this side network tags words: give each input as a list of words (TextInputs(words=...))")
        if self.text_pair_column is not None and inputs.pairs is None:
            raise ValueError(f"this side network was trained on pairs of texts (its store's second text was "
                             f"{self.text_pair_column!r}): give both texts of each input (--text-pair-column)")

    def _unpadded(self, scores: torch.Tensor, features: list[dict[str, Any]]) -> list[torch.Tensor]:
        if not self.task.per_token:
            return list(scores)
        return [scores[b, : len(f["input_ids"])] for b, f in enumerate(features)]

    def _as_stored(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return as_stored(h, self.storage_dtype, layer)


# --------------------------------------------------------------------------- backbone and inputs, as stored
# Shared with unipt search's QueryEncoder: every step from raw input to side network is the one training saw.
def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use auto or cpu")


def find_backbone(checkpoint: str | Path, spec: str | None, identity: Mapping[str, Any]) -> tuple[str, Path]:
    """(spec, local folder) of a checkpoint's backbone, its weight and tokenizer hashes checked against
    ``identity`` (the store identity the checkpoint, or one of its towers, was trained from)."""
    if not spec:
        raise ValueError(f"checkpoint {checkpoint} does not record where its backbone is; pass it (--backbone)")
    try:
        folder = resolve_model_dir(spec)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}. The backbone of checkpoint {checkpoint} was {spec!r}; pass its folder "
                                "(--backbone) if it now lives elsewhere") from None
    expected = {k: identity.get(k) for k in _HASH_FIELDS}
    check_provenance(expected, backbone_hashes(folder),
                     what=f"backbone {spec} is not the one checkpoint {checkpoint} was trained on",
                     hint="Pass the model folder the checkpoint's store was extracted with (--backbone).")
    return spec, folder


def check_widths(encoder: Any, layers: Sequence[int], widths: Sequence[int], spec: str) -> None:
    """Refuse a backbone whose hidden states are not as wide as the ones the side network was trained on."""
    for layer, width in zip(layers, widths):
        if layer < encoder.num_hidden_states and encoder.widths[layer] != width:
            raise ValueError(f"checkpoint needs hidden state {layer} of width {width}; backbone {spec} gives "
                             f"width {encoder.widths[layer]}")


def as_stored(h: torch.Tensor, storage_dtype: str, layer: int) -> torch.Tensor:
    """Hidden states (B, N, D) -> float32 after the round trip through the store's dtype."""
    out = round_trip(h, storage_dtype)
    if not torch.isfinite(out).all():
        raise ValueRangeError(f"hidden state {layer} has values a {storage_dtype} store cannot hold "
                              "(inf/NaN after rounding); extraction would have refused this input too")
    return out


def _inference_record(checkpoint: str | Path, config: Mapping[str, Any],
                      store: str | FeatureStore | None) -> dict[str, Any]:
    """Where the backbone was, its max_length, and the storage dtype the side network was trained through:
    from the checkpoint's ``inference`` entry, else from its store (``store``, or the one it recorded)."""
    if store is None and config.get("inference"):
        return dict(config["inference"])
    url = store if store is not None else config.get("store_url")
    if url is None:
        raise ValueError(f"checkpoint {checkpoint} records neither its inference inputs nor its store; pass the "
                         "store it was trained from (--store) to read the backbone, max_length and dtype")
    try:
        opened = url if isinstance(url, FeatureStore) else FeatureStore.open(url)
    except StoreError as exc:
        raise StoreError(f"{exc}. Checkpoint {checkpoint} takes its backbone, max_length and storage dtype from "
                         "the store it was trained from; pass that store's current location (--store)") from None
    check_store_matches(config, opened)
    recorded = opened.provenance.get("backbone", {})
    if not recorded.get("max_length"):
        raise ValueError(f"store {opened.url} does not record the backbone's max_length; cannot reproduce its "
                         "truncation")
    return {"backbone": recorded.get("location"), "max_length": recorded["max_length"],
            "storage_dtype": opened.dtype}


def checkpoint_inputs(checkpoint: str | Path) -> tuple[bool, str | None]:
    """What a checkpoint's inputs are, without loading its backbone: (words to tag?, the store's pair column)."""
    _, config = load_checkpoint(checkpoint, map_location="cpu")
    return checkpoint_task(config).per_token, (config.get("inference") or {}).get("text_pair_column")


def _word_starts(features: list[dict[str, Any]], scores: torch.Tensor) -> torch.Tensor | None:
    """(B, N) True on the first token of each word, for inputs given as words (None otherwise)."""
    if "word_ids" not in features[0]:
        return None
    starts = torch.zeros(scores.shape[:2], dtype=torch.bool)
    for b, feature in enumerate(features):
        previous = None
        for position, word in enumerate(feature["word_ids"]):
            starts[b, position] = word is not None and word != previous
            previous = word
    return starts


def side_autocast(device: torch.device):
    # As unipt.train.evaluate scores the side network: bfloat16 autocast on GPU, float32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# --------------------------------------------------------------------------- files in, files out
def read_texts(path: str, text_column: str = "text", id_column: str | None = None) -> tuple[list[str] | None, list[str]]:
    """(ids, texts) of an input file: :func:`read_inputs` for single texts."""
    ids, inputs = read_inputs(path, text_column, id_column)
    return ids, inputs.texts


def read_inputs(path: str, text_column: str = "text", id_column: str | None = None, *,
                text_pair_column: str | None = None, words: bool = False) -> tuple[list[str] | None, TextInputs]:
    """(ids, inputs) of an input file, in file order: CSV/TSV/JSONL/Parquet rows read as extraction reads a
    source (no dedupe, no split), or plain text with one example per line (blank lines skipped; the id is
    the line number). ``text_pair_column``: each row's second text (a pair input); ``words``: the text column
    holds words to tag (a list, or a string split on whitespace). A row extraction would refuse (empty text,
    a malformed CSV record, ...) raises :class:`BadInputError` naming it.

    ``id_column`` None: the ``id`` column when there is one, else no ids.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    if file.is_file() and file.suffix.lower() not in _INPUT_SUFFIXES:
        raise ValueError(f"cannot tell the format of {path} from its suffix; use one of {list(_INPUT_SUFFIXES)}")
    if file.suffix.lower() == ".txt":
        if text_pair_column:
            raise ValueError(f"{path}: a plain-text input has one text per line; pairs need a table (CSV, TSV, JSONL)")
        with open(file, encoding="utf-8") as f:
            lines = [(str(number), line.rstrip("\r\n")) for number, line in enumerate(f, start=1) if line.strip()]
        if not lines:
            raise ValueError(f"input file {path} has no text")
        texts = [t for _, t in lines]
        return [i for i, _ in lines], TextInputs(texts, words=[tuple(t.split()) for t in texts] if words else None)

    def load(ids_from: str | None) -> SourceData:
        return load_source(SourceConfig(path=str(path), text_column=text_column, label_column=None,
                                        id_column=ids_from, dedupe=False, splits={"input": 1.0},
                                        task="tagging" if words else "classification",
                                        text_pair_column=text_pair_column))

    try:
        try:
            data, ids_present = load(id_column or "id"), True
        except KeyError:
            if id_column is not None:
                raise
            data, ids_present = load(None), False  # no "id" column: no ids (a wrong text column raises again)
    except KeyError as exc:
        raise KeyError(f"{exc.args[0]}; choose the input's columns with --text-column / --text-pair-column / "
                       "--id-column") from None
    except BadInputError as exc:  # its advice names source.bad_input, a recipe option predict has no way to set
        raise BadInputError(exc.problem, "Fix or remove that row of the input file") from None
    examples = [ex for split in data.splits.values() for ex in split]
    return ([ex.id for ex in examples] if ids_present else None), TextInputs.of(examples)


def output_format(path: str | None) -> str:
    """The CSV delimiter, or "jsonl", that ``path``'s suffix asks for (None = stdout: CSV)."""
    kind = "," if path is None else _OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"cannot tell the output format of {path} from its suffix; use one of "
                         f"{list(_OUTPUT_FORMATS)}")
    return kind


def write_predictions(path: str | None, predictions: Predictions, ids: Sequence[str] | None = None) -> None:
    """One row per input: id (when known), then the task's prediction (classification: label and one
    ``prob_<label>`` per class; multilabel: labels and ``prob_<label>``; regression: one column per target;
    tagging: tags, one per word). CSV / TSV / JSONL by the suffix of ``path``; None = CSV on stdout. In CSV, a
    list (labels, tags) is one cell: labels joined by "|", tags by spaces."""
    kind = output_format(path)
    out = sys.stdout if path is None else open(path, "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(out, delimiter=kind, lineterminator="\n") if kind != "jsonl" else None
        header = None
        for i, record in enumerate(predictions.records):
            row = {**({"id": ids[i]} if ids is not None else {}), **record}
            if writer is None:
                out.write(json.dumps(row) + "\n")
                continue
            if header is None:
                header = list(row)
                writer.writerow(header)
            writer.writerow([_cell(key, row[key]) for key in header])
        if writer is not None and header is None:  # no inputs: the header alone
            writer.writerow((["id"] if ids is not None else []) + _columns(predictions))
    finally:
        if out is not sys.stdout:
            out.close()


def _cell(key: str, value: Any) -> str:
    if isinstance(value, list):
        return ("|" if key == "labels" else " ").join(map(str, value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _columns(predictions: Predictions) -> list[str]:
    names = predictions.label_names
    return {"classification": ["label", *(f"prob_{n}" for n in names)],
            "multilabel": ["labels", *(f"prob_{n}" for n in names)],
            "tagging": ["tags"]}.get(predictions.task, list(names))
