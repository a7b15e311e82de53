"""Search a gallery with a two-tower checkpoint: ``unipt index`` embeds one tower's store once, ``unipt search``
embeds raw queries with the other tower and returns the nearest gallery ids by cosine.

The gallery side never runs a backbone: its embeddings come from the cached activations, through the tower's
side network (:func:`unipt.train.retrieval.embed_split`). The query side runs the backbone on raw text or
images, and reproduces the cached path exactly, as ``unipt predict`` does (the same backbone, checked by hash;
the same tokenisation or image processing; the same hidden states, rounded through the store's dtype), so a
query embedded from raw input equals its embedding from a store of the same input.

An index is a Zarr v3 group at any fsspec URL::

    INDEX/                 attrs["unipt_index"]: format, version, the tower, the checkpoint (absolute path,
                           run, epoch, weights sha256, both towers' store identities), the store (url,
                           identity, examples per split), the engine; written last (an index without it
                           is incomplete and refused)
      embeddings (n, E)    float32, unit rows, in store order (split by split, part order)
      ids        (n,)      string (Zarr v3 variable-length UTF-8): each row's example id
      splits     (n,)      string: each row's split in the store
      hnsw       (bytes,)  uint8, only for --engine faiss-hnsw: faiss.serialize_index of the HNSW graph

Nearest neighbours are exact by default (``torch.topk`` over the full matrix product, chunked over queries):
132 ms for one query over a million 256-dim rows on two CPU cores, recall 1. An HNSW graph (faiss, the
``search`` extra) answers in a few ms but, on random unit vectors, found 46 % of the exact top 10 at 100,000
rows and 10 % at a million (efSearch 256), and took 12 minutes to build at a million (docs/benchmarks.md,
"Search"); so it is built only when asked for (``unipt index --engine faiss-hnsw``), never chosen by
``auto`` on its own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unipt.extract import BackboneConfig, ImageExample, TextEncoder, VisionEncoder, decode_image
from unipt.store import FeatureStore, ProvenanceMismatch, StoreError, check_provenance
from unipt.train import check_store_matches, store_identity
from unipt.train.retrieval import TwoTower, embed_split, load_two_tower

from ._inference import (as_stored, check_device, check_widths, find_backbone, output_format, read_texts,
                         side_autocast)

INDEX_FORMAT = "unipt-gallery-index"
INDEX_VERSION = 1
INDEX_ATTR = "unipt_index"
TOWERS = ("query", "document")
INDEX_ENGINES = ("exact", "faiss-hnsw")  # what `unipt index` can prepare
SEARCH_ENGINES = ("auto", "exact", "faiss-flat", "faiss-hnsw")  # how `unipt search` can look
SCORE_BUDGET = 1 << 25  # floats of one chunk's (queries x gallery) score matrix: 128 MiB
ROW_CHUNK_BYTES = 1 << 24  # bytes per chunk of the stored arrays
ImageInput = Union[str, os.PathLike, bytes, np.ndarray]
log = logging.getLogger("unipt")


# --------------------------------------------------------------------------- nearest neighbours
def exact_search(gallery: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` gallery rows per query by the full matrix product: ((m, k) scores, (m, k) rows), best first.

    Chunked over queries so one chunk's (rows, n) score matrix stays under SCORE_BUDGET floats whatever the
    gallery's size."""
    n = gallery.shape[0]
    k = min(k, n)
    step = max(1, SCORE_BUDGET // max(n, 1))
    scores, rows = [], []
    for start in range(0, len(queries), step):
        s, i = torch.topk(queries[start : start + step] @ gallery.T, k, dim=1)  # (q, n) -> (q, k)
        scores.append(s)
        rows.append(i)
    if not scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(rows)


@dataclass
class HnswOptions:
    m: int = 32
    """Links per node of the HNSW graph (faiss ``M``): more = better recall, more memory, slower build."""
    ef_construction: int = 40
    """Candidates kept while inserting (faiss ``efConstruction``; 40 is faiss's default)."""
    ef_search: int = 256
    """Candidates kept while searching (faiss ``efSearch``): the recall / speed knob, settable per search."""

    def __post_init__(self) -> None:
        for name in ("m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"HNSW {name} must be >= 1, got {getattr(self, name)}")


def import_faiss():
    """faiss, or an error saying how to install it (it is an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss engines need faiss: pip install 'unipt[search]' (faiss-cpu), or use "
                          "--engine exact") from None
    return faiss


def faiss_flat(gallery: torch.Tensor):
    """An exact inner-product faiss index over the (n, E) gallery."""
    faiss = import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.numpy(), dtype=np.float32))
    return index


def build_hnsw(gallery: torch.Tensor, options: HnswOptions):
    """An approximate inner-product HNSW graph over the (n, E) gallery."""
    faiss = import_faiss()
    index = faiss.IndexHNSWFlat(gallery.shape[1], options.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options.ef_construction
    index.add(np.ascontiguousarray(gallery.numpy(), dtype=np.float32))
    return index


def faiss_search(index, queries: torch.Tensor, k: int,
                 ef_search: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """((m, k) scores, (m, k) rows) from a faiss index, best first; a row of -1 is a place HNSW left empty."""
    if ef_search is not None:
        index.hnsw.efSearch = ef_search
    scores, rows = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, index.ntotal))
    return torch.from_numpy(scores), torch.from_numpy(rows)


# --------------------------------------------------------------------------- the index
@dataclass
class GalleryIndex:
    """One tower's gallery: unit embeddings, their ids and splits, and where they came from (``meta``)."""

    embeddings: torch.Tensor  # (n, E) float32, unit rows
    ids: list[str]  # (n,) example ids
    splits: list[str]  # (n,) each row's split
    meta: dict[str, Any]  # the index record (module docstring): tower, checkpoint, store, engine
    hnsw: bytes | None = None  # a serialised faiss HNSW graph over ``embeddings``, or None
    _graph: Any = field(default=None, repr=False)  # the deserialised graph, once searched

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2 or len(self.ids) != len(self.embeddings) or len(self.splits) != len(self.ids):
            raise ValueError(f"an index needs (n, E) embeddings with n ids and n splits; got embeddings "
                             f"{tuple(self.embeddings.shape)}, {len(self.ids)} ids, {len(self.splits)} splits")

    @property
    def tower(self) -> str:
        """The tower the gallery was embedded with."""
        return self.meta["tower"]

    @property
    def query_tower(self) -> str:
        """The tower that embeds queries against this gallery: the other one."""
        return TOWERS[1 - TOWERS.index(self.tower)]

    @property
    def engine(self) -> str:
        return self.meta.get("engine", {}).get("name", "exact")

    # ------------------------------------------------------------------ searching
    def search(self, queries: torch.Tensor, k: int = 10, *, engine: str = "auto",
               ef_search: int | None = None) -> tuple[torch.Tensor, list[list[str]]]:
        """The ``k`` nearest gallery ids per query by cosine: ((m, k) scores, m lists of ids), best first.

        ``queries``: (m, E) unit embeddings. ``engine``: auto (the index's HNSW graph when it has one, else
        exact), exact (matrix product + topk), faiss-flat (faiss's exact search) or faiss-hnsw (the graph;
        ``ef_search`` overrides the efSearch it was built with)."""
        if engine not in SEARCH_ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {SEARCH_ENGINES}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = queries.detach().float().cpu()
        if queries.dim() != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries of shape {tuple(queries.shape)} do not fit this index's "
                             f"{self.embeddings.shape[1]}-dim embeddings; embed them with the checkpoint it names")
        if len(self.ids) == 0:
            return torch.empty(len(queries), 0), [[] for _ in range(len(queries))]
        if engine == "auto":
            engine = "faiss-hnsw" if self.hnsw is not None else "exact"
        if engine == "exact":
            scores, rows = exact_search(self.embeddings, queries, k)
        elif engine == "faiss-flat":
            scores, rows = faiss_search(faiss_flat(self.embeddings), queries, k)
        else:
            scores, rows = faiss_search(self._hnsw_graph(), queries, k, ef_search or self.meta["engine"]["ef_search"])
        ids = [[self.ids[r] for r in row if r >= 0] for row in rows.tolist()]
        return scores, ids

    def _hnsw_graph(self):
        if self.hnsw is None:
            raise ValueError("this index holds no HNSW graph; build one with `unipt index --engine faiss-hnsw`, or "
                             "search with --engine exact (or auto)")
        if self._graph is None:
            self._graph = import_faiss().deserialize_index(np.frombuffer(self.hnsw, dtype=np.uint8))
        return self._graph

    def add_hnsw(self, options: HnswOptions | None = None) -> None:
        """Build the HNSW graph over the embeddings (``search(engine="auto")`` then uses it)."""
        options = options or HnswOptions()
        faiss = import_faiss()
        self._graph = build_hnsw(self.embeddings, options)
        self.hnsw = faiss.serialize_index(self._graph).tobytes()
        self.meta["engine"] = {"name": "faiss-hnsw", "m": options.m, "ef_construction": options.ef_construction,
                               "ef_search": options.ef_search, "faiss": faiss.__version__}

    # ------------------------------------------------------------------ the checkpoint it was built with
    def checkpoint_path(self, override: str | Path | None = None) -> Path:
        """The checkpoint to embed queries with: ``override`` (--checkpoint), else the one the index records."""
        path = Path(override) if override is not None else Path(self.meta["checkpoint"]["path"])
        if not (path / "config.json").is_file():
            if override is not None:
                raise FileNotFoundError(f"--checkpoint {path} is not a checkpoint folder (no config.json)")
            raise FileNotFoundError(f"the index's checkpoint {path} is gone (moved or deleted); pass its current "
                                    "folder with --checkpoint")
        return path

    def check_checkpoint(self, checkpoint: str | Path, config: Mapping[str, Any]) -> None:
        """Refuse a checkpoint other than the one this index was embedded with: its gallery would be in
        another embedding space."""
        recorded = {k: v for k, v in self.meta["checkpoint"].items() if k != "path"}
        check_provenance(recorded, checkpoint_identity(checkpoint, config),
                         what=f"checkpoint {checkpoint} is not the one this index was built with "
                              f"({self.meta['checkpoint']['path']})",
                         hint="Pass that checkpoint (--checkpoint), or rebuild the index with this one (`unipt index`).")

    # ------------------------------------------------------------------ persistence
    def write(self, url: str, *, overwrite: bool = False, storage_options: dict | None = None) -> str:
        """Write the index as a Zarr v3 group at ``url`` (a path or fsspec URL); its record goes last.

        Refuses anything already at ``url``, except an index when ``overwrite`` is set (never a feature store
        or any other data)."""
        import zarr

        url = _local_path(url)
        if _exists(url, storage_options):
            state = _index_state(url, storage_options)
            if state is None:
                raise FileExistsError(f"{url} already holds something that is not an index; choose a new location")
            if not overwrite:
                raise FileExistsError(f"{url} already holds {state}; choose a new location or pass --overwrite "
                                      "to replace it")
        root = zarr.open_group(store=url, mode="w", zarr_format=3, storage_options=storage_options)
        n, width = self.embeddings.shape
        rows = max(1, ROW_CHUNK_BYTES // (4 * max(width, 1)))
        embeddings = root.create_array("embeddings", shape=(n, width), dtype="float32",
                                       chunks=(max(1, min(rows, n)), width))
        embeddings[...] = self.embeddings.contiguous().numpy()
        for key, values in (("ids", self.ids), ("splits", self.splits)):
            array = root.create_array(key, shape=(n,), dtype=str, chunks=(max(1, min(1 << 16, n)),))
            if n:
                array[...] = np.array(values, dtype=object)
        if self.hnsw is not None:
            graph = np.frombuffer(self.hnsw, dtype=np.uint8)
            root.create_array("hnsw", shape=graph.shape, dtype="uint8",
                              chunks=(max(1, min(ROW_CHUNK_BYTES, len(graph))),))[...] = graph
        root.attrs[INDEX_ATTR] = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **self.meta,
                                  "count": n, "embed_dim": width}
        return url

    @classmethod
    def open(cls, url: str, *, storage_options: dict | None = None) -> "GalleryIndex":
        """Read an index written by :meth:`write` (``unipt index``) into memory."""
        import zarr

        url = _local_path(url)
        try:
            root = zarr.open_group(store=url, mode="r", zarr_format=3, storage_options=storage_options)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError):
            raise FileNotFoundError(f"no index at {url}: build one with `unipt index CHECKPOINT --store STORE "
                                    f"--output {url}`") from None
        record = root.attrs.asdict().get(INDEX_ATTR)
        if record is None:
            names = set(root.array_keys())
            if {"embeddings", "ids"} <= names:
                raise ValueError(f"{url} is an incomplete index (its writer stopped before the record that ends "
                                 "it); run `unipt index` again with --overwrite")
            raise ValueError(f"{url} is a Zarr group but not a unipt index (no {INDEX_ATTR!r} attribute)")
        if record.get("format") != INDEX_FORMAT or record.get("version") != INDEX_VERSION:
            raise ValueError(f"{url}: index format {record.get('format')!r} v{record.get('version')} is not "
                             f"{INDEX_FORMAT!r} v{INDEX_VERSION}; rebuild it with this unipt's `unipt index`")
        meta = {k: v for k, v in record.items() if k not in ("format", "version", "count", "embed_dim")}
        n, width = int(record["count"]), int(record["embed_dim"])
        embeddings = torch.from_numpy(np.asarray(root["embeddings"][...], dtype=np.float32)).reshape(n, width)
        ids = [str(v) for v in root["ids"][...]] if n else []
        splits = [str(v) for v in root["splits"][...]] if n else []
        hnsw = bytes(np.asarray(root["hnsw"][...], dtype=np.uint8)) if "hnsw" in set(root.array_keys()) else None
        return cls(embeddings, ids, splits, meta, hnsw)


