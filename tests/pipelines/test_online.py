"""Online reference loops (backbone in the loop, on raw text): each method trains; parameter counts; the
online UniPT step equals the cached one; the backbone stays frozen or trains as it should; peak memory."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

from conftest import make_text_csv
from test_cached_equals_online import extract_store
from unipt.extract import SourceConfig, SourceData, TextEncoder, load_source
from unipt.pipelines._memory import PeakMemory
from unipt.pipelines._online import (
    ONLINE_METHODS,
    BackboneClassifier,
    OnlineUniPT,
    attention_query_value_modules,
    build_online_model,
    fit_online,
    tokenize_splits,
    train_online,
)
from unipt.store import FeatureStore
from unipt.train import ActivationLoader, LoaderConfig, MetricsLog, TrainConfig, build_model, count_trainable, fit

METHOD_OPTIONS = {"online_unipt": {"reduction": 2}, "online_unipt_train": {"reduction": 2}, "full_finetune": {},
                  "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("online-src") / "texts.csv")


@pytest.fixture(scope="module")
def source(csv_path) -> SourceConfig:
    return SourceConfig(path=str(csv_path), max_examples={"train": 40})  # a few dozen training examples


@pytest.fixture(scope="module")
def store(tiny_bert_dir, csv_path, tmp_path_factory) -> FeatureStore:
    return extract_store(tiny_bert_dir, csv_path, tmp_path_factory.mktemp("online-stores") / "f32.zarr")


def fresh_model(backbone, method: str, **overrides):
    """A freshly loaded encoder (full_finetune and lora change it) and the method's model around it."""
    encoder = TextEncoder(backbone)
    config = TrainConfig(method=method, model=METHOD_OPTIONS[method], device="cpu", **overrides)
    return build_online_model(config, encoder, 3), config


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- every method trains
@pytest.mark.parametrize("method", sorted(ONLINE_METHODS))
def test_each_method_trains_one_epoch(method, source, backbone, tmp_path):
    config = TrainConfig(method=method, model=METHOD_OPTIONS[method], epochs=1, batch_size=8, device="cpu")
    log = tmp_path / "metrics.jsonl"
    result = fit_online(method, source, backbone, config, log=MetricsLog(log), progress=False)
    data = load_source(source)
    assert len(data.splits["train"]) == 40
    assert result.method == method and result.best_epoch == 1 and len(result.history) == 1
    assert result.history[0]["step"] == 5  # 40 examples / 8
    assert math.isfinite(result.history[0]["train_loss"]) and result.history[0]["train_loss"] > 0
    for metrics, split in ((result.eval_metrics, "validation"), (result.test_metrics, "test")):
        assert metrics["n"] == len(data.splits[split])
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
        assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    last = json.loads(log.read_text().splitlines()[-1])  # the test score, logged once for the best epoch
    assert last["epoch"] == result.best_epoch and last["test_accuracy"] == result.test_metrics["accuracy"]
    assert len(result.epoch_seconds) == 1 and result.train_seconds == pytest.approx(result.epoch_seconds[0])
    assert result.train_examples_per_s > 0
    assert result.peak_memory_bytes > 0 and result.memory_device == "cpu"
    assert result.trainable_params > 0


def test_online_splits_are_the_stores_splits(store, backbone, csv_path):
    """Online training reads exactly the examples (and token counts) a store extracted from the source holds."""
    data = load_source(SourceConfig(path=str(csv_path)))  # the config the store was extracted with
    splits = tokenize_splits(data, TextEncoder(backbone), ["train", "validation", "test"])
    for name, split in splits.items():
        loader = ActivationLoader(store, name, [store.layers[-1]], batch_size=64, shuffle=False)
        stored = {}
        for batch in loader:
            stored.update(zip(batch.example_ids, batch.mask.sum(1).tolist()))
        assert stored == dict(zip(split.example_ids, split.lengths.tolist()))


def test_unknown_method_or_option_is_refused_before_loading(source, backbone):
    with pytest.raises(ValueError, match=r"unknown online method 'unipt'.*full_finetune.*lora.*online_unipt"):
        fit_online("x", source, backbone, TrainConfig(method="unipt"), progress=False)
    with pytest.raises(ValueError, match=r"unknown lora model option\(s\) \['rank'\]; valid: .*'r'"):
        fit_online("x", source, backbone, TrainConfig(method="lora", model={"rank": 4}), progress=False)


