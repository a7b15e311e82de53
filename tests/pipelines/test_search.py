"""`unipt index` + `unipt search` on toy retrieval sets extracted for real with tiny backbones: each query finds
its own document, a query embedded from raw input equals its cached-path embedding, and wrong inputs are
refused naming the fix."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import WORDS, make_image_folder
from unipt.extract import BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig, run_extraction
from unipt.pipelines._search import GalleryIndex, QueryEncoder, build_index, exact_search
from unipt.pipelines.cli import main
from unipt.store import FeatureStore, PairIndex, stored_ids
from unipt.train import LoaderConfig, TrainConfig
from unipt.train.retrieval import embed_split, fit_retrieval, load_two_tower

SPLITS = {"train": 0.5, "validation": 0.25, "test": 0.25}


def error_of(capsys, argv) -> str:
    """The one-line (or provenance-listing) error `unipt` prints for ``argv``, which must fail with status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def train_two_tower(query: FeatureStore, document: FeatureStore, out: Path, runs: dict[str, dict]) -> dict[str, Path]:
    """Checkpoints of two-tower runs (name -> TrainConfig fields) on pairs (i, i) of two stores of the same ids."""
    ids = [i for split in query.splits() for i in stored_ids(query, split)]
    pairs = PairIndex.build([(i, i) for i in ids], query, document)
    configs = {name: TrainConfig(epochs=1, batch_size=8, lr=1e-2, device="cpu", test_split="", **fields)
               for name, fields in runs.items()}
    results = fit_retrieval(configs, query, document, pairs, out,
                            loader_config=LoaderConfig(mode="memory", background="off"), progress=False)
    return {r.name: Path(r.checkpoint) for r in results}


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    """40 distinct texts of 2 .. 9 words, by id."""
    rng = random.Random(0)
    out: dict[str, str] = {}
    while len(out) < 40:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        if text not in out.values():
            out[f"t{len(out):02d}"] = text
    return out


@pytest.fixture(scope="module")
def text_set(tiny_bert_dir, texts, tmp_path_factory):
    """A query and a document store of the same 40 texts (float32, tiny BERT) and two checkpoints trained on
    their pairs (i, i): frozen towers (identical texts, identical embeddings) and UniPT (a few steps)."""
    root = tmp_path_factory.mktemp("text-search")
    source = root / "texts.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(texts.items())
    stores = {}
    for tower in ("query", "document"):
        run_extraction(SourceConfig(path=str(source), id_column="id", label_column=None, splits=SPLITS),
                       BackboneConfig(model=str(tiny_bert_dir), device="cpu"),
                       ExtractConfig(dtype="float32", part_size=16, batch_size=8), str(root / f"{tower}.zarr"),
                       progress=False)
        stores[tower] = FeatureStore.open(str(root / f"{tower}.zarr"))
    checkpoints = train_two_tower(stores["query"], stores["document"], root / "runs",
                                  {"frozen": {"method": "frozen"},
                                   "unipt": {"method": "unipt", "max_steps": 3, "task": {"embed_dim": 16}}})
    return {"root": root, **stores, **checkpoints}


def image_set(root: Path, model_dir: Path, dtype: str, image_size: int | None = None) -> dict:
    """An image store of 12 images used by both towers of a frozen two-tower checkpoint."""
    folder = make_image_folder(root / "images", n_per_class=4)
    url = str(root / "images.zarr")
    run_extraction(ImageSourceConfig(path=str(folder), label_column=None, splits=SPLITS),
                   BackboneConfig(model=str(model_dir), device="cpu", image_size=image_size),
                   ExtractConfig(dtype=dtype, part_size=8, batch_size=4), url, progress=False)
    store = FeatureStore.open(url)
    checkpoints = train_two_tower(store, store, root / "runs", {"frozen": {"method": "frozen"}})
    return {"root": root, "folder": folder, "store": store, "frozen": checkpoints["frozen"]}


@pytest.fixture(scope="module")
def vit_set(tiny_vit_dir, tmp_path_factory):
    """Tiny ViT tokens (32 px, the processor's own size), float16."""
    return image_set(tmp_path_factory.mktemp("vit-search"), tiny_vit_dir, "float16")


