"""Image backbones end to end: a ViT's tokens and a CNN's stage maps through extraction, store and loader.

Tiny random models built from configs (a 2-layer ViT, a 4-stage ResNet) on generated images. Cached equals
online: a side network fed from a float32 store gives the logits it gives fed by the live backbone.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, randomise_params
from unipt.extract import (BackboneConfig, BadImage, ExtractConfig, ImageSourceConfig, VisionEncoder, load_examples,
                           run_extraction)
from unipt.pipelines import build_recipe
from unipt.store import FeatureStore, verify
from unipt.train import (ActivationLoader, LinearProbe, LinearProbeConfig, TrainConfig, UniPTClassifier,
                         UniPTCNNClassifier, UniPTCNNConfig, UniPTConfig, build_model, fit)


def extract(folder: Path, model_dir: Path, url: Path, *, dtype: str = "float32", layers="all",
            max_grid: int | None = None, image_size: int | None = None, bad_input: str = "error", path=None):
    label = "cls" if path is not None else "label"  # webdataset shards: the <key>.cls member
    source = ImageSourceConfig(path=str(path or folder), bad_input=bad_input, label_column=label)
    backbone = BackboneConfig(model=str(model_dir), device="cpu", image_size=image_size)
    summary = run_extraction(source, backbone, ExtractConfig(layers=layers, dtype=dtype, max_grid=max_grid,
                                                             part_size=16, batch_size=5), str(url), progress=False)
    return FeatureStore.open(str(url)), summary, source, backbone


def live_vs_cached(store: FeatureStore, source: ImageSourceConfig, encoder: VisionEncoder, layers, split="train"):
    """(cached batch, live hidden states of the same examples) for every batch of ``split``, in store order."""
    examples = {ex.id: ex for exs in load_examples(source).splits.values() for ex in exs}
    loader = ActivationLoader(store, split, layers, batch_size=7, shuffle=False)
    for batch in loader:
        prepared = encoder.prepare([examples[i] for i in batch.example_ids])
        hidden, mask = encoder.hidden_states(prepared.features)
        yield batch, [hidden[l] for l in layers], mask


def test_vit_tokens_are_stored_like_text_and_equal_the_live_backbone(image_folder, tiny_vit_dir, tmp_path):
    store, summary, source, backbone = extract(image_folder, tiny_vit_dir, tmp_path / "vit.zarr")
    assert store.layout == "tokens" and store.layers == [0, 1, 2, 3]  # embeddings, 2 blocks, final LayerNorm
    n_tokens = 1 + (32 // 8) ** 2
    parts = [p for split in store.splits() for p in store.parts(split)]
    assert all(p.n_tokens == n_tokens * p.n_examples for p in parts)
    assert sum(summary.examples.values()) == 36 and verify(store).ok
    encoder = VisionEncoder(backbone)
    torch.manual_seed(0)
    model = UniPTClassifier(UniPTConfig(), [32] * 4, 3).eval()
    randomise_params(model)
    checked = 0
    for batch, live, mask in live_vs_cached(store, source, encoder, store.layers):
        assert batch.mask.all() and batch.mask.shape == mask.shape
        for cached, online in zip(batch.hidden_states, live):
            torch.testing.assert_close(cached, online, rtol=0, atol=0)
        torch.testing.assert_close(model(batch.hidden_states, batch.mask), model(live, mask), rtol=1e-6, atol=1e-6)
        checked += len(batch)
    assert checked == store.num_examples("train") > 0
    # The final LayerNorm differs from the last block's output, so it is a layer of its own.
    assert not torch.equal(live[-1], live[-2])


@pytest.mark.parametrize("max_grid", [None, 4])
def test_cnn_stage_maps_are_fixed_shape_rows_and_equal_the_live_backbone(image_folder, tiny_resnet_dir, tmp_path,
                                                                        max_grid):
    store, _, source, backbone = extract(image_folder, tiny_resnet_dir, tmp_path / "cnn.zarr", layers="stages",
                                         max_grid=max_grid)
    assert store.layout == "maps"
    # ResNet at 64 px: the stem's map (8 ch, 16x16) is followed by a stage at the same grid, so "stages" keeps
    # the stage, then one map per grid; the last hidden state is the final output, no extra layer.
    grids = [16, 8, 4, 2] if max_grid is None else [4, 4, 4, 2]
    assert store.layers == [1, 2, 3, 4]
    assert [store.row_shapes[l] for l in store.layers] == [(g, g, c) for g, c in zip(grids, [8, 16, 32, 64])]
    assert all(p.n_tokens == p.n_examples for p in store.parts("train"))
    encoder = VisionEncoder(backbone, max_grid=max_grid)
    torch.manual_seed(0)
    unipt = UniPTCNNClassifier(UniPTCNNConfig(reduction=2), [8, 16, 32, 64], 3).eval()
    randomise_params(unipt)
    probe = LinearProbe(LinearProbeConfig(layer=-1), [64], 3).eval()
    for batch, live, mask in live_vs_cached(store, source, encoder, store.layers):
        assert [tuple(h.shape[1:]) for h in batch.hidden_states] == [(c, g, g) for g, c in zip(grids, [8, 16, 32, 64])]
        for cached, online in zip(batch.hidden_states, live):
            # Not bitwise: CPU convolutions round differently for other batch sizes (5 at extraction, 7 here).
            torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unipt(batch.hidden_states, batch.mask), unipt(live, mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe(batch.hidden_states[-1:], batch.mask), probe(live[-1:], mask))


def test_cnn_variant_trains_from_stores_at_two_input_resolutions(image_folder, tiny_resnet_dir, tmp_path):
    """One recipe's network config serves both resolutions: the pooling windows come from the stored shapes."""
    config = TrainConfig(method="unipt_cnn", lr=3e-3, epochs=3, batch_size=8, model={"reduction": 2}, device="cpu")
    results = {}
    for size, grids in ((64, [16, 8, 4, 2]), (96, [24, 12, 6, 3])):
        store, *_ = extract(image_folder, tiny_resnet_dir, tmp_path / f"cnn{size}.zarr", layers="stages",
                            image_size=size)
        assert [store.row_shapes[l][0] for l in store.layers] == grids
        results[size] = fit(f"cnn{size}", store, config, tmp_path / f"out{size}", progress=False)
    for result in results.values():
        losses = [record["train_loss"] for record in result.history]
        assert len(losses) == 3 and losses[-1] < losses[0]
        assert np.isfinite(result.test_metrics["loss"])
    # `unipt predict` labels raw texts: an image checkpoint is refused with what to do instead.
    from unipt.pipelines import SideNetworkPredictor

    with pytest.raises(ValueError, match=r"trained on image features.*unipt eval"):
        SideNetworkPredictor.from_checkpoint(results[64].checkpoint)