# --------------------------------------------------------------------------- trainable parameters
def test_trainable_parameter_counts(backbone):
    full, _ = fresh_model(backbone, "full_finetune")
    lora, _ = fresh_model(backbone, "lora")
    side, _ = fresh_model(backbone, "online_unipt")
    assert isinstance(full, BackboneClassifier) and isinstance(lora, BackboneClassifier)
    assert isinstance(side, OnlineUniPT)

    # full fine-tuning: every backbone weight trains (the unused pooler is dropped, not left frozen)
    assert full.backbone.pooler is None
    assert all(p.requires_grad for p in full.backbone.parameters())
    assert count_trainable(full) == numel(full.backbone) + numel(full.head)

    # LoRA: peft's own count of adapter weights + the head; adapters on every layer's query and value only
    peft_trainable, peft_total = lora.backbone.get_nb_trainable_parameters()
    assert count_trainable(lora) == peft_trainable + numel(lora.head)
    assert peft_total == numel(full.backbone) + peft_trainable  # same backbone, plus the adapters
    adapted = [name for name, module in lora.backbone.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 2 * 2  # 2 layers x (query, value)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"query", "value"}
    assert peft_trainable == 2 * 2 * (4 * 32 + 32 * 4)  # r = 4 on 32x32 projections: A (4x32) + B (32x4)
    assert count_trainable(lora) * 5 < count_trainable(full)

    # online UniPT: the side network and its head only; no backbone weight trains
    assert not any(p.requires_grad for p in side.backbone.parameters())
    assert count_trainable(side) == numel(side.side)
    assert count_trainable(side) < count_trainable(full)


def test_lora_targets_are_found_for_bert_and_mpnet():
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32))
    assert attention_query_value_modules(bert) == [f"encoder.layer.{i}.attention.self.{n}"
                                                   for i in range(3) for n in ("query", "value")]
    mpnet = MPNetModel(MPNetConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32))
    assert attention_query_value_modules(mpnet) == [f"encoder.layer.{i}.attention.attn.{n}"
                                                    for i in range(2) for n in ("q", "v")]
    with pytest.raises(ValueError, match=r"no attention query/value Linear modules in Sequential.*target_modules"):
        attention_query_value_modules(nn.Sequential(nn.Linear(4, 4)))


# --------------------------------------------------------------------------- online UniPT == cached UniPT
def test_online_unipt_first_step_loss_equals_cached(store, backbone, csv_path, tmp_path):
    """Same seed -> same initial side network; the cached path's first batch fed online -> same first loss."""
    options = {"reduction": 2, "dropout": 0.0}  # no dropout: the loss does not depend on the rows' order
    cached_config = TrainConfig(method="unipt", model=options, epochs=1, max_steps=1, batch_size=8, device="cpu",
                                eval_split="", test_split="")
    online_config = TrainConfig(**{**cached_config.__dict__, "method": "online_unipt"})

    torch.manual_seed(123)  # build_online_model must seed itself, as fit does
    online_model = build_online_model(online_config, TextEncoder(backbone), len(store.label_names))
    torch.manual_seed(cached_config.seed)
    cached_model, _, layers = build_model(cached_config, store)
    assert online_model.layers == layers == [0, 1, 2]
    online_weights, cached_weights = online_model.side.state_dict(), cached_model.state_dict()
    assert online_weights.keys() == cached_weights.keys()
    assert all(torch.equal(online_weights[k], cached_weights[k]) for k in cached_weights)

    cached = fit("cached", store, cached_config, tmp_path / "runs", progress=False)
    loader = ActivationLoader(store, "train", layers, batch_size=8, shuffle=True, seed=cached_config.seed,
                              config=LoaderConfig())
    first_ids = next(iter(loader)).example_ids  # the batch fit trained its first step on
    by_id = {ex.id: ex for ex in load_source(SourceConfig(path=str(csv_path))).splits["train"]}
    data = SourceData(splits={"train": [by_id[i] for i in first_ids]}, label_names=store.label_names,
                      fingerprint="first cached batch")
    online = fit_online("online", data, backbone, online_config, progress=False)

    assert online.history[0]["step"] == cached.history[0]["step"] == 1
    assert online.trainable_params == cached.trainable_params
    assert online.history[0]["train_loss"] == pytest.approx(cached.history[0]["train_loss"], abs=1e-5)


