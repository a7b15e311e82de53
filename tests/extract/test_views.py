"""Stochastic views (extract.views = K): view 0 is the K = 1 store bit for bit, views >= 1 differ (dropout and,
for images, the crop/flip augmentation), every view is reproducible (same run twice, resumed, distributed), a
part commits only with all its views, and verify / info / export know about them."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_text_csv
from unipt.extract import (Augmentation, BackboneConfig, ExtractConfig, ImageSourceConfig, SourceConfig,
                           augment_seed, dropout_seed, run_extraction)
from unipt.extract._backbone import stochastic_forward
from unipt.store import FeatureStore, StoreError, describe, verify
from unipt.store._store import PartWriter

PART, BATCH = 16, 4


def make_bert(folder: Path, *, hidden_dropout: float, attention_dropout: float) -> Path:
    """conftest's tiny BERT with the dropout rates given (its own config keeps BertConfig's 0.1 defaults)."""
    from transformers import BertConfig, BertModel

    from conftest import make_tiny_bert

    make_tiny_bert(folder)
    config = BertConfig.from_pretrained(folder)
    config.hidden_dropout_prob, config.attention_probs_dropout_prob = hidden_dropout, attention_dropout
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def make_vit(folder: Path, *, dropout: float) -> Path:
    """A 2-layer, 32-wide ViT on 32-pixel images with the given hidden and attention dropout."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def layer_objects(store_url: str, split: str, part: str, array: str) -> dict[str, bytes]:
    """Every stored object of one array of a part (its metadata and chunk/shard files), by relative path."""
    root = Path(store_url, split, part, array)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_views_equal(a: FeatureStore, b: FeatureStore) -> None:
    """Every view of every layer of every part, decoded, equal bit for bit (and the per-example columns)."""
    assert a.splits() == b.splits()
    for split in a.splits():
        assert a.views(split) == b.views(split)
        assert [p.name for p in a.parts(split)] == [p.name for p in b.parts(split)]
        for part in a.parts(split):
            for view in range(a.views(split)):
                x, y = a.read_part(part, view=view), b.read_part(part, view=view)
                assert list(x.example_id) == list(y.example_id) and np.array_equal(x.offsets, y.offsets)
                for layer in a.layers:
                    assert torch.equal(x.layers[layer], y.layers[layer]), (split, part.name, view, layer)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A tiny BERT with dropout 0.1, a 120-row CSV, and its K = 1 and K = 3 stores."""
    folder = tmp_path_factory.mktemp("views-text")
    bert = make_bert(folder / "bert", hidden_dropout=0.1, attention_dropout=0.1)
    source = SourceConfig(path=str(make_text_csv(folder / "texts.csv", n=120)))
    backbone = BackboneConfig(model=str(bert), device="cpu")
    plain, views = str(folder / "k1.zarr"), str(folder / "k3.zarr")
    run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH), plain, progress=False)
    summary = run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=3), views,
                             progress=False)
    return folder, source, backbone, plain, views, summary


def test_view0_is_the_k1_store_bit_for_bit_and_views_differ(text):
    folder, source, backbone, plain, views, summary = text
    a, b = FeatureStore.open(plain), FeatureStore.open(views)
    assert b.views("train") == 3 and b.views("validation") == b.views("test") == 1 and a.views("train") == 1
    # K = 1 writes the metadata it always has: no views record, no views in the provenance, same version
    assert "views" not in a.meta and "views" not in a.provenance["extraction"]
    assert b.meta["views"] == {"count": 3, "splits": ["train"]}
    assert a.meta["format_version"] == b.meta["format_version"] == 1
    recorded = b.provenance["extraction"]["views"]
    assert recorded["count"] == 3 and recorded["splits"] == ["train"] and recorded["augmentation"] is None
    for split in a.splits():
        for part in a.parts(split):
            for layer in a.layers:
                name = f"layer_{layer:03d}"
                # the stored objects of view 0 are byte-identical to the K = 1 store's
                assert layer_objects(plain, split, part.name, name) == layer_objects(views, split, part.name, name)
            extra = sorted(p.name for p in Path(views, split, part.name).iterdir() if "_view" in p.name)
            if split == "train":  # views 1 and 2 of every layer, beside view 0
                assert extra == sorted(f"layer_{l:03d}_view{v}" for l in a.layers for v in (1, 2))
                x0, x1, x2 = (b.read_part(part, view=v) for v in range(3))
                for layer in a.layers:  # (the embeddings too: BERT's embedding output goes through dropout)
                    assert not torch.equal(x0.layers[layer], x1.layers[layer])
                    assert not torch.equal(x1.layers[layer], x2.layers[layer])
                    assert x1.layers[layer].shape == x0.layers[layer].shape  # same offsets serve every view
                assert np.array_equal(x0.offsets, x1.offsets) and list(x0.example_id) == list(x2.example_id)
            else:  # evaluation splits: the eval-mode cache alone
                assert extra == [] and b.parts(split)[0].views == 1
    with pytest.raises(StoreError, match="holds 3 view"):
        b.read_part(b.parts("train")[0], view=3)
    with pytest.raises(StoreError, match="holds 1 view"):
        b.read_part(b.parts("validation")[0], view=1)
    # the summary counts forward passes per view and bytes per view
    n_train = b.num_examples("train")
    assert summary.view_examples["train"] == 3 * n_train and summary.view_examples["test"] == summary.examples["test"]
    assert sorted(summary.view_bytes) == [0, 1, 2] and min(summary.view_bytes.values()) > 0
    assert "stochastic views per example: train 3" in summary.describe()


def test_the_same_extraction_twice_gives_identical_views(text):
    folder, source, backbone, plain, views, _ = text
    again = str(folder / "k3-again.zarr")
    run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=3), again, progress=False)
    assert_views_equal(FeatureStore.open(again), FeatureStore.open(views))


def test_resume_after_an_interrupted_part_reproduces_the_views(text, monkeypatch):
    folder, source, backbone, plain, views, _ = text
    url = str(folder / "interrupted.zarr")
    append, calls = PartWriter.append, {"n": 0}

    def failing(self, rows, view=0):
        calls["n"] += 1
        if calls["n"] == 40:  # a few parts in, mid-part: some batches of some views written, no commit
            raise RuntimeError("killed")
        return append(self, rows, view)

    monkeypatch.setattr(PartWriter, "append", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=3), url,
                       progress=False)
    monkeypatch.setattr(PartWriter, "append", append)
    store = FeatureStore.open(url)
    committed = len(store.parts("train"))
    half = [f for f in store.part_folders("train") if f.state == "uncommitted"]
    assert committed >= 1 and half, "the interruption must leave committed parts and a half-written one"
    assert any(p.is_dir() for p in Path(url, "train", half[0].name).glob("layer_*_view*"))  # views were started
    summary = run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=3), url,
                             progress=False)
    assert summary.parts_skipped >= committed
    assert_views_equal(FeatureStore.open(url), FeatureStore.open(views))
    assert verify(FeatureStore.open(url)).ok


def test_a_part_commits_only_with_every_view(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s.zarr"), layers=[0], layer_widths=[4], dtype="float32",
                                label_names=["a"], provenance={}, views={"count": 2, "splits": ["train"]})
    writer = store.part_writer("train", 0, n_examples=2, n_tokens=3, source_start=0)
    writer.append({0: torch.ones(3, 4)}, view=0)
    with pytest.raises(ValueError, match="layer_000_view1: wrote 0 rows"):
        writer.finish(["x", "y"], [0, 0], [1, 2])
    assert store.parts("train") == []
    with pytest.raises(ValueError, match="holds 2 view"):
        writer.append({0: torch.ones(3, 4)}, view=2)


def test_verify_info_and_export_cover_the_views(text, tmp_path):
    folder, source, backbone, plain, views, _ = text
    import shutil

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(views, url)
    store = FeatureStore.open(url)
    info = describe(store)
    assert info["views"] == {"count": 3, "splits": ["train"]}
    assert info["splits"]["train"]["views"] == 3 and len(info["splits"]["train"]["bytes_per_view"]) == 3
    assert "views" not in info["splits"]["test"]
    # bytes per stored value counts every view's values: close to the K = 1 store's, not 3x it
    assert abs(info["bytes_per_value"] - describe(FeatureStore.open(plain))["bytes_per_value"]) < 0.5
    from unipt.pipelines.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["store", "info", url]) == 0
    assert "views      train: 3 per example" in out.getvalue()

    pytest.importorskip("webdataset")
    from unipt.store import export_webdataset

    export_webdataset(store, str(tmp_path / "wds"), splits=["train"], layers=[2])
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert manifest["view"] == 0 and manifest["store_views"] == {"train": 3}

    # a flipped byte in a view-1 chunk is named by verify
    chunk = next(p for p in sorted(Path(url, "train", "part-000000", "layer_002_view1").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(FeatureStore.open(url)).problems
    assert [(p.kind, p.where.split("/")[2]) for p in problems] == [("corrupt", "layer_002_view1")]


def test_attention_dropout_is_on_in_views(tmp_path):
    """transformers gates attention dropout on the attention module's training flag: with only attention
    dropout configured, views >= 1 must still differ from view 0 (switching only nn.Dropout modules would not)."""
    bert = make_bert(tmp_path / "bert", hidden_dropout=0.0, attention_dropout=0.5)
    source = SourceConfig(path=str(make_text_csv(tmp_path / "texts.csv", n=40)), splits={"train": 1.0})
    url = str(tmp_path / "s.zarr")
    run_extraction(source, BackboneConfig(model=str(bert), device="cpu"),
                   ExtractConfig(part_size=PART, batch_size=BATCH, views=2), url, progress=False)
    store = FeatureStore.open(url)
    part = store.parts("train")[0]
    x0, x1 = store.read_part(part, view=0), store.read_part(part, view=1)
    assert torch.equal(x0.layers[0], x1.layers[0])  # embeddings: no attention, and hidden dropout is 0
    assert not torch.equal(x0.layers[2], x1.layers[2])


def test_stochastic_forward_is_seeded_keeps_batchnorm_frozen_and_restores_state(tiny_bert_dir, tiny_resnet_dir):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(tiny_bert_dir).eval()
    assert bert.config.hidden_dropout_prob > 0  # conftest's tiny BERT has dropout to switch on
    ids = torch.randint(5, 30, (3, 9))
    outside = torch.random.get_rng_state()
    with torch.no_grad():
        runs = []
        for seed in (1, 1, 2):
            with stochastic_forward(bert, torch.device("cpu"), seed):
                runs.append(bert(input_ids=ids).last_hidden_state)
        eval_out = bert(input_ids=ids).last_hidden_state
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], eval_out)
    assert not bert.training and torch.equal(torch.random.get_rng_state(), outside)  # nothing else's stream moved

    resnet = AutoModel.from_pretrained(tiny_resnet_dir).eval()  # BatchNorm, no dropout
    stats = {k: v.clone() for k, v in resnet.state_dict().items() if "running" in k}
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with stochastic_forward(resnet, torch.device("cpu"), 7):
            stochastic = resnet(pixel_values=pixels).last_hidden_state
        plain = resnet(pixel_values=pixels).last_hidden_state
    assert torch.equal(stochastic, plain)  # BatchNorm used its running statistics, as in eval mode
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in stats.items())


def test_dropout_seed_follows_view_and_batch():
    ids = ["a", "b", "c"]
    assert dropout_seed(1, ids) == dropout_seed(1, list(ids))
    assert len({dropout_seed(1, ids), dropout_seed(2, ids), dropout_seed(1, ids[::-1]), dropout_seed(1, ids[:2])}) == 4


def test_augmentation_is_deterministic_per_id_and_view():
    from PIL import Image

    aug = Augmentation(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5)
    assert aug.params(40, 30, "img-1", 1) == aug.params(40, 30, "img-1", 1)
    draws = {aug.params(40, 30, f"img-{i}", v) for i in range(20) for v in (1, 2)}
    assert len(draws) > 30  # different ids and views, different crops
    assert aug.params(40, 30, "img-1", 1) != aug.params(40, 30, "img-1", 2)
    assert augment_seed("img-1", 1) != augment_seed("img-1", 2) != augment_seed("img-2", 1)
    flips = {flip for (_, flip) in (aug.params(40, 30, f"img-{i}", 1) for i in range(40))}
    assert flips == {True, False}
    for i in range(200):  # every crop lies inside the image; drawn ones keep the area fraction and ratio ranges
        (left, top, w, h), _ = aug.params(40, 30, f"x{i}", 1)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30 and w > 0 and h > 0
        assert 0.08 * 1200 * 0.8 <= w * h <= 1200 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    # the image transform is that crop, flipped when drawn so
    image = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3) % 251)
    (left, top, w, h), flip = aug.params(40, 30, "img-3", 1)
    expected = np.asarray(image)[top : top + h, left : left + w]
    assert np.array_equal(np.asarray(aug(image, "img-3", 1)), expected[:, ::-1] if flip else expected)
    with pytest.raises(ValueError, match="scale"):
        Augmentation(scale=(0.5, 1.5))


def test_image_views_augment_before_the_processor_and_view0_is_the_plain_store(tmp_path, image_folder):
    from transformers import ViTImageProcessor

    from unipt.extract import decode_image, load_image_source
    from unipt.extract._vision import VisionEncoder

    vit = make_vit(tmp_path / "vit", dropout=0.1)
    source = ImageSourceConfig(path=str(image_folder))
    backbone = BackboneConfig(model=str(vit), device="cpu")
    config = dict(part_size=8, batch_size=4, augment_scale=(0.3, 1.0))
    run_extraction(source, backbone, ExtractConfig(**config), str(tmp_path / "k1.zarr"), progress=False)
    run_extraction(source, backbone, ExtractConfig(**config, views=2), str(tmp_path / "k2.zarr"), progress=False)
    a, b = FeatureStore.open(str(tmp_path / "k1.zarr")), FeatureStore.open(str(tmp_path / "k2.zarr"))
    assert b.provenance["extraction"]["views"]["augmentation"]["random_resized_crop"]["scale"] == [0.3, 1.0]
    for part in a.parts("train"):
        for layer in a.layers:
            name = f"layer_{layer:03d}"
            assert layer_objects(str(tmp_path / "k1.zarr"), "train", part.name, name) == layer_objects(
                str(tmp_path / "k2.zarr"), "train", part.name, name)
        assert not torch.equal(b.read_part(part, view=1).layers[0], b.read_part(part, view=0).layers[0])

    # view 1's pixels are the processor's output for the augmented image
    examples = load_image_source(source).splits["train"][:3]
    encoder = VisionEncoder(backbone, augment={"scale": [0.3, 1.0], "ratio": [0.75, 4 / 3], "flip": 0.5})
    try:
        prepared = encoder.prepare(examples, views=3)
    finally:
        encoder.close()
    processor = ViTImageProcessor.from_pretrained(vit)
    aug = Augmentation(scale=(0.3, 1.0))
    for i, ex in enumerate(prepared.examples):
        for view in (1, 2):
            expected = processor([aug(decode_image(ex.image, ex.origin), ex.id, view)],
                                 return_tensors="pt")["pixel_values"][0]
            assert torch.equal(prepared.features_of(view)[i], expected)
        assert not torch.equal(prepared.features_of(1)[i], prepared.features_of(0)[i])


def test_image_views_without_randomness_equal_view0(tmp_path, image_folder, tiny_vit_dir):
    """No dropout (conftest's ViT has none) and an augmentation that keeps the whole square image unflipped:
    views >= 1 then equal view 0, so what makes views differ is the dropout and the augmentation, nothing else."""
    source = ImageSourceConfig(path=str(image_folder))
    url = str(tmp_path / "s.zarr")
    run_extraction(source, BackboneConfig(model=str(tiny_vit_dir), device="cpu"),
                   ExtractConfig(part_size=8, batch_size=4, views=2, augment_scale=(1.0, 1.0),
                                 augment_ratio=(1.0, 1.0), augment_flip=0.0), url, progress=False)
    store = FeatureStore.open(url)
    for part in store.parts("train"):
        x0, x1 = store.read_part(part, view=0), store.read_part(part, view=1)
        assert all(torch.equal(x0.layers[l], x1.layers[l]) for l in store.layers)


def test_views_config_is_checked(text):
    folder, source, backbone, plain, views, _ = text
    with pytest.raises(ValueError, match="extract.views must be >= 1"):
        ExtractConfig(views=0)
    with pytest.raises(ValueError, match="augment_scale"):
        ExtractConfig(augment_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="augment_flip"):
        ExtractConfig(augment_flip=2.0)
    with pytest.raises(ValueError, match=r"views_splits names \['dev'\]"):
        run_extraction(source, backbone, ExtractConfig(views=2, views_splits=["dev"]), str(folder / "bad.zarr"),
                       progress=False)
    # a store extracted without views is not resumed with them (nor the other way round)
    with pytest.raises(Exception, match="views"):
        run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=2), plain,
                       progress=False)


def test_two_dask_workers_store_the_same_views(text):
    pytest.importorskip("dask.distributed")
    folder, source, backbone, plain, views, _ = text
    url = str(folder / "dask.zarr")
    summary = run_extraction(source, backbone, ExtractConfig(part_size=PART, batch_size=BATCH, views=3, workers=2),
                             url, progress=False)
    assert summary.view_examples["train"] == 3 * summary.examples["train"]
    assert_views_equal(FeatureStore.open(url), FeatureStore.open(views))
