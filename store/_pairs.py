"""The pair index of a retrieval dataset: which documents are relevant to each query, per split, joining two
ordinary feature stores (one per tower) by their example ids.

A retrieval dataset is two stores, each extracted by its own backbone from its own table (captions, images;
KJV verses, WEB verses), and a table of (query id, document id) pairs. Building the index checks every pair
against both stores: a pair with one side stored and the other not is refused, and so is a pair whose two ids
sit in different splits (sources split by the document's id or group put all captions of an image in one
split); a pair neither of whose ids is stored lies outside the extracted subset (both towers capped alike) and
is left out. The index records what each store was made of (backbone hashes,
source fingerprint, layers), so a store re-extracted from other data or another backbone is refused rather
than silently joined. Either store can be swapped for another one of the same ids (a text store reused with
another image store): the index is rebuilt from the same pairs.

Saved as one JSON document (``pairs.json``) at any fsspec URL, beside the training outputs::

    {"format": "unipt-pairs", "version": 1,
     "query_store": {"url", "identity"}, "document_store": {"url", "identity"}, "pairs_source": {...},
     "splits": {"test": {"queries": [ids], "documents": [ids], "relevant": [[document positions], ...]}}}

``documents`` of a split are every document stored in it, related to a query or not (the whole gallery);
``queries`` are the stored queries that have at least one relevant document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import fsspec

from ._provenance import check_provenance

PAIRS_FORMAT = "unipt-pairs"
PAIRS_VERSION = 1
TOWERS = ("query", "document")


@dataclass
class SplitPairs:
    """One split's gallery: its query and document ids (in store order) and each query's relevant documents."""

    queries: list[str]
    documents: list[str]
    relevant: list[list[int]]  # per query: positions in ``documents``

    @property
    def num_pairs(self) -> int:
        return sum(len(r) for r in self.relevant)

    def query_documents(self) -> list[list[int]]:
        """The inverse relation: per document, the positions of the queries it is relevant to."""
        out: list[list[int]] = [[] for _ in self.documents]
        for q, docs in enumerate(self.relevant):
            for d in docs:
                out[d].append(q)
        return out


def store_record(store) -> dict[str, Any]:
    """What a tower's store was made of, as the index records and checks it (not where it lives, nor its
    storage dtype: a float32 and a float16 store of the same extraction join the same pairs)."""
    backbone = store.provenance.get("backbone")
    backbone = backbone if isinstance(backbone, Mapping) else {}
    source = store.provenance.get("source")
    source = source if isinstance(source, Mapping) else {}
    return {"weights_sha256": backbone.get("weights_sha256"), "tokenizer_sha256": backbone.get("tokenizer_sha256"),
            "source_fingerprint": source.get("fingerprint"), "layers": list(store.layers),
            "splits": {split: store.num_examples(split) for split in store.splits()}}


def stored_ids(store, split: str) -> list[str]:
    """Every example id of a split, in part order (reads the id columns only)."""
    return [str(i) for part in store.parts(split) for i in store.read_part(part, layers=[]).example_id]


class PairIndex:
    """Relevant documents per query and split; see the module docstring."""

    def __init__(self, splits: Mapping[str, SplitPairs], query_store: Mapping[str, Any],
                 document_store: Mapping[str, Any], pairs_source: Mapping[str, Any] | None = None):
        self.splits = dict(splits)
        self.stores = {"query": dict(query_store), "document": dict(document_store)}
        self.pairs_source = dict(pairs_source or {})

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, pairs: Iterable[tuple[str, str]], query_store, document_store, *,
              pairs_source: Mapping[str, Any] | None = None, splits: Sequence[str] | None = None) -> "PairIndex":
        """Join ``pairs`` (query id, document id) with the two stores, split by split.

        Refuses, naming a few ids and the fix: a pair whose query or document is not stored, and a pair whose
        two ids sit in different splits."""
        relevant: dict[str, list[str]] = {}
        for query, document in pairs:
            docs = relevant.setdefault(str(query), [])
            if str(document) not in docs:
                docs.append(str(document))
        if not relevant:
            raise ValueError("the pair table holds no (query, document) pairs")
        names = list(splits) if splits is not None else [s for s in document_store.splits() if s in query_store.splits()]
        where = {tower: {} for tower in TOWERS}  # id -> split, per tower
        order: dict[str, dict[str, list[str]]] = {tower: {} for tower in TOWERS}
        for tower, store in (("query", query_store), ("document", document_store)):
            for split in store.splits():
                ids = stored_ids(store, split)
                order[tower][split] = ids
                where[tower].update(dict.fromkeys(ids, split))
        # A pair neither of whose examples is stored lies outside the extracted subset (caps draw the same ids in
        # both towers): left out. A pair with only one side stored is a join that cannot be made: refused.
        stored = {(q, d): (q in where["query"], d in where["document"]) for q, docs in relevant.items() for d in docs}
        one_sided = [(q, d, has_q) for (q, d), (has_q, has_d) in stored.items() if has_q != has_d]
        if one_sided:
            shown = ", ".join(f"{q} -> {d} (only the {'query' if has_q else 'document'} is stored)"
                              for q, d, has_q in one_sided[:5])
            raise ValueError(
                f"{len(one_sided)} pair(s) join an example of one store with an id the other store lacks, e.g. "
                f"{shown} (query store {query_store.url}, document store {document_store.url}); extract both towers "
                "from the same pair table with the same splits and caps (source.max_examples draws by id: the two "
                "towers' ids must then be equal), and keep bad_input = \"error\" so no row is skipped on one side only")
        outside = sum(1 for has in stored.values() if not any(has))
        relevant = {q: [d for d in docs if stored[q, d][0]] for q, docs in relevant.items()}
        relevant = {q: docs for q, docs in relevant.items() if docs}
        if not relevant:
            raise ValueError(f"no pair of the pair table has its query in {query_store.url} and its document in "
                             f"{document_store.url}: are these the stores of this pair table's towers?")
        crossed = [(q, d) for q, docs in relevant.items() for d in docs if where["query"][q] != where["document"][d]]
        if crossed:
            shown = ", ".join(f"{q} ({where['query'][q]}) -> {d} ({where['document'][d]})" for q, d in crossed[:5])
            raise ValueError(f"{len(crossed)} pair(s) join a query and a document of different splits, e.g. {shown}; "
                             "draw both towers' splits from the document: the same splits and caps, with the "
                             "document's id as the query source's group_column (or the same group column in both)")
        out = {}
        for split in names:
            docs = order["document"].get(split, [])
            at = {d: i for i, d in enumerate(docs)}
            queries = [q for q in order["query"].get(split, []) if q in relevant]
            out[split] = SplitPairs(queries, docs, [[at[d] for d in relevant[q]] for q in queries])
        source = {**(pairs_source or {}), "pairs": sum(len(d) for d in relevant.values()),
                  "pairs_not_stored": outside}
        return cls(out, store_record(query_store) | {"url": query_store.url},
                   store_record(document_store) | {"url": document_store.url}, source)

    # ------------------------------------------------------------------ checking and reading
    def check_stores(self, query_store, document_store) -> None:
        """Refuse a store that is not the one the index was built from (another backbone, source or layers)."""
        for tower, store in (("query", query_store), ("document", document_store)):
            recorded = {k: v for k, v in self.stores[tower].items() if k != "url"}
            check_provenance(recorded, store_record(store),
                             what=f"{tower} store {store.url} is not the one this pair index was built from",
                             hint="Rebuild the pair index from these stores (`unipt train` does it when the recipe's "
                                  "stores change), or point at the stores it names.")

    def split(self, name: str) -> SplitPairs:
        if name not in self.splits:
            raise ValueError(f"the pair index has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def describe(self) -> str:
        return "; ".join(f"{name}: {len(s.queries):,} queries, {len(s.documents):,} documents, {s.num_pairs:,} pairs"
                         for name, s in self.splits.items())

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "query_store": self.stores["query"],
                "document_store": self.stores["document"], "pairs_source": self.pairs_source,
                "splits": {name: {"queries": s.queries, "documents": s.documents, "relevant": s.relevant}
                           for name, s in self.splits.items()}}

    def save(self, url: str) -> str:
        """Write the index as JSON to ``url`` (written to a temporary name, then moved: never half-written)."""
        fs, path = fsspec.core.url_to_fs(url)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f)
        fs.mv(path + ".tmp", path)
        return url

    @classmethod
    def load(cls, url: str) -> "PairIndex":
        try:
            with fsspec.open(url, "r") as f:
                document = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no pair index at {url}; `unipt train` on a retrieval recipe builds it") from None
        except ValueError as exc:
            raise ValueError(f"{url} is not a pair index ({exc}); delete it and train again to rebuild it") from exc
        if not isinstance(document, dict) or document.get("format") != PAIRS_FORMAT:
            raise ValueError(f"{url} is not a unipt pair index (format {PAIRS_FORMAT!r} expected)")
        if document.get("version") != PAIRS_VERSION:
            raise ValueError(f"{url} is pair index version {document.get('version')}; this unipt reads {PAIRS_VERSION}")
        splits = {name: SplitPairs(list(s["queries"]), list(s["documents"]), [list(r) for r in s["relevant"]])
                  for name, s in document["splits"].items()}
        return cls(splits, document["query_store"], document["document_store"], document.get("pairs_source"))

