"""Every task kind extracts, trains, checkpoints, evaluates and predicts from a store (tiny BERT, float32).

Pairs and tagging are also checked cached-equals-online: the side network fed from the store gives the
outputs that `unipt predict` computes from the raw pair / words through the backbone.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import WORDS, make_tiny_bert
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, TextInputs, load_source, run_extraction
from unipt.pipelines._inference import SideNetworkPredictor, read_inputs
from unipt.pipelines.cli import main
from unipt.store import IGNORE_INDEX, FeatureStore
from unipt.train import ActivationLoader, LoaderConfig, TrainConfig, evaluate_checkpoint, fit_many, load_checkpoint

POSITIVE = {"good", "great", "love", "best", "fun", "happy"}
NEGATIVE = {"bad", "awful", "hate", "worst", "boring", "sad"}
NOUNS = {"movie", "film", "plot", "actor", "scene", "music", "story", "ending"}
LOADER = LoaderConfig(mode="memory", background="off")


def sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    vocabulary = [*WORDS, "playing", "walks", "played"]
    out, seen = [], set()
    while len(out) < n:
        words = [rng.choice(vocabulary) for _ in range(rng.randint(2, 9))]
        if " ".join(words) not in seen:
            seen.add(" ".join(words))
            out.append(words)
    return out


def bio_tags(words: list[str]) -> list[str]:
    """An entity = an adjective-like word followed by nouns: B-ENT I-ENT...; everything else O."""
    tags = []
    for i, w in enumerate(words):
        if w in NOUNS and tags and tags[-1] in ("B-ENT", "I-ENT"):
            tags.append("I-ENT")
        elif (w in POSITIVE or w in NEGATIVE) and i + 1 < len(words) and words[i + 1] in NOUNS:
            tags.append("B-ENT")
        else:
            tags.append("O")
    return tags


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_rows(kind: str, n: int = 96) -> tuple[list[dict], dict]:
    """Rows of a synthetic source for ``kind`` and the source options that read them."""
    rows = []
    for k, words in enumerate(sentences(n, seed=7)):
        text = " ".join(words)
        pos, neg = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
        if kind == "pairs":
            other = sentences(1, seed=1000 + k)[0]
            rows.append({"text": text, "text_pair": " ".join(other), "doc": f"d{k % 12}",
                         "label": "same" if (pos > neg) == (sum(w in POSITIVE for w in other) > 0) else "differ"})
        elif kind == "multilabel":
            present = {"positive": pos > 0, "negative": neg > 0, "noun": any(w in NOUNS for w in words)}
            rows.append({"text": text, "labels": sorted(name for name, yes in present.items() if yes)})
        elif kind == "regression":
            rows.append({"text": text, "score": pos - neg + 0.1 * len(words), "length": float(len(words))})
        else:
            rows.append({"words": words, "tags": bio_tags(words), "doc": f"d{k % 12}"})
    options = {"pairs": dict(task="classification", text_pair_column="text_pair", group_column="doc"),
               "multilabel": dict(task="multilabel", label_column="labels"),
               "regression": dict(task="regression", label_column=None, target_columns=["score", "length"]),
               "tagging": dict(task="tagging", text_column="words", label_column="tags", group_column="doc")}[kind]
    return rows, options


@pytest.fixture(scope="module")
def subword_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("subword-bert"), subwords=True)


@pytest.fixture(scope="module", params=["pairs", "multilabel", "regression", "tagging"])
def extracted(request, subword_bert, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    rows, options = task_rows(kind)
    source = SourceConfig(path=str(write_jsonl(folder / "source.jsonl", rows)), **options)
    run_extraction(source, BackboneConfig(model=str(subword_bert), device="cpu", max_length=24),
                   ExtractConfig(dtype="float32", part_size=32, batch_size=8), str(folder / "store.zarr"),
                   progress=False)
    return kind, source, FeatureStore.open(str(folder / "store.zarr")), folder


def test_store_records_its_task_and_targets(extracted):
    kind, source, store, _ = extracted
    expected = {"pairs": "classification", "multilabel": "multilabel", "regression": "regression",
                "tagging": "tagging"}[kind]
    assert store.task == expected
    assert store.meta["format_version"] == (1 if expected == "classification" else 2)
    assert ("task" in store.meta) == (expected != "classification")
    part = store.read_part(store.parts("train")[0])
    data = load_source(source)
    by_id = {ex.id: ex for examples in data.splits.values() for ex in examples}
    if kind == "multilabel":
        assert store.label_names == ["negative", "noun", "positive"]
        assert part.label.shape == (part.info.n_examples, 3) and part.label.dtype.name == "uint8"
        for i, example_id in enumerate(part.example_id):
            assert sorted(part.label[i].nonzero()[0].tolist()) == sorted(by_id[example_id].label)
    elif kind == "regression":
        assert store.label_names == ["score", "length"] and part.label.shape == (part.info.n_examples, 2)
        for i, example_id in enumerate(part.example_id):
            assert part.label[i].tolist() == pytest.approx(list(by_id[example_id].label))
    elif kind == "tagging":
        assert part.token_targets and part.label.shape == (part.info.n_tokens,)
        for i, example_id in enumerate(part.example_id):
            tokens = part.label[part.offsets[i]:part.offsets[i + 1]]
            scored = [store.label_names[t] for t in tokens if t != IGNORE_INDEX]
            words = by_id[example_id].words
            assert scored == bio_tags(list(words))  # one tag per word (none truncated at 24 tokens)
            # multi-sub-word words carry their tag on the first piece only: more tokens than tags
            assert len(tokens) == len(words) + 2 + sum(w in ("playing", "walks", "played") for w in words)
    else:  # pairs: one cross-encoded sequence, the second text's tokens typed 1
        groups = {}
        for split, examples in data.splits.items():
            for ex in examples:
                groups.setdefault(ex.group, set()).add(split)
        assert all(len(splits) == 1 for splits in groups.values())  # group_column: a doc is in one split only


def test_every_task_trains_checkpoints_and_evaluates(extracted, tmp_path):
    kind, _, store, _ = extracted
    methods = {"unipt": TrainConfig(method="unipt", epochs=3, batch_size=8, lr=2e-3, model={"reduction": 4}),
               "probe": TrainConfig(method="linear_probe", epochs=3, batch_size=8, lr=5e-3)}
    if kind != "tagging":
        methods["mix"] = TrainConfig(method="scalar_mix", epochs=2, batch_size=8, lr=5e-3)
    results = fit_many(methods, store, tmp_path / "checkpoints", loader_config=LOADER, progress=False)
    for result in results:
        assert result.task == store.task and result.test_metrics["n"] > 0
        reported = {"classification": "accuracy", "multilabel": "map", "regression": "pearson",
                    "tagging": "entity_f1"}[store.task]
        assert result.select_metric == reported
        assert reported in result.eval_metrics and reported in result.test_metrics
        # the checkpoint, reloaded with its task, scores the test split exactly as training did
        assert evaluate_checkpoint(result.checkpoint, store, "test", batch_size=8, device="cpu",
                                   loader_config=LOADER) == result.test_metrics
        _, config = load_checkpoint(result.checkpoint)
        assert config["task"]["kind"] == store.task and config["head"]["per_token"] == (store.task == "tagging")
        if store.task == "regression":
            assert len(config["task"]["state"]["mean"]) == 2  # train-split statistics saved
        if store.task == "multilabel":
            assert config["task"]["state"]["threshold"] == result.eval_metrics["threshold"]


def test_a_pooled_method_is_refused_for_tagging(extracted, tmp_path):
    kind, _, store, _ = extracted
    if kind != "tagging":
        pytest.skip("tagging only")
    with pytest.raises(ValueError, match=r"cannot train a tagging task .*use one of \['linear_probe', 'lst', .*'unipt'\]"):
        fit_many({"mix": TrainConfig(method="scalar_mix", epochs=1)}, store, tmp_path, loader_config=LOADER,
                 progress=False)


def test_predict_from_raw_inputs_equals_the_cached_path(extracted, subword_bert, tmp_path):
    """Pairs and words through the backbone (the predictor) give the cached path's outputs, example by example."""
    kind, source, store, folder = extracted
    (result,) = fit_many({"unipt": TrainConfig(method="unipt", epochs=1, batch_size=8, model={"reduction": 4})},
                         store, tmp_path, loader_config=LOADER, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    model.eval()
    loader = ActivationLoader(store, "validation", store.layers, batch_size=5, shuffle=False, config=LOADER)
    data = load_source(source)
    by_id = {ex.id: ex for examples in data.splits.values() for ex in examples}
    predictor = SideNetworkPredictor.from_checkpoint(result.checkpoint, device="cpu")
    compared = 0
    for batch in loader:
        with torch.no_grad():
            cached = model(batch.hidden_states, batch.mask)
        examples = [by_id[i] for i in batch.example_ids]
        predicted = predictor.predict(TextInputs.of(examples), batch_size=3)
        for b, example in enumerate(examples):
            n = int(batch.mask[b].sum())
            expected = cached[b, :n] if kind == "tagging" else cached[b]
            torch.testing.assert_close(predicted.logits[b], expected, atol=1e-5, rtol=1e-5)
            compared += 1
        if kind == "tagging":  # one tag per word, as scored
            assert all(len(r["tags"]) == len(ex.words) for r, ex in zip(predicted.records, examples))
    assert compared == store.num_examples("validation") > 0


def test_cli_eval_and_predict_for_every_task(extracted, tmp_path, capsys):
    kind, source, store, folder = extracted
    (result,) = fit_many({"unipt": TrainConfig(method="unipt", epochs=1, batch_size=8, model={"reduction": 4})},
                         store, tmp_path, loader_config=LOADER, progress=False)
    assert main(["eval", result.checkpoint, "--store", store.url, "--split", "test", "-q"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"] == result.test_metrics["n"]
    out = tmp_path / "predictions.csv"
    assert main(["predict", result.checkpoint, "--input", source.path, "--output", str(out), "-q",
                 *(["--text-column", "words"] if kind == "tagging" else [])]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    _, inputs = read_inputs(source.path, source.text_column, text_pair_column=source.text_pair_column,
                            words=kind == "tagging")
    assert len(rows) == len(inputs.texts) == 96
    first = rows[0]
    if kind == "pairs":
        assert first["label"] in ("same", "differ") and set(first) == {"label", "prob_differ", "prob_same"}
    elif kind == "multilabel":
        assert set(first) == {"labels", "prob_negative", "prob_noun", "prob_positive"}
        assert all(label in ("negative", "noun", "positive") for label in first["labels"].split("|") if label)
    elif kind == "regression":
        assert set(first) == {"score", "length"} and float(first["length"]) == float(first["length"])
    else:
        assert len(first["tags"].split()) == len(inputs.words[0])


def test_the_cnn_variant_trains_multilabel_images(tiny_resnet_dir, image_folder, tmp_path):
    """An image table whose label column lists each image's labels: unipt_cnn on stage maps, multi-label."""
    images = sorted(image_folder.rglob("*.png"))
    table = tmp_path / "tags.csv"
    with open(table, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "tags"])
        for k, image in enumerate(images):
            # a path relative to the table: the ids, and so the splits, do not depend on the temporary folders
            out.writerow([os.path.relpath(image, table.parent),
                          "|".join(sorted({image.parent.name, *(["odd"] if k % 2 else [])}))])
    from unipt.extract import ImageSourceConfig

    source = ImageSourceConfig(path=str(table), label_column="tags", task="multilabel", label_delimiter="|",
                               splits={"train": 0.6, "validation": 0.2, "test": 0.2})
    run_extraction(source, BackboneConfig(model=str(tiny_resnet_dir), device="cpu", image_size=64),
                   ExtractConfig(dtype="float32", part_size=16, batch_size=8, layers="stages"),
                   str(tmp_path / "s.zarr"), progress=False)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.task == "multilabel" and store.layout == "maps"
    assert store.label_names == ["circle", "dots", "odd", "stripes"]
    part = store.read_part(store.parts("train")[0], layers=[])
    assert part.label.shape == (part.info.n_examples, 4) and set(part.label.sum(1).tolist()) <= {1, 2}
    (result,) = fit_many({"cnn": TrainConfig(method="unipt_cnn", epochs=2, batch_size=8)}, store, tmp_path / "ck",
                         loader_config=LOADER, progress=False)
    assert result.task == "multilabel" and 0.0 <= result.test_metrics["map"] <= 1.0


def test_a_tagging_store_exports_its_tags_per_token(extracted, tmp_path):
    kind, _, store, _ = extracted
    if kind not in ("tagging", "regression"):
        pytest.skip("tagging and regression")
    from unipt.store import export_webdataset

    export_webdataset(store, str(tmp_path / "out"), splits=["test"])
    import tarfile

    with tarfile.open(next((tmp_path / "out").glob("test-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        record = json.loads(tar.extractfile(member).read())
    part = store.read_part(store.parts("test")[0], layers=[])
    row = list(part.example_id).index(record["example_id"])
    if kind == "tagging":
        assert record["target"] == part.label[part.offsets[row]:part.offsets[row + 1]].tolist()
    else:
        assert record["target"] == pytest.approx(part.label[row].tolist())
    assert "label" not in record
