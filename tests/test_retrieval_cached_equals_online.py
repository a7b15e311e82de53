"""Two-tower retrieval: the towers fed from their stores equal the towers fed live by both backbones (float32
stores, tiny models): the same embeddings, the same steps, the same run."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from unipt.extract import BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig, run_extraction
from unipt.pipelines._online_retrieval import OnlineTower, embed_online, epoch_pairs, train_online_retrieval
from unipt.store import FeatureStore, PairIndex
from unipt.train import ActivationLoader, LoaderConfig, TrainConfig
from unipt.train.retrieval import PairBatch, PairLoader, embed_split, fit_retrieval
from unipt.train.retrieval._trainer import _Run

SPLITS = ["train"] * 20 + ["validation"] * 6 + ["test"] * 6
IDS = [f"x{k:03d}" for k in range(len(SPLITS))]
UNPAIRED = IDS[3]  # a stored train query that no pair names: dropped from its batch by both paths
CONFIG = TrainConfig(epochs=2, batch_size=6, device="cpu", lr=3e-3, model={"reduction": 2}, task={"embed_dim": 16})


def write_texts(path: Path, seed: int) -> Path:
    """``id,text,split``: a distinct short text per id (1 .. 12 words), splits as SPLITS."""
    rng, seen = random.Random(seed), set()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "split"])
        writer.writeheader()
        for example_id, split in zip(IDS, SPLITS):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            while text in seen:
                text += f" {rng.choice(WORDS)}"
            seen.add(text)
            writer.writerow({"id": example_id, "text": text, "split": split})
    return path


def write_images(folder: Path) -> Path:
    """``images.csv`` (``id,image,split``) beside one small greyscale PNG per id."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "split"])
        writer.writeheader()
        for example_id, split in zip(IDS, SPLITS):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"{example_id}.png")
            writer.writerow({"id": example_id, "image": f"{example_id}.png", "split": split})
    return folder / "images.csv"


def pairs() -> list[tuple[str, str]]:
    """x_k -> x_k, and train queries x_6 .. x_9 also -> x_{k+1} (two relevant documents: one drawn per epoch)."""
    out = [(q, q) for q in IDS if q != UNPAIRED]
    out += [(IDS[k], IDS[k + 1]) for k in range(6, 10)]
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: torch's second thread only waits for the first (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(one_thread, tiny_bert_dir, tiny_vit_dir, tmp_path_factory):
    """Per tower kind: (source config, backbone config, float32 store); query texts, document texts or images."""
    root = tmp_path_factory.mktemp("retrieval")
    extract = ExtractConfig(dtype="float32", part_size=8, batch_size=5)
    text = dict(label_column=None, id_column="id", split_column="split")
    sources = {"query": SourceConfig(path=str(write_texts(root / "queries.csv", 0)), **text),
               "text": SourceConfig(path=str(write_texts(root / "documents.csv", 1)), **text),
               "image": ImageSourceConfig(path=str(write_images(root / "images")), format="table", label_column=None,
                                          id_column="id", split_column="split")}
    out = {}
    for kind, source in sources.items():
        backbone = BackboneConfig(model=str(tiny_vit_dir if kind == "image" else tiny_bert_dir), device="cpu")
        run_extraction(source, backbone, extract, str(root / f"{kind}.zarr"), progress=False)
        out[kind] = (source, backbone, FeatureStore.open(str(root / f"{kind}.zarr")))
    return out


def setup(towers, document: str):
    """(query store, document store, pair index, {tower: (source, backbone)}) with a text or image document tower."""
    query_store, document_store = towers["query"][2], towers[document][2]
    index = PairIndex.build(pairs(), query_store, document_store)
    inputs = {"query": towers["query"][:2], "document": towers[document][:2]}
    return query_store, document_store, index, inputs


def live_towers(inputs, stores, splits=("train", "validation", "test")):
    return {t: OnlineTower(t, *inputs[t], stores[t], list(splits), device=torch.device("cpu")) for t in inputs}


def new_run(config, stores, tmp_path, name):
    run = _Run(name, config, stores, tmp_path / name, torch.device("cpu"))
    run.pick = {t: list(range(len(run.layers[t]))) for t in stores}
    return run


@pytest.mark.parametrize("document", ["text", "image"])
def test_tower_embeddings_from_the_store_equal_online(towers, document):
    query_store, document_store, index, inputs = setup(towers, document)
    stores = {"query": query_store, "document": document_store}
    live = live_towers(inputs, stores, ["validation", "train"])
    run = _Run("emb", CONFIG, stores, Path("unused"), torch.device("cpu"))  # the cached run's model
    with torch.no_grad():  # off the default init (LayerNorm 1 / 0 and zero gates hide differences)
        g = torch.Generator().manual_seed(3)
        for p in run.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    for tower, store in stores.items():
        for split in ("validation", "train"):
            ids, cached = embed_split(run.model, store, tower, split, run.layers[tower], batch_size=4, device="cpu")
            online = embed_online(run.model, live[tower], split, ids, run.layers[tower], batch_size=4)
            assert cached.shape == online.shape == (len(ids), 16)
            torch.testing.assert_close(online, cached, atol=1e-5, rtol=1e-5)
            assert cached.std(dim=0).min() > 0  # not a constant embedding


