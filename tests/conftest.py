"""Shared fixtures: a tiny random BERT saved as a local transformers folder, and a small labelled CSV.

Nothing here touches the network: the model is built from a config, the tokenizer from a vocab written
on the spot.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

from unipt.store import IGNORE_INDEX, FeatureStore

WORDS = ("good bad great awful fine movie film plot actor scene love hate boring fun slow fast music "
         "story ending happy sad dark light long short best worst really very quite not").split()
LABELS = ("negative", "neutral", "positive")


SUBWORDS = ("play", "##ing", "##s", "##ed", "walk")  # "playing" = play ##ing: words of several sub-word tokens


def make_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0, subwords: bool = False) -> Path:
    """Save a random-initialised 2-layer, 32-wide BERT + WordPiece tokenizer into ``folder`` (``subwords``: its
    vocabulary also splits words such as "playing" and "walks" into several tokens)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(SUBWORDS if subwords else ())]
    # The vocabulary as a dict: transformers 5 builds a tokenizer from `vocab`, and silently ignores a
    # `vocab_file` (every word then reads as [UNK]).
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")  # as BERT folders ship it (hashed with the tokenizer)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def make_text_csv(path: Path, n: int = 120, *, seed: int = 0) -> Path:
    """A CSV of ``n`` distinct short texts (1 .. 12 words) whose label follows the words they contain."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        score = sum(w in ("good", "great", "love", "best", "fun", "happy") for w in words) - sum(
            w in ("bad", "awful", "hate", "worst", "boring", "sad") for w in words)
        rows.append({"text": text, "label": LABELS[0 if score < 0 else 2 if score > 0 else 1]})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_tiny_vit(folder: Path, *, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Save a random-initialised 2-layer, 32-wide ViT + its image processor (resize to ``image_size``)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def make_tiny_resnet(folder: Path, *, image_size: int = 64, seed: int = 0) -> Path:
    """Save a random-initialised 4-stage ResNet (8..64 channels; stage grids 16/8/4/2 at 64 px) + processor."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
    model = ResNetModel(config).eval()
    with torch.no_grad():  # random BatchNorm statistics, so eval-mode maps are not just the conv outputs
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0).save_pretrained(folder)
    return folder