# --------------------------------------------------------------------------- text
def test_index_then_search_finds_each_querys_own_document(text_set, texts, capsys):
    root = text_set["root"]
    index_url = str(root / "frozen.index")
    assert main(["index", str(text_set["frozen"]), "--store", text_set["document"].url, "--output", index_url,
                 "--device", "cpu", "-q"]) == 0
    assert "indexed 40 document embeddings" in capsys.readouterr().out
    index = GalleryIndex.open(index_url)
    assert sorted(index.ids) == sorted(texts) and set(index.splits) == set(SPLITS)
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(40))
    assert index.tower == "document" and index.query_tower == "query" and index.engine == "exact"
    assert index.meta["checkpoint"]["path"] == str(text_set["frozen"].resolve())
    assert index.meta["checkpoint"]["run"] == "frozen" and index.meta["store"]["splits"] == {
        s: index.splits.count(s) for s in SPLITS}

    out = root / "results.jsonl"
    ids = sorted(texts)
    argv = ["search", index_url, *[a for i in ids for a in ("--query", texts[i])], "-k", "3", "--output", str(out),
            "--device", "cpu", "-q"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * len(ids) and set(rows[0]) == {"query", "rank", "id", "score"}
    firsts = {row["query"]: row for row in rows if row["rank"] == 1}
    for i in ids:  # the pair's own document first, at cosine 1 (frozen towers: the same mean-pooled states)
        assert firsts[texts[i]]["id"] == i
        assert firsts[texts[i]]["score"] == pytest.approx(1.0, abs=1e-5)

    # --queries FILE (one per line) and the default table on stdout
    queries = root / "queries.txt"
    queries.write_text(f"{texts['t03']}\n\n{texts['t17']}\n")
    assert main(["search", index_url, "--queries", str(queries), "-k", "2", "--device", "cpu", "-q"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["query", "rank", "id", "score"] and len(table) == 5
    assert table[1].split()[-2:] == ["t03", "1.0000"] and table[3].split()[-2:] == ["t17", "1.0000"]


def test_query_embeddings_from_raw_text_equal_the_cached_path(text_set, texts):
    model, config = load_two_tower(text_set["unipt"])
    for tower in ("query", "document"):
        store = text_set[tower]
        cached = {}
        for split in store.splits():
            ids, embeddings = embed_split(model, store, tower, split, config["towers"][tower]["layers"], device="cpu")
            cached.update(zip(ids, embeddings))
        encoder = QueryEncoder.from_checkpoint(text_set["unipt"], tower, device="cpu")
        assert encoder.modality == "text" and not any(p.requires_grad for p in encoder.parameters())
        ids = sorted(texts)
        raw = encoder.encode([texts[i] for i in ids], batch_size=7)
        expected = torch.stack([cached[i] for i in ids])
        assert raw.shape == (40, 16)
        torch.testing.assert_close(raw, expected, atol=1e-5, rtol=1e-5)
        assert raw.std(dim=0).min() > 1e-3  # not a constant embedding: the comparison means something


def test_engines_agree_and_the_graph_round_trips(text_set, texts, tmp_path):
    faiss = pytest.importorskip("faiss")
    index = build_index(text_set["unipt"], text_set["document"], device="cpu")
    queries = QueryEncoder.from_checkpoint(text_set["unipt"], "query", device="cpu").encode(list(texts.values()))
    scores, ids = index.search(queries, 5)
    _, truth_rows = exact_search(index.embeddings, queries, 5)
    assert ids == [[index.ids[r] for r in row] for row in truth_rows.tolist()]
    flat_scores, flat_ids = index.search(queries, 5, engine="faiss-flat")
    assert flat_ids == ids and torch.allclose(flat_scores, scores, atol=1e-5)
    with pytest.raises(ValueError, match="--engine faiss-hnsw"):
        index.search(queries, 5, engine="faiss-hnsw")
    index.add_hnsw()
    index.write(str(tmp_path / "hnsw.index"))
    reopened = GalleryIndex.open(str(tmp_path / "hnsw.index"))
    assert reopened.engine == "faiss-hnsw" and reopened.meta["engine"]["faiss"] == faiss.__version__
    hnsw_scores, hnsw_ids = reopened.search(queries, 5)  # auto: the stored graph, exact at 40 documents
    assert hnsw_ids == ids and torch.allclose(hnsw_scores, scores, atol=1e-5)
    assert reopened.search(queries[:2], 100)[0].shape == (2, 40)  # k beyond the gallery: the whole gallery

    # the same through the command line: the graph built at index time, searched by default
    index_url, out = str(tmp_path / "cli-hnsw.index"), tmp_path / "hnsw.tsv"
    assert main(["index", str(text_set["unipt"]), "--store", text_set["document"].url, "--engine", "faiss-hnsw",
                 "--output", index_url, "--device", "cpu", "-q"]) == 0
    assert GalleryIndex.open(index_url).meta["engine"]["ef_search"] == 256
    assert main(["search", index_url, "--query", texts["t05"], "-k", "5", "--ef-search", "64", "--output", str(out),
                 "--device", "cpu", "-q"]) == 0
    with open(out, newline="") as f:
        assert [row["id"] for row in csv.DictReader(f, delimiter="\t")] == ids[5]


# --------------------------------------------------------------------------- images
def test_an_image_finds_itself_and_equals_its_cached_embedding(vit_set, capsys):
    store, root = vit_set["store"], vit_set["root"]
    index_url = str(root / "images.index")
    assert main(["index", str(vit_set["frozen"]), "--store", store.url, "--output", index_url, "--device", "cpu",
                 "-q"]) == 0
    index = GalleryIndex.open(index_url)
    assert len(index.ids) == 12
    picked = sorted(index.ids)[::4]  # one image of each class
    out = root / "results.csv"
    images = [str(vit_set["folder"] / i) for i in picked]
    assert main(["search", index_url, *[a for p in images for a in ("--image", p)], "-k", "2", "--output", str(out),
                 "--device", "cpu", "-q"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    firsts = {row["query"]: row for row in rows if row["rank"] == "1"}
    assert [firsts[p]["id"] for p in images] == picked
    assert all(float(firsts[p]["score"]) == pytest.approx(1.0, abs=1e-5) for p in images)

    # the raw image through processor, ViT, float16 rounding and tower = the index's row from the store
    encoder = QueryEncoder.from_checkpoint(vit_set["frozen"], "query", device="cpu")
    assert encoder.modality == "image" and encoder.storage_dtype == "float16"
    raw = encoder.encode(images)
    cached = index.embeddings[[index.ids.index(i) for i in picked]]
    torch.testing.assert_close(raw, cached, atol=1e-5, rtol=1e-5)
    encoder.storage_dtype = "float32"  # control: unrounded states give other embeddings
    assert (encoder.encode(images) - cached).abs().max() > 5e-5
    encoder.close()

    # text against an image tower is refused, naming --image
    assert "--image PATH" in error_of(capsys, ["search", index_url, "--query", "a circle", "--device", "cpu", "-q"])
    missing = str(root / "nope.png")
    assert "nope.png" in error_of(capsys, ["search", index_url, "--image", missing, "--device", "cpu", "-q"])


def test_cnn_maps_extracted_at_another_size_equal_their_cached_embedding(tiny_resnet_dir, tmp_path):
    """A CNN store (maps, int8: one scale per map position) extracted at backbone.image_size = 32 instead of the
    processor's 64: the query tower rebuilds that preprocessing from the store and rounds maps as it stored them."""
    cnn = image_set(tmp_path, tiny_resnet_dir, "int8", image_size=32)
    index = build_index(cnn["frozen"], cnn["store"], device="cpu")
    encoder = QueryEncoder.from_checkpoint(cnn["frozen"], "query", device="cpu")
    assert encoder.encoder.image_shape[1:] == (32, 32) and encoder.encoder.layout == "maps"
    picked = sorted(index.ids)[::3]
    raw = encoder.encode([cnn["folder"] / i for i in picked], batch_size=3)
    cached = index.embeddings[[index.ids.index(i) for i in picked]]
    torch.testing.assert_close(raw, cached, atol=1e-5, rtol=1e-5)
    assert index.search(raw, 1)[1] == [[i] for i in picked]

    # control: without the int8 rounding the tower sees other inputs than the store gave it
    encoder.storage_dtype = "float32"
    assert (encoder.encode([cnn["folder"] / i for i in picked]) - cached).abs().max() > 1e-4
    encoder.close()


# --------------------------------------------------------------------------- refusals
def test_wrong_inputs_are_refused_naming_the_fix(text_set, vit_set, capsys, tmp_path):
    index_url = str(tmp_path / "text.index")
    assert main(["index", str(text_set["frozen"]), "--store", text_set["document"].url, "--output", index_url,
                 "--device", "cpu", "-q"]) == 0
    capsys.readouterr()

    # images against a text tower
    image = str(next(vit_set["folder"].rglob("*.png")))
    assert "--query TEXT" in error_of(capsys, ["search", index_url, "--image", image, "--device", "cpu", "-q"])

    # a store the tower cannot read (the ViT's image store for the BERT text tower)
    err = error_of(capsys, ["index", str(text_set["frozen"]), "--store", vit_set["store"].url, "--output",
                            str(tmp_path / "x.index"), "--device", "cpu", "-q"])
    assert "is not a store the document tower of checkpoint" in err and "weights_sha256" in err
    assert not (tmp_path / "x.index").exists()

    # an existing output: an index is replaced only with --overwrite, a feature store never
    assert "--overwrite" in error_of(capsys, ["index", str(text_set["frozen"]), "--store", text_set["document"].url,
                                              "--output", index_url, "--device", "cpu", "-q"])
    err = error_of(capsys, ["index", str(text_set["frozen"]), "--store", text_set["document"].url, "--output",
                            text_set["query"].url, "--overwrite", "--device", "cpu", "-q"])
    assert "not an index" in err and FeatureStore.open(text_set["query"].url).splits()

    # a checkpoint other than the index's is refused
    err = error_of(capsys, ["search", index_url, "--query", "good", "--checkpoint", str(text_set["unipt"]),
                            "--device", "cpu", "-q"])
    assert "is not the one this index was built with" in err and "weights_sha256" in err


def test_an_index_whose_checkpoint_moved_names_checkpoint(text_set, texts, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(text_set["frozen"], checkpoint)
    index_url = str(tmp_path / "moved.index")
    assert main(["index", str(checkpoint), "--store", text_set["document"].url, "--split", "test", "--output",
                 index_url, "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    assert set(GalleryIndex.open(index_url).splits) == {"test"}
    moved = tmp_path / "elsewhere"
    checkpoint.rename(moved)
    err = error_of(capsys, ["search", index_url, "--query", "good", "--device", "cpu", "-q"])
    assert str(checkpoint) in err and "--checkpoint" in err
    test_id = GalleryIndex.open(index_url).ids[0]
    assert main(["search", index_url, "--query", texts[test_id], "--checkpoint", str(moved), "-k", "1",
                 "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-2] == test_id
