"""Every storage dtype through extraction and the loader: batches match a float32 store within the dtype's error."""

from __future__ import annotations

import pytest

from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, run_extraction
from unipt.store import FeatureStore
from unipt.train import ActivationLoader, TrainConfig, evaluate_checkpoint, fit

TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 8e-3}  # max error / max |value|


@pytest.fixture(scope="module")
def stores(tiny_bert_dir, tmp_path_factory):
    from conftest import make_text_csv

    folder = tmp_path_factory.mktemp("dtypes")
    csv = make_text_csv(folder / "texts.csv")
    urls = {}
    for dtype in TOLERANCE:
        urls[dtype] = str(folder / f"{dtype}.zarr")
        run_extraction(SourceConfig(path=str(csv)), BackboneConfig(model=str(tiny_bert_dir)),
                       ExtractConfig(dtype=dtype, part_size=32), urls[dtype], progress=False)
    return {dtype: FeatureStore.open(url) for dtype, url in urls.items()}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_loader_batches_match_float32_within_the_dtype_error(stores, dtype):
    reference, store = stores["float32"], stores[dtype]
    assert store.dtype == dtype
    for ref, got in zip(ActivationLoader(reference, "test", reference.layers, batch_size=16, shuffle=False),
                        ActivationLoader(store, "test", store.layers, batch_size=16, shuffle=False)):
        assert ref.example_ids == got.example_ids
        for r, g in zip(ref.hidden_states, got.hidden_states):
            assert (g - r).abs().max() <= TOLERANCE[dtype] * r.abs().max()


def test_a_checkpoint_trained_on_float16_scores_on_an_int8_store(stores, tmp_path):
    result = fit("unipt", stores["float16"], TrainConfig(epochs=1, max_steps=2), tmp_path, progress=False)
    metrics = evaluate_checkpoint(result.checkpoint, stores["int8"], "test")
    assert metrics["n"] == stores["int8"].num_examples("test")
    assert abs(metrics["accuracy"] - result.test_metrics["accuracy"]) <= 2 / metrics["n"]  # at most 2 flips
