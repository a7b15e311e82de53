"""Side networks fed from the store give the same logits as fed from a live backbone; train, save, reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from conftest import make_text_csv, make_tiny_bert
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, load_source, run_extraction
from unipt.store import FeatureStore, ProvenanceMismatch
from unipt.train import (
    ActivationLoader,
    LinearProbe,
    LinearProbeConfig,
    TrainConfig,
    UniPTClassifier,
    UniPTConfig,
    build_model,
    check_store_matches,
    evaluate,
    evaluate_checkpoint,
    fit,
    load_checkpoint,
    save_checkpoint,
)


def extract_store(model_dir: Path, csv_path: Path, url: Path, dtype: str = "float32") -> FeatureStore:
    run_extraction(SourceConfig(path=str(csv_path)), BackboneConfig(model=str(model_dir), device="cpu"),
                   ExtractConfig(dtype=dtype, part_size=16, batch_size=6), str(url), progress=False)
    return FeatureStore.open(str(url))


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("src") / "texts.csv")


@pytest.fixture(scope="module")
def store(tiny_bert_dir, csv_path, tmp_path_factory) -> FeatureStore:
    return extract_store(tiny_bert_dir, csv_path, tmp_path_factory.mktemp("stores") / "f32.zarr")


@pytest.fixture(scope="module")
def texts(csv_path) -> dict[str, str]:
    data = load_source(SourceConfig(path=str(csv_path)))
    return {ex.id: ex.text for examples in data.splits.values() for ex in examples}


@pytest.fixture(scope="module")
def backbone(tiny_bert_dir):
    return AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoTokenizer.from_pretrained(tiny_bert_dir)


def live_inputs(backbone, texts, example_ids):
    """Tokenise the batch's texts, run the backbone; padded positions hold whatever BERT computes there."""
    model, tokenizer = backbone
    batch = tokenizer([texts[i] for i in example_ids], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return list(out.hidden_states), batch["attention_mask"].bool()


def compare_cached_and_live(model, store, backbone, texts, split, layers, batch_size):
    model.eval()
    loader = ActivationLoader(store, split, layers, batch_size=batch_size, shuffle=False)
    n_batches = padded_batches = 0
    all_logits = []
    for batch in loader:
        hidden, mask = live_inputs(backbone, texts, batch.example_ids)
        assert torch.equal(mask, batch.mask)  # the same ragged lengths, padded the same way
        live_states = [hidden[l] for l in layers]
        for cached, online in zip(batch.hidden_states, live_states):
            # the cache stores zeros where BERT computed (ignored) values for padding
            assert torch.equal(cached[~mask], torch.zeros_like(cached[~mask]))
        with torch.no_grad():
            cached_logits = model(batch.hidden_states, batch.mask)
            online_logits = model(live_states, mask)
        torch.testing.assert_close(cached_logits, online_logits, atol=1e-5, rtol=1e-5)
        n_batches += 1
        padded_batches += bool((~mask).any())
        all_logits.append(cached_logits)
    assert n_batches == len(loader) >= 2
    assert padded_batches >= 1  # the comparison really covered padding
    logits = torch.cat(all_logits)
    assert logits.shape == (store.num_examples(split), len(store.label_names))
    assert logits.std(dim=0).min() > 0  # not a constant output
    return logits


@pytest.mark.parametrize("split", ["validation", "train"])
def test_unipt_cached_logits_equal_online(store, backbone, texts, split):
    torch.manual_seed(0)
    layers = store.layers
    model = UniPTClassifier(UniPTConfig(reduction=2), [store.layer_widths[l] for l in layers], len(store.label_names))
    compare_cached_and_live(model, store, backbone, texts, split, layers, batch_size=7)


def test_unipt_layer_subset_cached_logits_equal_online(store, backbone, texts):
    torch.manual_seed(1)
    layers = [0, 2]
    model = UniPTClassifier(UniPTConfig(reduction=4, out_dim=16), [32, 32], len(store.label_names))
    compare_cached_and_live(model, store, backbone, texts, "test", layers, batch_size=5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_linear_probe_cached_logits_equal_online(store, backbone, texts, pooling):
    torch.manual_seed(2)
    model = LinearProbe(LinearProbeConfig(layer=-1, pooling=pooling), [32], len(store.label_names))
    compare_cached_and_live(model, store, backbone, texts, "validation", [2], batch_size=4)


def test_padding_really_matters_to_an_unmasked_model(store, backbone, texts):
    """Control: the equality above is not vacuous; pooling that ignores the mask sees the padding."""
    loader = ActivationLoader(store, "train", [2], batch_size=8, shuffle=False)
    batch = next(b for b in loader if (~b.mask).any())
    hidden, mask = live_inputs(backbone, texts, batch.example_ids)
    assert not torch.allclose(batch.hidden_states[0].mean(1), hidden[2].mean(1), atol=1e-3)


# --------------------------------------------------------------------------- training and checkpoints
def test_fit_checkpoint_reload_and_evaluate(store, tmp_path):
    config = TrainConfig(epochs=1, max_steps=3, batch_size=8, device="cpu", model={"reduction": 2})
    result = fit("smoke", store, config, tmp_path / "runs", progress=False)
    ckpt = Path(result.checkpoint)
    assert ckpt == tmp_path / "runs" / "smoke"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    assert result.history[0]["step"] == 3
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["method"] == "unipt" and meta["layers"] == [0, 1, 2] and meta["num_labels"] == 3
    assert meta["store"]["weights_sha256"] == store.provenance["backbone"]["weights_sha256"]
    assert meta["test"] == result.test_metrics

    # training moved the weights away from their initialisation
    torch.manual_seed(config.seed)
    initial, _, _ = build_model(config, store)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == set(initial.state_dict())
    assert any(not torch.equal(saved[k], v) for k, v in initial.state_dict().items())

    model, loaded_meta = load_checkpoint(ckpt)
    assert isinstance(model, UniPTClassifier) and loaded_meta == meta
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    check_store_matches(loaded_meta, store)

    loader = ActivationLoader(store, "test", loaded_meta["layers"], batch_size=64, shuffle=False)
    direct = evaluate(model, loader, torch.device("cpu"), 3)
    scored = evaluate_checkpoint(ckpt, store, "test", device="cpu")
    assert scored == pytest.approx(direct)
    assert scored == pytest.approx(result.test_metrics)
    assert 0.0 <= scored["accuracy"] <= 1.0 and scored["loss"] > 0


@pytest.mark.parametrize("method,model_config", [("unipt", {"reduction": 4}), ("linear_probe", {"layer": 1})])
def test_save_and_load_checkpoint_give_identical_outputs(store, tmp_path, method, model_config):
    config = TrainConfig(method=method, model=model_config, device="cpu")
    torch.manual_seed(5)
    model, method_config, layers = build_model(config, store)
    with torch.no_grad():  # move every parameter off its default init, LayerNorms included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    from unipt.train._methods import config_dict

    save_checkpoint(tmp_path / "ckpt", model, method=method, model_config=config_dict(method_config), layers=layers,
                    layer_widths=[store.layer_widths[l] for l in layers], store=store)
    rebuilt, meta = load_checkpoint(tmp_path / "ckpt")
    rebuilt.eval()
    assert meta["layers"] == layers
    batch = next(iter(ActivationLoader(store, "validation", layers, batch_size=16, shuffle=False)))
    with torch.no_grad():
        assert torch.equal(rebuilt(batch.hidden_states, batch.mask), model(batch.hidden_states, batch.mask))


def test_checkpoint_refuses_a_store_from_another_backbone(store, csv_path, tmp_path):
    ckpt = Path(fit("probe", store, TrainConfig(method="linear_probe", epochs=1, max_steps=2, device="cpu",
                                                  test_split=""), tmp_path / "runs", progress=False).checkpoint)
    _, meta = load_checkpoint(ckpt)
    other_dir = make_tiny_bert(tmp_path / "other-bert", seed=1)
    other = extract_store(other_dir, csv_path, tmp_path / "other.zarr")
    assert other.provenance["backbone"]["weights_sha256"] != store.provenance["backbone"]["weights_sha256"]
    with pytest.raises(ProvenanceMismatch) as info:
        check_store_matches(meta, other)
    message = str(info.value)
    assert "weights_sha256" in message
    assert store.provenance["backbone"]["weights_sha256"] in message
    assert other.provenance["backbone"]["weights_sha256"] in message
    assert "tokenizer_sha256" not in message and "label_names" not in message
    with pytest.raises(ProvenanceMismatch, match="weights_sha256"):
        evaluate_checkpoint(ckpt, other, "test", device="cpu")


def test_checkpoint_accepts_a_float16_store_of_the_same_backbone(store, tiny_bert_dir, csv_path, tmp_path):
    ckpt = Path(fit("probe16", store, TrainConfig(method="linear_probe", epochs=1, max_steps=1, device="cpu",
                                                    eval_split="", test_split=""), tmp_path / "runs",
                    progress=False).checkpoint)
    half = extract_store(tiny_bert_dir, csv_path, tmp_path / "f16.zarr", dtype="float16")
    _, meta = load_checkpoint(ckpt)
    check_store_matches(meta, half)  # storage dtype is not part of a store's identity
    full_metrics = evaluate_checkpoint(ckpt, store, "validation", device="cpu")
    half_metrics = evaluate_checkpoint(ckpt, half, "validation", device="cpu")
    assert half_metrics["loss"] == pytest.approx(full_metrics["loss"], rel=1e-2)
