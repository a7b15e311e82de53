"""Inference: backbone + side network from a checkpoint predicts on raw text exactly as the cached path scores."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import LABELS, make_text_csv, make_tiny_bert
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, load_source, run_extraction
from unipt.extract._sources import BadInputError
from unipt.pipelines._inference import SideNetworkPredictor, read_texts
from unipt.pipelines.cli import main
from unipt.store import STORAGE_DTYPES, FeatureStore, ProvenanceMismatch, dequantize
from unipt.store import round_trip as round_through_storage
from unipt.store._dtypes import as_tensor, encode
from unipt.train import ActivationLoader, TrainConfig, fit, load_checkpoint


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("src") / "texts.csv")


@pytest.fixture(scope="module")
def texts(csv_path) -> dict[str, str]:
    """example id -> text, for every example of the source (the ids the store uses)."""
    data = load_source(SourceConfig(path=str(csv_path)))
    return {ex.id: ex.text for examples in data.splits.values() for ex in examples}


def trained_checkpoint(model_dir: Path, csv_path: Path, workdir: Path, dtype: str, model: dict, name: str,
                       method: str = "unipt") -> Path:
    """Extract a ``dtype`` store of the CSV with the tiny BERT (or reuse it), train a side network on it for a few
    steps."""
    url = str(workdir / f"{dtype}.zarr")
    run_extraction(SourceConfig(path=str(csv_path)), BackboneConfig(model=str(model_dir), device="cpu"),
                   ExtractConfig(dtype=dtype, part_size=16, batch_size=6), url, progress=False)
    config = TrainConfig(method=method, epochs=1, max_steps=4, batch_size=8, lr=1e-2, device="cpu", model=model,
                         test_split="")
    return Path(fit(name, FeatureStore.open(url), config, workdir / "runs", progress=False).checkpoint)


@pytest.fixture(scope="module")
def checkpoints(tiny_bert_dir, csv_path, tmp_path_factory) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("predict")
    return {
        "float32": trained_checkpoint(tiny_bert_dir, csv_path, workdir, "float32", {"reduction": 2}, "f32"),
        "float16": trained_checkpoint(tiny_bert_dir, csv_path, workdir, "float16", {"reduction": 2}, "f16"),
        "int8": trained_checkpoint(tiny_bert_dir, csv_path, workdir, "int8", {"reduction": 2}, "int8"),
        "layer_subset": trained_checkpoint(tiny_bert_dir, csv_path, workdir, "float32",
                                           {"reduction": 4, "layers": [0, 2]}, "subset"),
        # SHERL runs the backbone's frozen last block itself: predict hands it the backbone folder it found
        "sherl": trained_checkpoint(tiny_bert_dir, csv_path, workdir, "float32", {"reduction": 2}, "sherl", "sherl"),
    }


def cached_logits(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The cached path: the saved side network fed from its store, every split, keyed by example id."""
    model, config = load_checkpoint(checkpoint)
    model.eval()
    store = FeatureStore.open(config["store_url"])
    out = {}
    with torch.no_grad():
        for split in store.splits():
            for batch in ActivationLoader(store, split, config["layers"], batch_size=16, shuffle=False):
                for example_id, row in zip(batch.example_ids, model(batch.hidden_states, batch.mask)):
                    out[example_id] = row
    return out


def predicted_logits(predictor: SideNetworkPredictor, texts: dict[str, str], batch_size: int = 7):
    ids = sorted(texts)
    return ids, predictor.predict([texts[i] for i in ids], batch_size=batch_size).logits


@pytest.mark.parametrize("name", ["float32", "layer_subset"])
def test_predictor_logits_equal_the_cached_path(checkpoints, texts, name):
    predictor = SideNetworkPredictor.from_checkpoint(checkpoints[name], device="cpu")
    assert isinstance(predictor, torch.nn.Module) and predictor.storage_dtype == "float32"
    assert predictor.layers == ([0, 2] if name == "layer_subset" else [0, 1, 2])
    cached = cached_logits(checkpoints[name])
    assert set(cached) == set(texts)  # every example of every split
    ids, logits = predicted_logits(predictor, texts)
    expected = torch.stack([cached[i] for i in ids])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert logits.std(dim=0).min() > 1e-3  # not a constant output: the comparison means something

    # forward() on one padded batch gives the same logits as predict()'s length-sorted batches
    torch.testing.assert_close(predictor([texts[i] for i in ids[:9]]), expected[:9], atol=1e-5, rtol=1e-5)


