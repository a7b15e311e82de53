"""The loader serves one stochastic view per example per epoch: rotate (epoch e: view e mod n), random (per
example and epoch, from the data seed), eval (view 0); evaluation splits read view 0; asking for more views
than stored is refused; and fit() trains from a views store, with the views reaching its batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from unipt.store import FeatureStore, StoreError
from unipt.train import ActivationLoader, LoaderConfig, TrainConfig, fit, pass_groups

K = 3  # views stored for the train split
WIDTH = 4
MODES = ("memory", "stream")


def write_views_store(url: str, *, dtype: str = "float32", n_train: int = 40, part_size: int = 10) -> FeatureStore:
    """A store whose train split holds K views: every value of example k's rows in view v is 1000 v + k (so a
    served batch says which view each example came from); validation has one view. Labels follow k mod 3
    with a class direction added, so a model can learn them."""
    directions = torch.eye(3, WIDTH) * 50
    store = FeatureStore.create(url, layers=[0, 1], layer_widths=[WIDTH, WIDTH], dtype=dtype, label_names=["a", "b", "c"],
                                provenance={"backbone": {"weights_sha256": "x", "tokenizer_sha256": "x"}},
                                views={"count": K, "splits": ["train"]})
    start = 0
    for split, n in (("train", n_train), ("validation", 12), ("test", 12)):
        for index, first in enumerate(range(0, n, part_size)):
            ks = list(range(first, min(first + part_size, n)))
            lengths = [1 + k % 4 for k in ks]
            writer = store.part_writer(split, index, n_examples=len(ks), n_tokens=sum(lengths), source_start=start)
            for view in range(store.views(split)):
                rows = torch.cat([torch.full((length, WIDTH), 1000.0 * view + k) + directions[k % 3]
                                  for k, length in zip(ks, lengths)])
                writer.append({0: rows, 1: rows}, view=view)
            writer.finish([f"{split}-{k:03d}" for k in ks], [k % 3 for k in ks], lengths)
            start += len(ks)
    return FeatureStore.open(url)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_views_store(str(tmp_path_factory.mktemp("views") / "s.zarr"))


def served_views(loader: ActivationLoader, epoch: int) -> dict[str, int]:
    """example id -> the view its rows came from, read off the values (1000 v + k), over one epoch."""
    loader.set_epoch(epoch)
    out = {}
    for batch in loader:
        for i, example_id in enumerate(batch.example_ids):
            k = int(example_id.rsplit("-", 1)[1])
            n = int(batch.mask[i].sum())
            values = batch.hidden_states[0][i, :n] - torch.eye(3, WIDTH)[k % 3] * 50
            view = round((float(values[0, 0]) - k) / 1000)
            assert torch.equal(values, torch.full_like(values, 1000.0 * view + k))  # every row from that one view
            assert example_id not in out
            out[example_id] = view
    assert len(out) == loader.num_examples
    return out


def loader(store, mode, *, split="train", views=0, schedule="rotate", seed=0, **kw) -> ActivationLoader:
    config = LoaderConfig(mode=mode, background="off", shuffle_buffer=12, prefetch_parts=1)
    return ActivationLoader(store, split, [0, 1], batch_size=4, shuffle=True, seed=seed, config=config, views=views,
                            view_schedule=schedule, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_rotate_serves_view_e_mod_n_to_every_example(store, mode):
    every = loader(store, mode)
    for epoch in range(4):
        assert set(served_views(every, epoch).values()) == {epoch % K}
    two = loader(store, mode, views=2)  # the first two stored views only
    assert [set(served_views(two, epoch).values()) for epoch in range(4)] == [{0}, {1}, {0}, {1}]


@pytest.mark.parametrize("mode", MODES)
def test_rotate_decodes_one_view_per_part(store, mode, monkeypatch):
    asked = []
    real = store.read_part

    def spy(part, layers=None, *, view=0):
        asked.append((part.name, view))
        return real(part, layers=layers, view=view)

    monkeypatch.setattr(store, "read_part", spy)
    served_views(loader(store, mode), 1)
    n_parts = len(store.parts("train"))
    if mode == "stream":
        assert Counter(view for _, view in asked) == {1: n_parts}
    else:  # memory mode holds every view, decoded once
        assert Counter(view for _, view in asked) == {v: n_parts for v in range(K)}


def test_random_is_deterministic_per_seed_and_varies_across_epochs(store):
    per_mode = {}
    for mode in MODES:
        a, b = loader(store, mode, schedule="random", seed=5), loader(store, mode, schedule="random", seed=5)
        epochs = [served_views(a, epoch) for epoch in range(6)]
        assert epochs == [served_views(b, epoch) for epoch in range(6)]  # same seed, same views
        per_mode[mode] = epochs
    assert per_mode["memory"] == per_mode["stream"]  # drawn per example: the mode does not matter
    epochs = per_mode["memory"]
    assert all(len(set(epoch.values())) == K for epoch in epochs)  # one epoch mixes views
    seen = [len({epoch[example_id] for epoch in epochs}) for example_id in epochs[0]]
    assert min(seen) >= 1 and np.mean(seen) > 2  # each example's view varies across epochs
    other = loader(store, "memory", schedule="random", seed=6)
    assert served_views(other, 0) != epochs[0]  # another data seed draws other views


@pytest.mark.parametrize("mode", MODES)
def test_eval_schedule_validation_and_default_loaders_read_view0(store, mode):
    assert set(served_views(loader(store, mode, schedule="eval"), 2).values()) == {0}
    # a loader as the trainer builds for evaluation (no view settings) on the train split: view 0
    plain = ActivationLoader(store, "train", [0, 1], batch_size=4, shuffle=False, config=LoaderConfig(mode=mode))
    assert set(served_views(plain, 1).values()) == {0}
    assert set(served_views(loader(store, mode, split="validation"), 1).values()) == {0}  # one view stored


def test_more_views_than_stored_are_refused(store):
    with pytest.raises(StoreError, match=r"4 views were asked for .* stores 3 view"):
        loader(store, "memory", views=4)
    with pytest.raises(StoreError, match=r"2 views were asked for .* 'validation' .* stores 1 view"):
        loader(store, "memory", split="validation", views=2)
    with pytest.raises(ValueError, match="view_schedule must be one of"):
        loader(store, "memory", schedule="cycle")
    with pytest.raises(ValueError, match="view_schedule must be one of"):
        TrainConfig(view_schedule="cycle")
    with pytest.raises(ValueError, match="views must be >= 0"):
        TrainConfig(views=-1)


def test_memory_mode_holds_the_views_it_serves(store):
    one = loader(store, "memory", schedule="eval").resident_bytes
    assert loader(store, "memory").resident_bytes == K * one
    assert loader(store, "memory", views=2).resident_bytes == 2 * one


def test_int8_views_are_dequantised_per_view(tmp_path):
    store = write_views_store(str(tmp_path / "int8.zarr"), dtype="int8", n_train=12, part_size=6)
    for mode in MODES:
        feed = loader(store, mode, schedule="random", seed=1)
        feed.set_epoch(0)
        draws = feed.epoch_views([f"train-{k:03d}" for k in range(12)])
        for batch in feed:
            for i, example_id in enumerate(batch.example_ids):
                k = int(example_id.rsplit("-", 1)[1])
                expected = 1000.0 * draws[k] + k + torch.eye(3, WIDTH)[k % 3] * 50
                torch.testing.assert_close(batch.hidden_states[0][i, 0], expected, rtol=1e-2, atol=0.5)


def test_store_without_views_serves_view0_whatever_the_schedule(tmp_path):
    from conftest import write_tiny_store

    plain = write_tiny_store(str(tmp_path / "plain.zarr"))
    assert plain.views("train") == 1
    feed = ActivationLoader(plain, "train", [0], batch_size=8, shuffle=True, view_schedule="random",
                            config=LoaderConfig(mode="stream", background="off"))
    feed.set_epoch(3)
    assert feed.n_views == 1 and sum(len(b) for b in feed) == 60
    with pytest.raises(StoreError, match="2 views were asked for"):
        ActivationLoader(plain, "train", [0], batch_size=8, shuffle=True, views=2, view_schedule="rotate")


def test_views_settings_split_passes():
    runs = {"rotate": TrainConfig(), "random": TrainConfig(view_schedule="random"), "two": TrainConfig(views=2),
            "rotate-again": TrainConfig(lr=1e-3)}
    assert [sorted(g) for g in pass_groups(runs)] == [["rotate", "rotate-again"], ["random"], ["two"]]


def test_fit_trains_on_a_views_store_and_the_views_reach_its_batches(store, tmp_path):
    # eval_split "": each run keeps its last epoch, which rotate trained on view 2 and eval on view 0
    config = dict(method="linear_probe", model={"layer": -1}, epochs=3, batch_size=8, lr=1e-2, warmup=0.0,
                  device="cpu", stack="off", eval_split="")
    loader_config = LoaderConfig(mode="memory", background="off")
    rotated = fit("rotate", store, TrainConfig(**config), tmp_path / "rotate", loader_config=loader_config,
                  progress=False)
    assert rotated.test_metrics is not None and rotated.test_metrics["accuracy"] > 0.5  # chance is 1/3
    fit("eval", store, TrainConfig(**config, view_schedule="eval"), tmp_path / "eval",
                    loader_config=loader_config, progress=False)
    # the same run served view 0 only trains on other inputs from epoch 2 on: other weights
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "rotate" / "rotate" / "model.safetensors"))
    b = load_file(str(tmp_path / "eval" / "eval" / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(StoreError, match="4 views were asked for"):
        fit("too-many", store, TrainConfig(**config, views=4), tmp_path / "bad", loader_config=loader_config,
            progress=False)
