"""SHERL: its aggregation against a loop reference and the official Guidance code, the frozen last block against
the backbone's own (BERT, MPNet, DINOv2), padding, gradients, hash checks, checkpoints, trainer, recipe, sweeps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import (STORE_RECIPE_HEADER, assert_checkpoint_rebuilds, make_text_csv, make_tiny_bert, make_tiny_vit,
                     pad_with_garbage, random_hidden, randomise_params)
from unipt.extract import BackboneConfig, ExtractConfig, SourceConfig, backbone_hashes, run_extraction
from unipt.pipelines import load_recipe, train_stage
from unipt.store import FeatureStore
from unipt.train import (SHERL, LoaderConfig, SHERLClassifier, SHERLConfig, TrainConfig, build_model,
                         evaluate_checkpoint, fit, fit_many, get_method, load_checkpoint)
from unipt.train.sherl import FrozenLastBlock, bind_store, weights_sha256

LOADER = LoaderConfig(mode="memory", background="off")
LAYERS = 4  # tiny BERT blocks: the store holds H_0 ... H_4, SHERL reads H_0 ... H_3


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert4") / "bert", layers=LAYERS)


@pytest.fixture(scope="module")
def store(bert_dir, tmp_path_factory) -> FeatureStore:
    root = tmp_path_factory.mktemp("sherl-store")
    csv = make_text_csv(root / "texts.csv")
    url = str(root / "store.zarr")
    run_extraction(SourceConfig(path=str(csv)), BackboneConfig(model=str(bert_dir), device="cpu"),
                   ExtractConfig(dtype="float32", part_size=16, batch_size=6), url, progress=False)
    return FeatureStore.open(url)


@pytest.fixture(scope="module")
def block(bert_dir) -> FrozenLastBlock:
    return FrozenLastBlock(bert_dir)


def make_classifier(store, seed=0, labels=3, **options) -> SHERLClassifier:
    config = bind_store(SHERLConfig(**options), store)
    torch.manual_seed(seed)
    model = SHERLClassifier(config, [store.layer_widths[l] for l in config.layers], labels).eval()
    randomise_params(model, seed, scale=0.3)  # theta off 0 too: the skip gate is open
    return model


# --------------------------------------------------------------------------- aggregation
def reference_u(side: SHERL, hidden_states) -> torch.Tensor:
    """DESIGN.md's / the official code's u, one token at a time, with explicit cosines, relu and l1n."""
    def linear(x, lin):
        return x @ lin.weight.T + lin.bias

    def layer_norm(x, ln):
        mu = x.mean()
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean() + ln.eps) * ln.weight + ln.bias

    eps = 1e-8
    b_size, n_size = hidden_states[0].shape[:2]
    u = torch.zeros(b_size, n_size, side.out_dim)
    gate = math.tanh(side.theta.item() / side.gate_temperature)
    for b in range(b_size):
        for n in range(n_size):
            s = [layer_norm(linear(h[b, n], down[0]), down[1]) for h, down in zip(hidden_states, side.down)]
            d, shallow = s[-1], s[:-1]

            def cos(x, y):
                return (x @ y).item() / ((x.norm().item() + eps) * (y.norm().item() + eps))

            rho = [sum(max(0.0, cos(si, sj)) for sj in shallow) for si in shallow]
            c = [max(0.0, (linear(si * d, side.attn)).item()) / r for si, r in zip(shallow, rho)]
            total = sum(abs(x) for x in c) + eps
            g = d + sum(ci / total * si for ci, si in zip(c, shallow))
            u[b, n] = layer_norm(linear(torch.relu(g), side.up), side.up_norm) + gate * hidden_states[-1][b, n]
    return u


def official_guidance(attn: torch.nn.Linear, guide, all_features):
    """The official ``Guidance.forward`` (VSE-infty/lib/adapter_for_transformer.py), with its l1norm/l2norm."""
    def l1norm(x, dim, eps=1e-8):
        return x / (torch.abs(x).sum(dim=dim, keepdim=True) + eps)

    def l2norm(x, dim, eps=1e-8):
        return x / (torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps)

    norm = l2norm(all_features, dim=-1)
    redundancy = torch.sum(torch.relu(norm @ norm.permute(0, 2, 1)), dim=-1, keepdim=True)
    cross = l1norm(torch.relu(attn(all_features * guide)) / redundancy, dim=1)
    return torch.sum(cross * all_features, dim=1, keepdim=True) + guide


def test_block_input_matches_loop_reference_and_official_guidance(block):
    widths = (12, 20, 7, 32)  # shallow layers of any width; H_{L-1} has the backbone's (32)
    torch.manual_seed(0)
    side = SHERL(widths, block, reduction=2).eval()
    randomise_params(side, 1, scale=0.5)
    hs, _ = random_hidden([5, 2, 4], widths, seed=1)
    u = side.block_input(hs)
    assert u.shape == (3, 5, 32) and side.side_dim == 16 and abs(side.gate().item()) > 0.1
    torch.testing.assert_close(u, reference_u(side, hs), atol=1e-5, rtol=1e-5)
    # the official module's aggregation on the same s_i (its fc_out = ReLU -> Linear -> LN -> Dropout)
    s = [down(h) for down, h in zip(side.down, hs)]
    shallow = torch.stack(s[:-1], dim=2).reshape(15, 3, 16)
    g = official_guidance(side.attn, s[-1].reshape(15, 1, 16), shallow).reshape(3, 5, 16)
    official_u = side.up_norm(side.up(torch.relu(g))) + torch.tanh(side.theta / 0.1) * hs[-1]
    torch.testing.assert_close(u, official_u, atol=1e-6, rtol=1e-6)


def test_skip_gate_starts_closed(block):
    config = SHERLConfig()
    assert config.reduction == 2 and config.gate_temperature == 0.1 and config.layers == "all"
    side = SHERL([32, 32, 32], block).eval()
    assert side.theta.item() == 0 and side.gate().item() == 0  # tanh(0 / T): u starts without H_{L-1}
    hs, _ = random_hidden([3], [32, 32, 32], seed=2)
    torch.testing.assert_close(side.block_input(hs), reference_u(side, hs), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        side.theta.fill_(0.05)
    assert side.gate().item() == pytest.approx(math.tanh(0.5))


# --------------------------------------------------------------------------- the frozen last block
def test_weights_hash_is_extractions(bert_dir, store):
    assert weights_sha256(bert_dir) == backbone_hashes(bert_dir)["weights_sha256"]
    assert weights_sha256(bert_dir) == store.provenance["backbone"]["weights_sha256"]


def test_frozen_block_is_the_backbones_last_layer(bert_dir, store):
    from transformers import AutoModel, AutoTokenizer

    model = make_classifier(store, seed=2)
    side = model.side
    with torch.no_grad():  # u = 0 + tanh(100) * H_{L-1} = H_{L-1} exactly
        side.theta.fill_(10.0)
        side.up_norm.weight.zero_()
        side.up_norm.bias.zero_()
    backbone = AutoModel.from_pretrained(bert_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    batch = tokenizer(["good movie", "a really very long boring film plot", "fun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        y = side([hidden[l] for l in range(LAYERS)], mask)
    assert mask.sum() < mask.numel()  # padded: the block must mask the padded keys
    torch.testing.assert_close(y[mask], hidden[LAYERS][mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden[LAYERS - 1][mask], hidden[LAYERS][mask], atol=1e-2)  # the block did something


def test_frozen_block_of_mpnet_and_dinov2(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    MPNetModel(MPNetConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)).eval().save_pretrained(tmp_path / "mpnet")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
                             mlp_ratio=2, layerscale_value=0.5)).eval().save_pretrained(tmp_path / "dino")
    mpnet = MPNetModel.from_pretrained(tmp_path / "mpnet").eval()
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        hidden = mpnet(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        block = FrozenLastBlock(tmp_path / "mpnet")
        assert any("relative_attention_bias" in n for n, _ in block.named_parameters())  # the encoder's bias came too
        torch.testing.assert_close(block(hidden[2], mask)[mask.bool()], hidden[3][mask.bool()], atol=1e-5, rtol=1e-5)
    dino = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        out = dino(pixel_values=torch.randn(2, 3, 32, 32), output_hidden_states=True)
        full = torch.ones(out.hidden_states[0].shape[:2])
        # with its final LayerNorm: the model's last_hidden_state (the tap after the last block); without: H_L
        torch.testing.assert_close(FrozenLastBlock(tmp_path / "dino")(out.hidden_states[2], full),
                                   out.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(FrozenLastBlock(tmp_path / "dino", final_norm=False)(out.hidden_states[2], full),
                                   out.hidden_states[3], atol=1e-5, rtol=1e-5)
    # a DINOv2 store holding H_0 ... H_3 and the final-norm tap (4): SHERL reads H_0 ... H_2
    fake = SimpleNamespace(url="dino.zarr", layers=[0, 1, 2, 3, 4], provenance={"backbone": {
        "location": str(tmp_path / "dino"), "weights_sha256": weights_sha256(tmp_path / "dino")}})
    assert bind_store(SHERLConfig(), fake).layers == [0, 1, 2]


def test_refuses_unsupported_architectures_and_pickles(tmp_path, bert_dir):
    vit = make_tiny_vit(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"cannot run the last block of a 'vit' backbone .*\['bert', 'dinov2', 'mpnet'\]"):
        FrozenLastBlock(vit)
    fake = SimpleNamespace(url="vit.zarr", layers=[0, 1, 2], provenance={"backbone": {
        "location": str(vit), "weights_sha256": weights_sha256(vit)}})
    with pytest.raises(ValueError, match="'vit'"):
        bind_store(SHERLConfig(), fake)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(bert_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors \(only pytorch_model.bin\).*never from a pickle"):
        FrozenLastBlock(pickled)


# --------------------------------------------------------------------------- padding and gradients
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_padding_invariance(store, grad):
    model = make_classifier(store, seed=3).double()
    assert next(iter(model.side.block.parameters())).dtype == torch.float64  # cast with the model
    hs, mask = random_hidden([4, 1, 3], [32] * LAYERS, seed=3, dtype=torch.float64)
    hs2, mask2 = pad_with_garbage(hs, mask, extra=5, seed=4)
    with torch.set_grad_enabled(grad):
        logits = model(hs, mask)
        torch.testing.assert_close(model(hs2, mask2), logits, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model.side(hs2, mask2)[:, :4][mask], model.side(hs, mask)[mask], atol=1e-10,
                                   rtol=1e-10)
        for i, n in enumerate([4, 1, 3]):  # each example alone, unpadded
            alone = model([h[i : i + 1, :n] for h in hs], mask[i : i + 1, :n])
            torch.testing.assert_close(alone, logits[i : i + 1], atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_side_parameter_through_the_frozen_block(store):
    model = make_classifier(store, seed=4).train()
    block = model.side.block
    hs, mask = random_hidden([5, 2, 4, 1], [32] * LAYERS, seed=5)
    hs = [h.requires_grad_() for h in hs]
    F.cross_entropy(model(hs, mask), torch.tensor([0, 2, 1, 1])).backward()
    assert not block.training  # eval mode in training (block_dropout off)
    names = [name for name, _ in model.named_parameters()]
    assert "side.theta" in names and not any("encoder" in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    frozen = list(block.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    for h in hs:  # padded hidden states cannot matter, through the block's attention neither
        assert h.grad is not None and torch.all(h.grad[~mask] == 0)


def test_block_dropout_follows_training_only_when_asked(store):
    hs, mask = random_hidden([4, 3], [32] * LAYERS, seed=6)
    quiet = make_classifier(store, seed=5, dropout=0.0).train()
    torch.testing.assert_close(quiet(hs, mask), quiet(hs, mask), atol=0, rtol=0)  # no dropout anywhere
    noisy = make_classifier(store, seed=5, dropout=0.0, block_dropout=True).train()
    assert not torch.equal(noisy(hs, mask), noisy(hs, mask)) and noisy.side.block.training
    noisy.eval()
    torch.testing.assert_close(noisy(hs, mask), quiet.eval()(hs, mask), atol=0, rtol=0)
    assert not noisy.side.block.training


# --------------------------------------------------------------------------- config, binding, hashes
def test_config_validation():
    for bad, match in [({"reduction": 0}, "reduction must be an integer >= 1, got 0"),
                       ({"layers": "last"}, "'all' or a list"),
                       ({"layers": [3]}, "at least 2 layers"),
                       ({"backbone": ""}, "backbone must be a local model folder"),
                       ({"weights_sha256": "abc"}, "64 lowercase hex"),
                       ({"gate_temperature": 0.0}, "gate_temperature must be positive"),
                       ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                       ({"block_dropout": "yes"}, "block_dropout must be true or false")]:
        with pytest.raises(ValueError, match=match):
            SHERLConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown sherl model option\(s\) \['r'\]; valid: .*'reduction'"):
        get_method("sherl").make_config({"r": 2})


def test_binding_resolves_folder_hash_and_layers(store, bert_dir):
    bound = bind_store(SHERLConfig(), store)  # the store records the folder it was extracted from
    assert bound.layers == [0, 1, 2, 3] and store.layers == [0, 1, 2, 3, 4]  # H_4 (the block's output) left out
    assert bound.backbone == str(bert_dir.resolve()) and bound.weights_sha256 == weights_sha256(bert_dir)
    assert bind_store(SHERLConfig(layers=[1, -2]), store).layers == [1, 3]
    with pytest.raises(ValueError, match=r"last selected layer must be H_\{L-1\} = layer 3, .*got layers \[0, 4\]"):
        bind_store(SHERLConfig(layers=[0, 4]), store)
    lost = SimpleNamespace(url="moved.zarr", layers=store.layers, provenance={"backbone": {
        "location": "pkg://not_here/model", "weights_sha256": store.provenance["backbone"]["weights_sha256"]}})
    with pytest.raises(FileNotFoundError, match="'pkg://not_here/model', which is not a local folder here; set model.backbone"):
        bind_store(SHERLConfig(), lost)
    assert bind_store(SHERLConfig(backbone=str(bert_dir)), lost).layers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="SHERL runs the backbone's last block and needs its folder"):
        SHERLClassifier(SHERLConfig(), [32] * 4, 3)  # unbound: no folder, no hash


def test_refuses_a_backbone_folder_with_other_weights(store, bert_dir, tmp_path):
    other = make_tiny_bert(tmp_path / "other", layers=LAYERS, seed=1)
    mine, theirs = weights_sha256(bert_dir), weights_sha256(other)
    assert mine != theirs
    config = TrainConfig(method="sherl", model={"backbone": str(other)}, device="cpu")
    with pytest.raises(ValueError, match=rf"{theirs}.*{mine}.*set model.backbone to the folder the store was extracted"):
        build_model(config, store)
    pinned = SHERLConfig(backbone=str(other), weights_sha256=mine, layers=[0, 3])
    with pytest.raises(ValueError, match=rf"has weights sha256 {theirs}, but this SHERL model was made for {mine}"):
        SHERLClassifier(pinned, [32, 32], 3)


# --------------------------------------------------------------------------- trainer, checkpoints, recipe, sweeps
def sherl_config(**overrides) -> TrainConfig:
    values = dict(method="sherl", model={"reduction": 2}, lr=3e-3, epochs=4, batch_size=8, warmup=0.0,
                  device="cpu", seed=0)
    return TrainConfig(**{**values, **overrides})


def test_fit_learns_and_checkpoint_holds_no_backbone_weights(store, bert_dir, tmp_path):
    config = sherl_config()
    result = fit("sherl", store, config, tmp_path, loader_config=LOADER, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05
    saved = load_file(f"{result.checkpoint}/model.safetensors")
    loaded, meta = load_checkpoint(result.checkpoint)
    assert set(saved) == set(loaded.state_dict()) and not any("encoder" in k or "block" in k for k in saved)
    assert meta["model"]["weights_sha256"] == store.provenance["backbone"]["weights_sha256"]
    assert meta["model"]["backbone"] == str(bert_dir.resolve()) and meta["layers"] == [0, 1, 2, 3]
    assert_checkpoint_rebuilds(config, store, result.checkpoint, result.test_metrics, LOADER)
    assert evaluate_checkpoint(result.checkpoint, store, "test", batch_size=8, loader_config=LOADER,
                               device="cpu") == result.test_metrics
    # the backbone moved to another place: the same weights load from there; other weights are refused
    moved = tmp_path / "moved-backbone"
    shutil.copytree(bert_dir, moved)
    elsewhere, _ = load_checkpoint(result.checkpoint, model_options={"backbone": str(moved)})
    hs, mask = random_hidden([3, 5], [32] * LAYERS, seed=7)
    torch.testing.assert_close(elsewhere.eval()(hs, mask), loaded.eval()(hs, mask), atol=0, rtol=0)
    other = make_tiny_bert(tmp_path / "other", layers=LAYERS, seed=1)
    with pytest.raises(ValueError, match=rf"{weights_sha256(other)}.*{meta['model']['weights_sha256']}"):
        load_checkpoint(result.checkpoint, model_options={"backbone": str(other)})


RECIPE_TRAIN = """
[train.sherl]
method = "sherl"
lr = 3e-3
epochs = 3
batch_size = 8
warmup = 0.0
device = "cpu"
model = { reduction = 4 }
"""


def test_a_recipe_trains_sherl_with_its_backbone_folder(store, bert_dir, tmp_path):
    work = tmp_path / "work"
    text = STORE_RECIPE_HEADER.format(name="tiny-sherl", store=store.url, workdir=work) + RECIPE_TRAIN
    text = text.replace(f'model = "{work}/no-backbone-needed"', f'model = "{bert_dir}"')  # the recipe's backbone
    path = tmp_path / "tiny-sherl.toml"
    path.write_text(text)
    recipe = load_recipe(str(path))
    (result,) = train_stage(recipe, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert result.method == "sherl" and len(losses) == 3 and losses[-1] < losses[0]
    checkpoint = work / "checkpoints" / "sherl"
    meta = json.loads((checkpoint / "config.json").read_text())
    assert meta["model"]["backbone"] == str(bert_dir.resolve()) and meta["model"]["reduction"] == 4
    assert meta["train"]["model"]["backbone"] == str(bert_dir.resolve())  # filled in from the recipe's [backbone]
    assert_checkpoint_rebuilds(recipe.train["sherl"], store, str(checkpoint), result.test_metrics, LOADER)


def test_a_stacked_sweep_trains_each_run_alone(store, tmp_path):
    runs = {"a": sherl_config(epochs=2, stack="on"), "b": sherl_config(epochs=2, stack="on", lr=1e-3)}
    results = fit_many(runs, store, tmp_path / "sweep", loader_config=LOADER, progress=False)
    assert [r.name for r in results] == ["a", "b"] and not any(r.stacked for r in results)
    assert all(r.runs_in_pass == 2 and r.test_metrics["n"] == store.num_examples("test") for r in results)
    (alone,) = fit_many({"a": runs["a"]}, store, tmp_path / "alone", loader_config=LOADER, progress=False)
    assert [h["train_loss"] for h in results[0].history] == [h["train_loss"] for h in alone.history]
    assert results[0].history[0]["train_loss"] != results[1].history[0]["train_loss"]