def test_sherl_predicts_as_the_cached_path_with_the_backbone_passed_to_predict(checkpoints, texts, tiny_bert_dir,
                                                                              tmp_path):
    moved = shutil.copytree(tiny_bert_dir, tmp_path / "moved-bert")  # not the folder the checkpoint recorded
    predictor = SideNetworkPredictor.from_checkpoint(checkpoints["sherl"], str(moved), device="cpu")
    assert predictor.layers == [0, 1]  # H_0 .. H_{L-1}: the frozen last block makes H_L itself
    cached = cached_logits(checkpoints["sherl"])
    ids, logits = predicted_logits(predictor, texts)
    torch.testing.assert_close(logits, torch.stack([cached[i] for i in ids]), atol=1e-5, rtol=1e-5)
    assert logits.std(dim=0).min() > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_lossy_store_predictions_round_through_its_dtype(checkpoints, texts, dtype):
    predictor = SideNetworkPredictor.from_checkpoint(checkpoints[dtype], device="cpu")
    assert predictor.storage_dtype == dtype
    cached = cached_logits(checkpoints[dtype])
    ids, logits = predicted_logits(predictor, texts)
    expected = torch.stack([cached[i] for i in ids])
    rounded_error = (logits - expected).abs().max()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    # control: without the rounding the side network sees other inputs than it was trained on
    predictor.storage_dtype = "float32"
    _, unrounded = predicted_logits(predictor, texts)
    assert (unrounded - expected).abs().max() > 10 * rounded_error


def test_predictions_are_labels_and_probabilities(checkpoints, texts):
    predictor = SideNetworkPredictor.from_checkpoint(checkpoints["float32"], device="cpu")
    batch = list(texts.values())[:11]
    out = predictor.predict(batch, batch_size=4)
    assert out.label_names == sorted(LABELS) and out.probabilities.shape == (11, 3)
    torch.testing.assert_close(out.probabilities.sum(-1), torch.ones(11))
    assert out.labels == [out.label_names[i] for i in out.logits.argmax(-1)]
    assert predictor.predict([]).labels == []

    # frozen and inference-only: nothing trains, and train() keeps dropout off
    assert not any(p.requires_grad for p in predictor.parameters())
    assert not predictor.train().training and not predictor.backbone.training


def test_another_backbone_is_refused_naming_the_hash(checkpoints, tmp_path):
    other = make_tiny_bert(tmp_path / "other-bert", seed=1)  # same architecture and tokenizer, other weights
    expected = json.loads((checkpoints["float32"] / "config.json").read_text())["store"]["weights_sha256"]
    with pytest.raises(ProvenanceMismatch) as info:
        SideNetworkPredictor.from_checkpoint(checkpoints["float32"], backbone=str(other), device="cpu")
    message = str(info.value)
    assert "weights_sha256" in message and expected in message
    from unipt.extract import backbone_hashes

    assert backbone_hashes(other)["weights_sha256"] in message
    assert "tokenizer_sha256" not in message