@pytest.mark.parametrize("document", ["text", "image"])
def test_training_steps_on_the_same_batches_give_the_same_parameters(towers, document, tmp_path):
    query_store, document_store, index, inputs = setup(towers, document)
    stores = {"query": query_store, "document": document_store}
    live = live_towers(inputs, stores, ["train"])
    cached_run, online_run = new_run(CONFIG, stores, tmp_path, "cached"), new_run(CONFIG, stores, tmp_path, "online")
    loaders = {t: ActivationLoader(stores[t], "train", cached_run.layers[t], batch_size=8, shuffle=False,
                                   config=LoaderConfig(mode="memory", background="off")) for t in stores}
    for run in (cached_run, online_run):
        run.start(3)
        run.start_epoch()
    batches = [(["x000", "x007", "x012", "x001"], ["x000", "x008", "x012", "x001"]),
               (["x010", "x002", "x019", "x006", "x015"], ["x010", "x002", "x019", "x006", "x016"]),
               (["x004", "x009"], ["x004", "x009"])]
    padded = 0
    for queries, documents in batches:
        positives = torch.tensor([[d in {q, *([f"x{int(q[1:]) + 1:03d}"] if 6 <= int(q[1:]) < 10 else [])}
                                   for d in documents] for q in queries])
        cached = PairBatch(loaders["query"].batch_of(queries), loaders["document"].batch_of(documents), positives)
        online = PairBatch(live["query"].batch("train", queries, online_run.layers["query"]),
                           live["document"].batch("train", documents, online_run.layers["document"]), positives)
        for a, b in ((cached.query, online.query), (cached.document, online.document)):  # the same inputs
            assert torch.equal(a.mask, b.mask)
            for x, y in zip(a.hidden_states, b.hidden_states):
                torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        padded += bool((~cached.query.mask).any())
        cached_run.train_step(cached)
        online_run.train_step(online)
        torch.testing.assert_close(online_run.last_loss, cached_run.last_loss, atol=1e-5, rtol=1e-5)
    assert padded  # the comparison covered padded text batches
    initial = new_run(CONFIG, stores, tmp_path, "initial").model.state_dict()
    moved = False
    for (key, c), o in zip(cached_run.model.state_dict().items(), online_run.model.state_dict().values()):
        torch.testing.assert_close(o, c, atol=1e-5, rtol=1e-5, msg=key)
        moved |= not torch.equal(c, initial[key])
    assert moved


def test_online_batches_are_the_cached_memory_mode_batches(towers):
    query_store, document_store, index, _ = setup(towers, "text")
    train = index.split("train")
    loader = PairLoader(query_store, document_store, train, "train", [0], [0], batch_size=6, shuffle=True, seed=4,
                        config=LoaderConfig(mode="memory", background="off", bucket_batches=2))
    relevant = {q: [train.documents[d] for d in docs] for q, docs in zip(train.queries, train.relevant)}
    ids = [i for part in query_store.parts("train") for i in query_store.read_part(part, layers=[]).example_id]
    lengths = np.concatenate([query_store.read_part(p, layers=[]).length for p in query_store.parts("train")])
    for epoch in range(3):
        loader.set_epoch(epoch)
        cached = [(b.query.example_ids, b.document.example_ids, b.positives) for b in loader]
        online = list(epoch_pairs(ids, lengths, relevant, 6, 4, epoch, bucket_batches=2))
        assert [c[:2] for c in cached] == [o[:2] for o in online]
        assert all(torch.equal(c[2], o[2]) for c, o in zip(cached, online))
        assert UNPAIRED not in {q for c in cached for q in c[0]}


@pytest.mark.parametrize("document", ["text", "image"])
def test_online_run_equals_the_cached_run(towers, document, tmp_path):
    query_store, document_store, index, inputs = setup(towers, document)
    loader = LoaderConfig(mode="memory", background="off", bucket_batches=2)
    [cached] = fit_retrieval({"run": CONFIG}, query_store, document_store, index, tmp_path / "runs",
                             loader_config=loader, progress=False)
    online = train_online_retrieval("run", CONFIG, inputs, index, query_store=query_store,
                                    document_store=document_store, loader_config=loader, progress=False)
    assert online.method == "online_unipt" and online.trainable_params == cached.trainable_params
    assert len(online.epoch_seconds) == CONFIG.epochs and all(s > 0 for s in online.epoch_seconds)
    assert online.peak_memory_bytes >= 0 and online.memory_device == "cpu"
    assert online.best_epoch == cached.best_epoch
    for c, o in zip(cached.history, online.history):
        assert o["step"] == c["step"] == 4 * o["epoch"]  # 19 paired train queries in batches of 6
        assert o["train_loss"] == pytest.approx(c["train_loss"], rel=1e-5)
        assert o["scale"] == pytest.approx(c["scale"], rel=1e-5)
    assert online.eval_metrics == pytest.approx(cached.eval_metrics, abs=1e-4)
    assert online.test_metrics == pytest.approx(cached.test_metrics, abs=1e-4)
    assert set(online.test_metrics) == {"q2d_r1", "q2d_r5", "q2d_r10", "d2q_r1", "d2q_r5", "d2q_r10", "rsum"}


def test_refuses_a_source_the_store_was_not_extracted_from(towers):
    query_store, document_store, index, inputs = setup(towers, "text")
    swapped = {"query": inputs["document"], "document": inputs["query"]}
    with pytest.raises(ValueError, match="not what the query store"):
        train_online_retrieval("run", CONFIG, swapped, index, query_store=query_store, document_store=document_store,
                               progress=False)
