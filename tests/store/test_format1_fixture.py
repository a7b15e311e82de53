"""A store written before stores recorded their task (format version 1, committed under tests/fixtures by
the release before tasks existed) still opens, verifies, trains and evaluates: as single-label classification."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unipt.pipelines.cli import main
from unipt.store import FeatureStore, verify
from unipt.train import LoaderConfig, TrainConfig, evaluate_checkpoint, fit_many

FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1-store.zarr"
LOADER = LoaderConfig(mode="memory", background="off")


@pytest.fixture
def old_store(tmp_path) -> FeatureStore:
    copy = tmp_path / "format1-store.zarr"  # a copy: nothing may ever write into the fixture
    shutil.copytree(FIXTURE, copy)
    return FeatureStore.open(str(copy))


def test_an_old_store_opens_as_single_label_classification(old_store):
    assert old_store.meta["format_version"] == 1 and "task" not in old_store.meta
    assert old_store.task == "classification"
    assert old_store.label_names == ["negative", "neutral", "positive"]
    assert {s: old_store.num_examples(s) for s in old_store.splits()} == {"train": 23, "validation": 4, "test": 3}
    part = old_store.read_part(old_store.parts("train")[0])
    assert part.label.dtype.name == "int64" and not part.token_targets
    assert verify(old_store).ok


def test_an_old_store_trains_evaluates_and_scores_from_the_cli(old_store, tmp_path, capsys):
    runs = {"unipt": TrainConfig(method="unipt", epochs=2, batch_size=8, model={"reduction": 2}),
            "probe": TrainConfig(method="linear_probe", epochs=2, batch_size=8)}
    results = fit_many(runs, old_store, tmp_path / "checkpoints", loader_config=LOADER, progress=False)
    for result in results:
        assert result.task == "classification" and result.select_metric == "accuracy"
        assert result.test_metrics["n"] == 3 and 0.0 <= result.test_metrics["accuracy"] <= 1.0
        assert evaluate_checkpoint(result.checkpoint, old_store, "test", batch_size=8, device="cpu",
                                   loader_config=LOADER) == result.test_metrics
    assert main(["eval", results[0].checkpoint, "--store", old_store.url, "--split", "validation", "-q"]) == 0
    assert '"n": 4' in capsys.readouterr().out