def checkpoint_identity(checkpoint: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """What ties an index to a two-tower checkpoint: its run and epoch, both towers' store identities and the
    sha256 of its weights (a checkpoint trained again in place is another embedding space)."""
    weights = hashlib.sha256()
    with open(Path(checkpoint) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            weights.update(block)
    return {"run": config.get("run"), "epoch": config.get("epoch"), "weights_sha256": weights.hexdigest(),
            "towers": {t: config["towers"][t]["store"] for t in TOWERS}}


def build_index(checkpoint: str | Path, store: FeatureStore, *, tower: str = "document",
                splits: Sequence[str] | None = None, batch_size: int = 64, device: str = "auto",
                progress: bool = False) -> GalleryIndex:
    """Embed ``splits`` (default: every split) of ``store`` with one tower of a two-tower checkpoint.

    Refuses a store other than the kind the tower was trained from (another backbone or tokenizer, missing
    layers, other widths) and a store whose extraction has not finished."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    check_device(device)
    model, config = load_two_tower(checkpoint, map_location="cpu")
    record = config["towers"][tower]
    check_provenance(record["store"], store_identity(store),
                     what=f"store {store.url} is not a store the {tower} tower of checkpoint {checkpoint} can read",
                     hint=f"Index a store extracted with that tower's backbone ({record['inference'].get('backbone')}), "
                          f"such as the one it was trained from ({record.get('store_url')}), or pick the other "
                          "tower (--tower).")
    check_store_matches(record, store)  # layers and widths
    names = list(splits) if splits else store.splits()
    unknown = sorted(set(names) - set(store.splits()))
    if unknown:
        raise ValueError(f"store {store.url} has no split(s) {unknown}; it has {store.splits()}")
    store.check_complete(names)
    ids: list[str] = []
    rows: list[str] = []
    chunks = []
    for split in names:
        split_ids, embeddings = embed_split(model, store, tower, split, record["layers"], batch_size=batch_size,
                                            device=device, progress=progress)
        if len(split_ids):
            ids += split_ids
            rows += [split] * len(split_ids)
            chunks.append(embeddings.float())
    if not chunks:
        raise ValueError(f"split(s) {names} of store {store.url} hold no examples: nothing to index")
    embeddings = torch.cat(chunks)
    location = str(Path(store.url).resolve()) if "://" not in store.url else store.url
    meta = {"tower": tower, "checkpoint": {"path": str(Path(checkpoint).resolve()),
                                           **checkpoint_identity(checkpoint, config)},
            "store": {"url": location, "identity": store_identity(store),
                      "splits": {s: rows.count(s) for s in names}},
            "engine": {"name": "exact"}}
    return GalleryIndex(embeddings, ids, rows, meta)


# --------------------------------------------------------------------------- the query tower, on raw inputs
class QueryEncoder(nn.Module):
    """Raw texts or images -> frozen backbone -> the tower's hidden states as its store held them -> the tower's
    side network -> (n, E) unit embeddings, equal to the tower's embeddings of the same inputs from a store."""

    def __init__(self, encoder: TextEncoder | VisionEncoder, model: TwoTower, tower: str, *, layers: Sequence[int],
                 storage_dtype: str, modality: str):
        super().__init__()
        out_of_range = [l for l in layers if not 0 <= l < encoder.num_hidden_states]
        if out_of_range:
            raise ValueError(f"the {tower} tower reads hidden states {out_of_range}; the backbone has 0 .. "
                             f"{encoder.num_hidden_states - 1}")
        self.encoder = encoder  # tokenizer / image processor + forward: the extraction code path itself
        self.backbone = encoder.model  # registered, so .to() / .parameters() see it; frozen, eval
        self.model = model.eval().requires_grad_(False)
        self.tower, self.layers, self.storage_dtype, self.modality = tower, list(layers), storage_dtype, modality

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tower: str = "query", backbone: str | None = None, *,
                        device: str = "auto", store: str | FeatureStore | None = None,
                        autocast: str = "auto") -> "QueryEncoder":
        """Assemble one tower of a two-tower checkpoint with its backbone.

        ``backbone``: the model folder (default: where the tower's store found it at extraction); its hashes
        are checked. ``store``: an image tower reads its preprocessing (image size, processor settings,
        max_grid) from the store it was trained from; name it here when it has moved."""
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        check_device(device)
        model, config = load_two_tower(checkpoint, map_location="cpu")
        record = config["towers"][tower]
        inference = record.get("inference") or {}
        modality = inference.get("modality", "text")
        spec, folder = find_backbone(checkpoint, backbone or inference.get("backbone"), record["store"])
        if modality == "text":
            if inference.get("text_pair_column"):
                raise ValueError(f"the {tower} tower of checkpoint {checkpoint} was trained on pairs of texts (column "
                                 f"{inference['text_pair_column']!r}); search embeds one text per query")
            encoder: TextEncoder | VisionEncoder = TextEncoder(BackboneConfig(
                model=str(folder), max_length=int(inference["max_length"]), device=device, autocast=autocast))
        else:
            encoder = _vision_encoder(checkpoint, tower, record, folder, device, autocast, store)
        if encoder.layout != record.get("layout", "tokens"):
            raise ValueError(f"the {tower} tower of checkpoint {checkpoint} reads {record.get('layout')}; backbone "
                             f"{spec} gives {encoder.layout}")
        check_widths(encoder, record["layers"], record["layer_widths"], spec)
        return cls(encoder, model.to(encoder.device), tower, layers=record["layers"],
                   storage_dtype=inference["storage_dtype"], modality=modality)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def train(self, mode: bool = True) -> "QueryEncoder":
        # Inference only: the backbone's dropout stays off (the store was extracted in eval mode).
        return super().train(False)

    def close(self) -> None:
        """Stop the image preprocessor's threads (a text encoder has none)."""
        self.encoder.close()

    @torch.no_grad()
    def encode(self, inputs: Sequence[str] | Sequence[ImageInput], *, batch_size: int = 32,
               progress: bool = False) -> torch.Tensor:
        """(n, E) unit embeddings of texts (a text tower) or images (an image tower: file paths, encoded bytes
        or uint8 arrays), in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs = list(inputs)
        if self.modality == "text":
            not_text = [i for i, x in enumerate(inputs) if not isinstance(x, str) or not x.strip()]
            if not_text:
                bad = inputs[not_text[0]]
                raise ValueError(f"the {self.tower} tower reads text; query {not_text[0] + 1} is "
                                 + (f"a {type(bad).__name__}" if not isinstance(bad, str) else "empty"))
            features = self.encoder.tokenize(inputs) if inputs else []
        else:
            features = self.encoder.prepare(_image_examples(inputs), batch_size).features if inputs else []
        order = sorted(range(len(features)), key=lambda i: -_length(features[i]))  # longest first: less padding
        out = torch.empty(len(features), 0)
        with tqdm(total=len(features), desc="embed queries", unit="q", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                embedded = self.embed([features[i] for i in rows]).cpu()
                if out.shape[1] == 0:
                    out = torch.zeros(len(features), embedded.shape[1])
                out[rows] = embedded
                bar.update(len(rows))
        return out

    @torch.no_grad()
    def embed(self, features: list) -> torch.Tensor:
        """(B, E) unit embeddings of a batch of prepared inputs (token ids, or pixel tensors)."""
        self.encoder.device = self.device  # the encoder pads onto its device: follow any .to() of this module
        hidden, mask = self.encoder.hidden_states(features)  # every hidden state, mask (B, N)
        states = []
        for layer in self.layers:
            h = hidden[layer]
            if h.dim() == 4:  # CNN maps (B, C, H, W): stored channels last, one int8 scale per position
                states.append(as_stored(h.permute(0, 2, 3, 1), self.storage_dtype, layer).permute(0, 3, 1, 2))
            else:  # tokens (B, N, D): padding zeroed, as the loader pads
                states.append(as_stored(h.masked_fill(~mask[..., None], 0.0), self.storage_dtype, layer))
        with side_autocast(self.device):
            return self.model.embed(self.tower, states, mask)


def _length(feature: Any) -> int:
    return len(feature["input_ids"]) if isinstance(feature, dict) else 1


def _image_examples(images: Sequence[ImageInput]) -> list[ImageExample]:
    """Each query image decoded once here, so a missing or broken file is named before the backbone runs."""
    examples = []
    for i, image in enumerate(images):
        where = str(image) if isinstance(image, (str, os.PathLike)) else f"query image {i + 1}"
        pixels = np.asarray(decode_image(image, where))  # RGB (H, W, 3) uint8: what extraction decoded
        examples.append(ImageExample(id=str(i), image=pixels, label=-1, row=i + 1, origin=where))
    return examples


def _vision_encoder(checkpoint: str | Path, tower: str, record: Mapping[str, Any], folder: Path, device: str,
                    autocast: str, store: str | FeatureStore | None) -> VisionEncoder:
    """The image encoder exactly as extraction built it for the tower's store: its max_grid, and the image size
    it was given when the store's processor settings differ from the model folder's own."""
    from unipt.extract import ImagePreprocessor

    url = store if store is not None else record.get("store_url")
    try:
        opened = url if isinstance(url, FeatureStore) else FeatureStore.open(str(url))
    except StoreError as exc:
        raise StoreError(f"{exc}. The {tower} tower of checkpoint {checkpoint} reads images; their preprocessing "
                         "(image size, processor settings) is read from the store it was trained from: pass that "
                         "store's current location (--store)") from None
    check_provenance(record["store"], store_identity(opened),
                     what=f"store {opened.url} is not the one the {tower} tower of checkpoint {checkpoint} was "
                          "trained from",
                     hint="Pass the store it was trained from (--store).")
    recorded = opened.provenance.get("backbone", {})
    fingerprint, size = recorded.get("processor_sha256"), list(recorded.get("image_size") or [])
    image_size = None
    if fingerprint is not None and ImagePreprocessor.from_pretrained(str(folder), workers=0).fingerprint != fingerprint:
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"store {opened.url} was extracted with other image-processor settings than backbone "
                             f"{folder}'s own, and not at one square size ({size}); cannot rebuild its preprocessing")
        image_size = size[0]  # extraction's backbone.image_size
    encoder = VisionEncoder(BackboneConfig(model=str(folder), device=device, autocast=autocast, image_size=image_size),
                            max_grid=recorded.get("max_grid"))
    found = {"processor_sha256": encoder.preprocessor.fingerprint, "image_size": list(encoder.image_shape[1:])}
    expected = {"processor_sha256": fingerprint or found["processor_sha256"], "image_size": size or found["image_size"]}
    try:
        check_provenance(expected, found,
                         what=f"backbone {folder} does not preprocess images as store {opened.url} did",
                         hint="Pass the model folder the store was extracted with (--backbone).")
    except ProvenanceMismatch:
        encoder.close()
        raise
    return encoder


# --------------------------------------------------------------------------- results out
def write_results(path: str | None, queries: Sequence[str], scores: torch.Tensor, ids: Sequence[Sequence[str]]) -> None:
    """Rows (query, rank, id, score), best first per query: a table on stdout (``path`` None), else CSV / TSV /
    JSONL by the suffix of ``path``."""
    rows = [(query, rank + 1, doc, float(scores[q, rank]))
            for q, (query, found) in enumerate(zip(queries, ids)) for rank, doc in enumerate(found)]
    if path is None:
        print(_table(rows))
        return
    kind = output_format(path)
    with open(path, "w", newline="", encoding="utf-8") as out:
        if kind == "jsonl":
            for query, rank, doc, score in rows:
                out.write(json.dumps({"query": query, "rank": rank, "id": doc, "score": score}) + "\n")
            return
        writer = csv.writer(out, delimiter=kind, lineterminator="\n")
        writer.writerow(["query", "rank", "id", "score"])
        writer.writerows([(query, rank, doc, f"{score:.6g}") for query, rank, doc, score in rows])


def _table(rows: Sequence[tuple[str, int, str, float]], width: int = 48) -> str:
    shown = [(q if len(q) <= width else q[: width - 1] + "…", str(r), d, f"{s:.4f}") for q, r, d, s in rows]
    header = ("query", "rank", "id", "score")
    widths = [max([len(header[c])] + [len(row[c]) for row in shown]) for c in range(4)]
    line = lambda cells: "  ".join(c.rjust(w) if i in (1, 3) else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), *map(line, shown)])


# --------------------------------------------------------------------------- the two commands
def add_commands(sub, common) -> None:
    """Add ``unipt index`` and ``unipt search`` to the ``unipt`` parser: ``sub`` is its subparsers, ``common``
    the parent parser of shared options (--quiet, --debug)."""
    ix = sub.add_parser("index", parents=[common], help="embed one tower's gallery from its store into a search index",
                        description="Embed one tower's gallery (every split of its store, or those named) with a "
                                    "two-tower checkpoint, into a Zarr index for `unipt search`. No backbone runs.")
    ix.add_argument("checkpoint", help="a two-tower checkpoint folder (model.safetensors + config.json)")
    ix.add_argument("--store", required=True, help="the tower's feature store (path or URL)")
    ix.add_argument("--split", action="append", default=None, metavar="SPLIT",
                    help="embed this split (repeatable; default: every split of the store)")
    ix.add_argument("--tower", choices=TOWERS, default="document", help="the tower the store feeds (default: document)")
    ix.add_argument("--output", required=True, metavar="INDEX", help="where to write the index (path or URL)")
    ix.add_argument("--overwrite", action="store_true", help="replace an index already at --output")
    ix.add_argument("--engine", choices=INDEX_ENGINES, default="exact",
                    help="exact (default: embeddings only, searched by matrix product) or faiss-hnsw (also build "
                         "an approximate HNSW graph, then searched by default; check its recall on your gallery: "
                         "docs/benchmarks.md, Search; needs faiss: pip install 'unipt[search]')")
    ix.add_argument("--hnsw-m", type=int, default=HnswOptions.m,
                    help="faiss-hnsw: links per node (default: %(default)s)")
    ix.add_argument("--ef-construction", type=int, default=HnswOptions.ef_construction,
                    help="faiss-hnsw: candidates while building (default: %(default)s)")
    ix.add_argument("--ef-search", type=int, default=HnswOptions.ef_search,
                    help="faiss-hnsw: candidates while searching, recorded as the index's default (%(default)s)")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ix.set_defaults(handler=_cmd_index)

    se = sub.add_parser("search", parents=[common], help="nearest gallery ids of raw text or image queries",
                        description="Embed queries with the other tower of the index's checkpoint (backbone + side "
                                    "network) and print the k nearest gallery ids by cosine.")
    se.add_argument("index", help="an index written by `unipt index` (path or URL)")
    queries = se.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", action="append", metavar="TEXT", help="a text query (repeatable)")
    queries.add_argument("--queries", metavar="FILE", help=".txt with one query per line, or CSV/TSV/JSONL/Parquet "
                                                          "with a text column")
    queries.add_argument("--image", action="append", metavar="PATH", help="an image query (repeatable)")
    se.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    se.add_argument("--text-column", default="text", help="--queries table: the column holding the text")
    se.add_argument("--checkpoint", metavar="DIR", help="the index's checkpoint, where it now is (default: the "
                                                        "path the index records)")
    se.add_argument("--backbone", metavar="PATH", help="the query tower's backbone folder or pkg:// path (default: "
                                                       "where its store found it); hashes are checked")
    se.add_argument("--store", metavar="URL", help="an image query tower's store, where it now is (its "
                                                   "preprocessing settings are read from it)")
    se.add_argument("--output", metavar="FILE", help=".csv, .tsv or .jsonl rows of query, rank, id, score "
                                                     "(default: a table on stdout)")
    se.add_argument("--engine", choices=SEARCH_ENGINES, default="auto",
                    help="auto (the index's HNSW graph when it has one, else exact), exact, faiss-flat or faiss-hnsw")
    se.add_argument("--ef-search", type=int, help="faiss-hnsw: candidates while searching (default: the index's)")
    se.add_argument("--batch-size", type=int, default=32)
    se.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    se.set_defaults(handler=_cmd_search)


def _cmd_index(args) -> int:
    if args.engine == "faiss-hnsw":
        options = HnswOptions(m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
        _cli_faiss()  # missing faiss fails before the gallery is embedded
    index = build_index(args.checkpoint, FeatureStore.open(args.store), tower=args.tower, splits=args.split,
                        batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    if args.engine == "faiss-hnsw":
        index.add_hnsw(options)
    index.write(args.output, overwrite=args.overwrite)
    splits = ", ".join(f"{s} {n}" for s, n in index.meta["store"]["splits"].items())
    print(f"indexed {len(index.ids)} {index.tower} embeddings ({splits}; {index.embeddings.shape[1]} dims, "
          f"engine {index.engine}) into {args.output}")
    return 0


def _cmd_search(args) -> int:
    output_format(args.output or "table.csv")  # a bad --output suffix or k fails before anything is loaded
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.engine in ("faiss-flat", "faiss-hnsw"):
        _cli_faiss()
    index = GalleryIndex.open(args.index)
    checkpoint = index.checkpoint_path(args.checkpoint)
    _, config = load_two_tower(checkpoint, map_location="cpu")
    index.check_checkpoint(checkpoint, config)
    tower = index.query_tower
    modality = (config["towers"][tower].get("inference") or {}).get("modality", "text")
    if args.image and modality != "image":
        raise ValueError(f"the {tower} tower of checkpoint {checkpoint} reads {modality}, not images: search this "
                         "index with --query TEXT or --queries FILE")
    if not args.image and modality == "image":
        raise ValueError(f"the {tower} tower of checkpoint {checkpoint} reads images, not text: search this index "
                         "with --image PATH")
    if args.image:
        labels: list[str] = list(args.image)
        inputs: list = list(args.image)
    else:
        labels = inputs = list(args.query) if args.query else read_texts(args.queries, args.text_column)[1]
    encoder = QueryEncoder.from_checkpoint(checkpoint, tower, args.backbone, device=args.device, store=args.store)
    try:
        embeddings = encoder.encode(inputs, batch_size=args.batch_size, progress=not args.quiet)
    finally:
        encoder.close()
    scores, ids = index.search(embeddings, args.k, engine=args.engine, ef_search=args.ef_search)
    write_results(args.output, labels, scores, ids)
    if args.output:
        log.info("wrote %d results for %d queries to %s", sum(map(len, ids)), len(labels), args.output)
    return 0


def _cli_faiss() -> None:
    try:
        import_faiss()
    except ImportError as exc:  # the command line reports RuntimeErrors as one-line errors
        raise RuntimeError(str(exc)) from None


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _exists(url: str, storage_options: dict | None) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path) and not (fs.isdir(path) and not fs.ls(path))  # an empty folder is free to use


def _index_state(url: str, storage_options: dict | None) -> str | None:
    """"an index", "an incomplete index" (arrays written, no record) or None: anything else, never replaced."""
    import warnings

    import zarr

    try:
        with warnings.catch_warnings():  # listing a feature store warns of its non-Zarr files (claims)
            warnings.simplefilter("ignore")
            root = zarr.open_group(store=url, mode="r", zarr_format=3, storage_options=storage_options)
            record = root.attrs.asdict().get(INDEX_ATTR)
            arrays, groups = set(root.array_keys()), set(root.group_keys())
    except Exception:  # a file, a store of another kind, unreadable metadata: not an index
        return None
    if isinstance(record, dict) and record.get("format") == INDEX_FORMAT:
        return "an index"
    if record is None and not groups and {"embeddings"} <= arrays <= {"embeddings", "ids", "splits", "hnsw"}:
        return "an incomplete index"
    return None