def test_int8_maps_store_quantises_per_map_position(image_folder, tiny_resnet_dir, tmp_path):
    exact, _, source, _ = extract(image_folder, tiny_resnet_dir, tmp_path / "f32.zarr", layers="stages")
    small, *_ = extract(image_folder, tiny_resnet_dir, tmp_path / "int8.zarr", layers="stages", dtype="int8")
    part = small.parts("train")[0]
    data = small.read_part(part)
    layer = small.layers[0]
    assert data.layers[layer].dtype == torch.int8 and data.scales[layer].shape == data.layers[layer].shape[:-1]
    a = next(iter(ActivationLoader(exact, "train", exact.layers, batch_size=64, shuffle=False)))
    b = next(iter(ActivationLoader(small, "train", small.layers, batch_size=64, shuffle=False)))
    assert a.example_ids == b.example_ids
    for x, y in zip(a.hidden_states, b.hidden_states):
        # absmax over the channels at each position: error at most half a step of that position's scale
        step = x.abs().amax(dim=1, keepdim=True) / 127
        assert bool(((x - y).abs() <= step / 2 + 1e-6).all())
        assert not torch.equal(x, y)


def test_token_methods_refuse_a_maps_store_and_name_the_ones_that_fit(image_folder, tiny_resnet_dir, tmp_path):
    store, *_ = extract(image_folder, tiny_resnet_dir, tmp_path / "cnn.zarr", layers="stages")
    with pytest.raises(ValueError, match=r"'unipt' reads tokens stores.*holds maps.*unipt_cnn"):
        build_model(TrainConfig(method="unipt"), store)
    with pytest.raises(ValueError, match="needs tokens"):
        model, _, _ = build_model(TrainConfig(method="linear_probe", model={"pooling": "cls"}), store)
        batch = next(iter(ActivationLoader(store, "train", [store.layers[-1]], batch_size=4, shuffle=False)))
        model(batch.hidden_states, batch.mask)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for member, data in ((f"{key}.png", image), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def generated_samples(n: int = 30, seed: int = 0) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(seed)
    return [(f"img{i:04d}", png(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), i % 3) for i in range(n)]


def test_webdataset_shard_of_generated_images_round_trips_through_extraction(tiny_vit_dir, tmp_path):
    samples = generated_samples()
    shard = write_shard(tmp_path / "images-000000.tar", samples)
    store, summary, source, backbone = extract(None, tiny_vit_dir, tmp_path / "wds.zarr", path=shard)
    stored = {}
    for split in store.splits():
        for part in store.parts(split):
            data = store.read_part(part)
            stored.update(zip(data.example_id, data.label))
    assert sorted(stored) == [key for key, _, _ in samples]
    assert all(stored[key] == label for key, _, label in samples)  # labels 0/1/2 sort to indices 0/1/2
    # The stored activations are the backbone's on each decoded image.
    encoder = VisionEncoder(backbone)
    for batch, live, _ in live_vs_cached(store, source, encoder, [store.layers[-1]]):
        torch.testing.assert_close(batch.hidden_states[0], live[0], rtol=0, atol=0)


def truncated_png(seed: int = 1) -> bytes:
    data = png(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return data[: len(data) // 2]  # a valid header, cut-off pixel data: found only when decoded


def test_an_image_that_breaks_only_when_decoded_follows_the_bad_input_policy(tiny_vit_dir, tmp_path):
    samples = generated_samples()
    samples[7] = (samples[7][0], truncated_png(), samples[7][2])
    shard = write_shard(tmp_path / "images-000000.tar", samples)
    with pytest.raises(BadImage, match=r"img0007.*truncated or corrupt.*bad_input = \"skip\""):
        extract(None, tiny_vit_dir, tmp_path / "error.zarr", path=shard)
    store, summary, *_ = extract(None, tiny_vit_dir, tmp_path / "skip.zarr", path=shard, bad_input="skip")
    assert summary.skipped == {"broken image": 1}
    assert [(r["example_id"], r["source_row"], r["reason"]) for r in store.skipped()] == [("img0007", 8, "broken image")]
    assert sum(store.num_examples(s) for s in store.splits()) == len(samples) - 1
    # Resuming the finished store redoes nothing and keeps the record.
    _, again, *_ = extract(None, tiny_vit_dir, tmp_path / "skip.zarr", path=shard, bad_input="skip")
    assert again.parts_written == 0 and len(store.skipped()) == 1


def test_image_recipe_section_and_its_errors(tmp_path):
    recipe = build_recipe({"source": {"modality": "image", "path": str(tmp_path), "validation_from_train": 0.1},
                           "backbone": {"model": "m", "image_size": 84}, "train": {"p": {"method": "linear_probe"}}})
    assert isinstance(recipe.source, ImageSourceConfig) and recipe.source.validation_from_train == 0.1
    assert recipe.backbone.image_size == 84
    with pytest.raises(ValueError, match="modality must be one of"):
        build_recipe({"source": {"modality": "audio", "path": "x"}, "backbone": {"model": "m"},
                      "train": {"p": {"method": "linear_probe"}}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['text_column'\] in \[source\]"):
        build_recipe({"source": {"modality": "image", "path": "x", "text_column": "t"}, "backbone": {"model": "m"},
                      "train": {"p": {"method": "linear_probe"}}})


def test_validation_held_out_of_a_source_with_its_own_splits(tmp_path):
    root = tmp_path / "split"
    make_image_folder(root / "train", n_per_class=20)
    make_image_folder(root / "test", n_per_class=4, seed=1)
    data = load_examples(ImageSourceConfig(path=str(root), validation_from_train=0.25))
    sizes = {split: len(examples) for split, examples in data.splits.items()}
    assert sizes["test"] == 12 and sizes["train"] + sizes["validation"] == 60 and 5 <= sizes["validation"] <= 25
    again = load_examples(ImageSourceConfig(path=str(root), validation_from_train=0.25))
    assert [ex.id for ex in again.splits["validation"]] == [ex.id for ex in data.splits["validation"]]


def test_maps_store_info_and_webdataset_export(image_folder, tiny_resnet_dir, tmp_path, capsys):
    from unipt.pipelines.cli import main
    from unipt.store import export_webdataset

    store, *_ = extract(image_folder, tiny_resnet_dir, tmp_path / "cnn.zarr", layers="stages", max_grid=8)
    assert main(["store", "info", str(tmp_path / "cnn.zarr")]) == 0
    assert "maps (H x W x C) 8x8x8, 8x8x16, 4x4x32, 2x2x64" in capsys.readouterr().out
    shards = export_webdataset(store, str(tmp_path / "export"), splits=["test"])
    with tarfile.open(shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    document = next(name for name in sorted(members) if name.endswith(".json"))
    example_id = json.loads(members[document])["example_id"]  # e.g. dots/002.png, its key dots/002%2Epng
    stage = np.load(io.BytesIO(members[document[: -len("json")] + "layer_003.npy"]), allow_pickle=False)
    assert stage.shape == (4, 4, 32)  # one (H, W, C) map per example
    data = store.read_part(store.parts("test")[0])
    row = list(data.example_id).index(example_id)
    np.testing.assert_array_equal(stage, data.layers[3][row].numpy())