def test_the_store_can_be_named_when_it_moved(checkpoints, texts, tmp_path, tiny_bert_dir):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(checkpoints["float16"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    moved = tmp_path / "moved.zarr"
    shutil.copytree(config["store_url"], moved)
    config["store_url"] = str(tmp_path / "gone.zarr")
    # Without its own inference record, a checkpoint reads the backbone, max_length and dtype from its store.
    assert config.pop("inference")["storage_dtype"] == "float16"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="--store"):
        SideNetworkPredictor.from_checkpoint(checkpoint, device="cpu")
    predictor = SideNetworkPredictor.from_checkpoint(checkpoint, str(tiny_bert_dir), device="cpu", store=str(moved))
    assert predictor.storage_dtype == "float16"

    # a checkpoint that records its inference inputs needs no store at all
    config["inference"] = {"backbone": str(tiny_bert_dir), "max_length": 128, "storage_dtype": "float16"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    recorded = SideNetworkPredictor.from_checkpoint(checkpoint, device="cpu")
    batch = list(texts.values())[:5]
    torch.testing.assert_close(recorded(batch), predictor(batch))


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_rounding_equals_a_store_round_trip(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * torch.logspace(-2, 2, 16)
    stored = encode(x.reshape(-1, 16), dtype, "test")
    scale = stored.get("_scale")
    expected = dequantize(as_tensor(stored[""], dtype), None if scale is None else torch.from_numpy(scale))
    assert torch.equal(round_through_storage(x, dtype), expected.reshape(3, 5, 16))


# --------------------------------------------------------------------------- the `unipt predict` command
def test_cli_predict_writes_a_csv(checkpoints, csv_path, tiny_bert_dir, tmp_path):
    out = tmp_path / "predictions.csv"
    code = main(["predict", str(checkpoints["float32"]), "--input", str(csv_path), "--output", str(out),
                 "--backbone", str(tiny_bert_dir), "--batch-size", "5", "--device", "cpu", "-q"])
    assert code == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(csv_path, newline="") as f:
        source = [row["text"] for row in csv.DictReader(f)]
    assert len(rows) == len(source) == 120
    assert list(rows[0]) == ["label", "prob_negative", "prob_neutral", "prob_positive"]  # no id column in the input
    predictor = SideNetworkPredictor.from_checkpoint(checkpoints["float32"], device="cpu")
    assert [r["label"] for r in rows] == predictor.predict(source).labels
    for row in rows:
        assert sum(float(row[f"prob_{name}"]) for name in LABELS) == pytest.approx(1.0, abs=1e-5)


def test_cli_predict_jsonl_with_ids_and_plain_text(checkpoints, tmp_path, capsys):
    source = tmp_path / "reviews.jsonl"
    reviews = [{"id": f"r{i}", "review": text} for i, text in enumerate(["good movie", "awful plot", "fine", "good movie"])]
    source.write_text("".join(json.dumps(r) + "\n" for r in reviews))
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(checkpoints["float16"]), "--input", str(source), "--text-column", "review",
                 "--output", str(out), "-q"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["r0", "r1", "r2", "r3"]  # in order, duplicates kept
    assert lines[0] == {**lines[3], "id": "r0"}
    assert all(line["label"] in LABELS and set(line) == {"id", "label", *(f"prob_{n}" for n in LABELS)}
               for line in lines)

    plain = tmp_path / "texts.txt"
    plain.write_text("good movie\n\nawful plot\n")
    capsys.readouterr()
    assert main(["predict", str(checkpoints["float16"]), "--input", str(plain), "-q"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["id"] for r in rows] == ["1", "3"]  # line numbers; the blank line is skipped
    assert [r["label"] for r in rows] == [lines[0]["label"], lines[1]["label"]]


def test_cli_predict_errors_name_the_problem(checkpoints, csv_path, tmp_path, capsys):
    ckpt = str(checkpoints["float32"])
    assert main(["predict", ckpt, "--input", str(csv_path), "--text-column", "review", "-q"]) == 2
    err = capsys.readouterr().err
    assert "no column(s) ['review']" in err and "'text'" in err and "--text-column" in err
    assert main(["predict", ckpt, "--input", str(csv_path), "--id-column", "key", "-q"]) == 2
    assert "no column(s) ['key']" in capsys.readouterr().err
    assert main(["predict", ckpt, "--input", str(tmp_path / "missing.csv"), "-q"]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert main(["predict", ckpt, "--input", str(csv_path), "--output", str(tmp_path / "out.xlsx"), "-q"]) == 2
    assert "output format" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--input", str(csv_path), "-q"]) == 2
    assert "not a unipt checkpoint" in capsys.readouterr().err
    other = make_tiny_bert(tmp_path / "other-bert", seed=1)
    assert main(["predict", ckpt, "--input", str(csv_path), "--backbone", str(other), "-q"]) == 2
    assert "weights_sha256" in capsys.readouterr().err


def test_read_texts_keeps_file_order_and_ids(tmp_path):
    path = make_text_csv(tmp_path / "t.csv", n=5)
    ids, texts = read_texts(str(path))
    assert ids is None and len(texts) == 5
    with open(path, newline="") as f:
        assert texts == [row["text"] for row in csv.DictReader(f)]


def test_read_texts_reads_a_field_over_the_default_csv_limit(tmp_path):
    long = ("good movie " * 20_000)[:200_000]  # csv refuses fields over 131,072 characters by default
    path = tmp_path / "t.csv"
    path.write_text(f"id,text\na,short one\nb,{long}\n")
    assert read_texts(str(path)) == (["a", "b"], ["short one", long])


def test_a_bad_row_tells_predict_users_to_fix_the_file(checkpoints, tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("text\ngood movie\n\"\"\nawful plot\n")  # an empty text on line 3
    with pytest.raises(BadInputError) as info:
        read_texts(str(path))
    message = str(info.value)
    assert message.endswith("t.csv line 3 (row 2): empty 'text' value ''. Fix or remove that row of the input file")
    assert "source.bad_input" not in message  # a recipe option predict has no way to set
    path.write_text("text\ngood movie\nhello, world\n")  # an unquoted comma: one field too many
    assert main(["predict", str(checkpoints["float32"]), "--input", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "t.csv line 3 (row 2): 2 field(s) where the header has 1" in err
    assert "Fix or remove that row of the input file" in err and "source.bad_input" not in err