def make_image_folder(root: Path, n_per_class: int = 12, *, classes=("circle", "stripes", "dots"),
                      size: int = 28, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: small greyscale images whose pattern follows the class, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = {
        "circle": ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2),
        "stripes": (xx // 4) % 2 == 0,
        "dots": ((yy // 3) % 3 == 0) & ((xx // 3) % 3 == 0),
    }
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image = patterns[label] * 200 + rng.integers(0, 55, (size, size))
            Image.fromarray(image.astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory) -> Path:
    return make_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def text_csv(tmp_path) -> Path:
    return make_text_csv(tmp_path / "texts.csv")


@pytest.fixture(scope="session")
def backbone(tiny_bert_dir):
    """The tiny BERT as a backbone config (CPU)."""
    from unipt.extract import BackboneConfig

    return BackboneConfig(model=str(tiny_bert_dir), device="cpu")


@pytest.fixture(scope="session")
def encoder(backbone):
    """The tiny BERT loaded once for the whole session."""
    from unipt.extract import TextEncoder

    return TextEncoder(backbone)


def assert_same_parts(got, want) -> None:
    """Two feature stores hold the same parts: names, and per part the ids, lengths, targets, offsets and every
    layer, bit for bit."""
    import numpy as np

    assert got.splits() == want.splits()
    for split in want.splits():
        assert [p.name for p in got.parts(split)] == [p.name for p in want.parts(split)]
        for info in want.parts(split):
            a, b = want.read_part(info), got.read_part(info)
            assert np.array_equal(a.example_id, b.example_id) and np.array_equal(a.length, b.length)
            assert np.array_equal(a.label, b.label) and np.array_equal(a.offsets, b.offsets)
            assert all(torch.equal(a.layers[layer], b.layers[layer]) for layer in want.layers)


def ragged_mask(lengths, n=None) -> torch.Tensor:
    """(B, N) bool mask of examples with these lengths, padded to ``n`` (default: the longest)."""
    n = n or max(lengths)
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def random_hidden(lengths, widths, n=None, seed=0, dtype=torch.float32):
    """Random hidden states (one (B, N, D_l) tensor per width, scale 2) and their mask."""
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(lengths, n)
    hs = [torch.randn(len(lengths), mask.shape[1], d, generator=g, dtype=dtype) * 2 for d in widths]
    return hs, mask


def randomise_params(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Move every parameter off its default init (unit gates and weights, LayerNorm 1 / 0 hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def write_tiny_store(url: str, widths=(16, 16, 16), sizes=(("train", 60), ("validation", 15), ("test", 15)),
                     seed: int = 0) -> FeatureStore:
    """A 3-class store written in code: every token carries its class's direction plus noise (learnable)."""
    layers = list(range(len(widths)))
    store = FeatureStore.create(url, layers=layers, layer_widths=list(widths), dtype="float32",
                                label_names=["a", "b", "c"],
                                provenance={"backbone": {"weights_sha256": "tiny", "tokenizer_sha256": "tiny"}})
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(3, w, generator=g) for w in widths]
    start = 0
    for split, n in sizes:
        labels = [k % 3 for k in range(n)]
        lengths = [1 + (5 * k) % 9 for k in range(n)]
        writer = store.part_writer(split, 0, n_examples=n, n_tokens=sum(lengths), source_start=start)
        for label, length in zip(labels, lengths):
            writer.append({l: torch.randn(length, w, generator=g) + 1.5 * directions[l][label]
                           for l, w in zip(layers, widths)})
        writer.finish([f"{split}-{k:03d}" for k in range(n)], labels, lengths)
        start += n
    return FeatureStore.open(url)


STORE_RECIPE_HEADER = """
name = "{name}"
store = "{store}"
workdir = "{workdir}"

[source]
path = "unused.csv"

[backbone]
model = "{workdir}/no-backbone-needed"

[loader]
mode = "memory"
background = "off"
"""


def write_store_recipe(path: Path, store_url: str, workdir: Path, train: str) -> Path:
    """A recipe file at ``path`` that trains the ``[train.*]`` sections in ``train`` from an existing store;
    its source and backbone are never read (training needs only the store)."""
    path.write_text(STORE_RECIPE_HEADER.format(name=path.stem, store=store_url, workdir=workdir) + train)
    return path


def assert_checkpoint_rebuilds(config, store: FeatureStore, checkpoint: str, test_metrics: dict, loader_config):
    """The checkpoint, reloaded, equals the model built from ``config`` holding the saved weights (logits
    on the test split, bit for bit) and scores the test split as training reported."""
    from safetensors.torch import load_file

    from unipt.train import ActivationLoader, build_model, evaluate, load_checkpoint

    loaded, _ = load_checkpoint(checkpoint)
    rebuilt, _, layers = build_model(config, store)
    rebuilt.load_state_dict(load_file(f"{checkpoint}/model.safetensors"))
    # batched as the trainer's test pass (the same sums, in the same order)
    loader = ActivationLoader(store, "test", layers, batch_size=config.batch_size, shuffle=False, length_sorted=True,
                              config=loader_config)
    batch = next(iter(loader))
    torch.testing.assert_close(loaded.eval()(batch.hidden_states, batch.mask),
                               rebuilt.eval()(batch.hidden_states, batch.mask), atol=0, rtol=0)
    assert evaluate(loaded, loader, torch.device("cpu"), len(store.label_names)) == test_metrics


def write_fake_openmoji(cache: Path, csv_text: str, svgs: dict[str, bytes]) -> Path:
    """npm openmoji's layout under ``cache`` (a $UNIPT_CACHE): data/openmoji.csv and color/svg/<hexcode>.svg."""
    package = cache / "npm" / "node_modules" / "openmoji"
    (package / "data").mkdir(parents=True)
    (package / "data" / "openmoji.csv").write_text(csv_text, encoding="utf-8")
    (package / "color" / "svg").mkdir(parents=True)
    for hexcode, svg in svgs.items():
        (package / "color" / "svg" / f"{hexcode}.svg").write_bytes(svg)
    return package


# --------------------------------------------------------------------------- shared by the method tests
def reference_linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return x @ lin.weight.T + lin.bias


def reference_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def pad_with_garbage(hs, mask, extra: int, seed: int = 0):
    """``extra`` padded positions added to every example, and large random values in every padded row (new and
    old), so a model whose real-token outputs move has read padding."""
    g = torch.Generator().manual_seed(seed)
    b, n = mask.shape
    hs2 = [torch.cat([h, torch.randn(b, extra, h.shape[-1], generator=g, dtype=h.dtype) * 50], dim=1) for h in hs]
    for h, h2 in zip(hs, hs2):  # garbage also in the already-padded positions
        h2[:, :n][~mask] = torch.randn(int((~mask).sum()), h.shape[-1], generator=g, dtype=h.dtype) * 50
    mask2 = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    return hs2, mask2


def write_tagging_store(url: str, widths=(16, 16, 16)) -> FeatureStore:
    """A per-token task: each token's tag is the direction it carries (the first token is not scored)."""
    tags = ["x", "y", "z"]
    store = FeatureStore.create(url, layers=list(range(len(widths))), layer_widths=list(widths), dtype="float32",
                                label_names=tags, task="tagging",
                                provenance={"backbone": {"weights_sha256": "tiny", "tokenizer_sha256": "tiny"}})
    g = torch.Generator().manual_seed(0)
    directions = [torch.randn(3, w, generator=g) for w in widths]
    start = 0
    for split, n in (("train", 40), ("validation", 12), ("test", 12)):
        lengths = [2 + (5 * k) % 7 for k in range(n)]
        writer = store.part_writer(split, 0, n_examples=n, n_tokens=sum(lengths), source_start=start)
        targets = []
        for length in lengths:
            token_tags = torch.randint(0, 3, (length,), generator=g)
            writer.append({l: torch.randn(length, w, generator=g) + 1.5 * directions[l][token_tags]
                           for l, w in enumerate(widths)})
            targets += [IGNORE_INDEX, *token_tags[1:].tolist()]
        writer.finish([f"{split}-{k:03d}" for k in range(n)], targets, lengths)
        start += n
    return FeatureStore.open(url)