# --------------------------------------------------------------------------- what trains and what does not
def train_one_epoch(model, config, source):
    data = load_source(source)
    splits = tokenize_splits(data, model.encoder, ["train", "validation"])
    return train_online("t", model, splits, TrainConfig(**{**config.__dict__, "epochs": 1, "batch_size": 8,
                                                           "test_split": ""}), num_labels=3, progress=False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_backbone_is_frozen_by_online_unipt(source, backbone):
    model, config = fresh_model(backbone, "online_unipt")
    backbone_before, side_before = snapshot(model.backbone), snapshot(model.side)
    result = train_one_epoch(model, config, source)
    assert result.test_metrics is None and result.eval_metrics["n"] > 0
    assert not model.backbone.training  # train() keeps the backbone in eval mode
    after = model.backbone.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in backbone_before)
    assert any(not torch.equal(side_before[k], v) for k, v in model.side.state_dict().items())


def test_train_mode_reference_runs_the_frozen_backbone_with_dropout(source, backbone):
    """online_unipt_train: the backbone's dropout is on while training (two forwards of one batch differ),
    off in evaluation (they agree); its weights never change."""
    model, config = fresh_model(backbone, "online_unipt_train")
    assert model.backbone.config.hidden_dropout_prob > 0  # the tiny BERT has dropout to switch on
    features = tokenize_splits(load_source(source), model.encoder, ["train"])["train"].features[:8]

    def last_hidden() -> torch.Tensor:
        return model.encoder.hidden_states(features)[0][-1]  # the backbone's own output, not the side network's

    model.train()
    assert model.backbone.training and all(m.training for m in model.backbone.modules() if isinstance(m, nn.Dropout))
    assert not torch.equal(last_hidden(), last_hidden())
    model.eval()
    assert torch.equal(last_hidden(), last_hidden()) and torch.equal(model(features), model(features))
    backbone_before = snapshot(model.backbone)
    train_one_epoch(model, config, source)
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.state_dict().items())
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_backbone_is_trained_by_full_finetune(source, backbone):
    model, config = fresh_model(backbone, "full_finetune")
    before = snapshot(model.backbone)
    train_one_epoch(model, config, source)
    after = model.backbone.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("attention.self.query.weight" in k for k in changed)
    assert any("embeddings.word_embeddings" in k for k in changed)


def test_lora_trains_adapters_and_leaves_base_weights(source, backbone):
    model, config = fresh_model(backbone, "lora")
    before = snapshot(model.backbone)
    train_one_epoch(model, config, source)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: the update really moved


# --------------------------------------------------------------------------- peak memory
def test_peak_memory_counts_growth_above_the_start_on_cpu():
    with PeakMemory("cpu") as peak:
        kept = torch.ones(16 * 2**20)  # 64 MiB, touched
    assert peak.bytes >= 60 * 2**20
    assert peak.peak_bytes - peak.baseline_bytes == peak.bytes
    del kept


def test_peak_memory_catches_a_spike_freed_before_the_block_ends():
    with PeakMemory("cpu", interval=0.002) as peak:
        spike = torch.ones(16 * 2**20)  # 64 MiB
        time.sleep(0.1)  # the sampler thread reads RSS meanwhile
        del spike
    assert peak.samples > 1
    assert peak.bytes >= 60 * 2**20


def test_peak_allocated_counts_what_is_in_use_not_what_the_allocator_keeps():
    from unipt.pipelines._memory import _mallinfo2

    if _mallinfo2 is None:
        pytest.skip("the C library has no mallinfo2 (not glibc >= 2.33)")
    with PeakMemory("cpu", interval=0.002) as peak:
        spike = torch.ones(16 * 2**20)  # 64 MiB in use for a while, then freed
        time.sleep(0.1)
        del spike
        small = [torch.ones(1000) for _ in range(10)]  # ~40 kB: in use at the end, far below the spike
    assert 60 * 2**20 <= peak.allocated_bytes < 80 * 2**20
    del small


def test_peak_memory_refuses_other_devices():
    with pytest.raises(ValueError, match="'cpu'.*'cuda'"):
        PeakMemory("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda():
    with PeakMemory("cuda") as peak:
        spike = torch.ones(16 * 2**20, device="cuda")
        del spike
    assert peak.bytes >= 64 * 2**20
