"""The frozen text encoder: loaded once, eval mode, no gradients, every hidden state out."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from unipt.store import files_sha256, weight_files

from ._resolve import CONVERT_SCHEME, ensure_converted, resolve_path
from ._sources import Skipped
from ._targets import align_tags
from .config import BackboneConfig

# Everything that turns a raw input into the model's input: a text model's tokenizer files, an image
# model's processor config (recorded together as "tokenizer_sha256").
_TOKENIZER_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "merges.txt", "vocab.json",
                    "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def resolve_model_dir(spec: str, revision: str | None = None) -> Path:
    """A local folder for ``spec``: itself, a pkg:// folder, a convert:// folder (converted on first use), or
    the local snapshot of a hub id."""
    if spec.startswith(CONVERT_SCHEME):
        return ensure_converted(spec)
    path = Path(resolve_path(spec))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, revision=revision))
    except Exception as exc:
        raise FileNotFoundError(
            f"backbone {spec!r} is neither a local folder nor a hub model this machine can fetch or has cached "
            f"({type(exc).__name__}); pass a local transformers folder (one with config.json)"
        ) from exc


def backbone_hashes(folder: Path) -> dict[str, str]:
    """sha256 of a model folder's weight files (+ config.json) and of its tokenizer files."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    tokenizer = [n for n in files if n in _TOKENIZER_FILES]
    return {"weights_sha256": files_sha256(folder, weight_files(folder)),
            "tokenizer_sha256": files_sha256(folder, tokenizer)}


@dataclass
class PreparedPart:
    """A part's examples made ready for the forward pass (text tokenised, images decoded and processed)."""

    examples: list  # the examples that made it, in source order
    features: list  # per example: token ids (text) or a (3, H, W) pixel tensor (images)
    lengths: np.ndarray  # (n,) tokens per example (maps: 1, one row per example)
    truncated: list[int] = field(default_factory=list)  # positions of examples cut to max_length (text)
    skipped: list[Skipped] = field(default_factory=list)  # examples found bad while preparing (broken images)
    seconds: float = 0.0
    token_targets: list[list[int]] | None = None  # tagging: per example, one target per token (align_tags)
    view_features: list[list] = field(default_factory=list)  # views 1 .. K-1 where their inputs differ from
    #                                                          view 0's (augmented images); [] = text: every
    #                                                          view reads `features` (dropout alone differs)

    def features_of(self, view: int) -> list:
        """The inputs of ``view`` (0 = eval mode, unaugmented), one per example."""
        return self.features if view == 0 or not self.view_features else self.view_features[view - 1]


def pick_device(device: str) -> torch.device:
    """BackboneConfig.device -> a torch device ("auto" = cuda when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Layers whose train mode would update (and use) running statistics: they stay in eval mode in a stochastic
# view, which must not change the backbone (a BatchNorm in train mode normalises with the batch's statistics
# and overwrites its running ones).
_RUNNING_STATS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)


@contextmanager
def stochastic_forward(model: torch.nn.Module, device: torch.device, seed: int | None) -> Iterator[None]:
    """The backbone as in training for one forward pass, its random draws seeded with ``seed``; None = as it
    is (eval mode, deterministic).

    Train mode goes on for every module but normalisation layers with running statistics: transformers gates
    attention dropout on the *attention* module's ``training`` flag (``dropout=0.0 if not self.training``), not
    on an ``nn.Dropout``'s, so switching only the Dropout modules would leave attention dropout off (ViT has no
    attention Dropout module at all). Stochastic depth (DINOv2's drop path) comes on with it, as in training.
    sdpa attention (the default) applies its dropout inside the fused kernel, drawing from torch's default
    generator of the device: seeded here like every ``nn.Dropout``, it gives the same masks for the same seed
    (tested on CPU; the CUDA kernels draw from the CUDA generator's seed and offset, seeded the same way).
    ``fork_rng`` restores the random state afterwards, so nothing else's stream changes.
    """
    if seed is None:
        yield
        return
    frozen = [m for m in model.modules() if isinstance(m, _RUNNING_STATS)]
    cuda = [device] if device.type == "cuda" else []
    model.train()
    for module in frozen:
        module.eval()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        model.eval()


def autocast_context(device: torch.device, autocast: str):
    """The forward pass's precision: float32 on CPU or with autocast "off", else float16/bfloat16 autocast."""
    if device.type != "cuda" or autocast == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if autocast == "bfloat16" else torch.float16)


@dataclass
class TextInputs:
    """What the tokenizer is given for a batch of examples: texts, texts with pairs, or lists of words."""

    texts: list[str]
    pairs: list[str] | None = None
    words: list[tuple[str, ...]] | None = None

    @classmethod
    def of(cls, examples: Sequence[Any]) -> "TextInputs":
        """From examples with ``.text`` and, where a source has them, ``.pair`` / ``.words``."""
        texts = [ex.text for ex in examples]
        if examples and getattr(examples[0], "words", None) is not None:
            return cls(texts, words=[ex.words for ex in examples])
        if examples and getattr(examples[0], "pair", None) is not None:
            return cls(texts, pairs=[ex.pair for ex in examples])
        return cls(texts)

    def subset(self, rows: Sequence[int]) -> "TextInputs":
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return TextInputs(pick(self.texts), pick(self.pairs), pick(self.words))


class TextEncoder:
    """A frozen transformers text encoder that returns every hidden state (embeddings first)."""

    def __init__(self, config: BackboneConfig):
        self.config = config
        self.folder = resolve_model_dir(config.model, config.revision)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.folder)
        model: PreTrainedModel = AutoModel.from_pretrained(self.folder)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # a side network reads the encoder's states
        self.device = pick_device(config.device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model")
        self.num_hidden_states = model.config.num_hidden_layers + 1  # embeddings + every block
        self.widths = [int(hidden)] * self.num_hidden_states
        self.max_length = min(config.max_length, self.tokenizer.model_max_length or config.max_length)
        self.layout = "tokens"
        self.row_shapes = [(w,) for w in self.widths]
        self.stages = list(range(self.num_hidden_states))

    def prepare(self, examples: Sequence[Any], views: int = 1) -> PreparedPart:
        """Tokenise a part's examples and find those cut to max_length.

        An example is one text (``.text``), a pair (``.pair`` set: encoded together through the tokenizer's
        pair API) or a list of words (``.words`` set, tagging: its tags, ``.label``, are aligned to tokens).
        ``views``: every view of a text reads the same tokens (views differ by dropout alone)."""
        t0 = time.perf_counter()
        inputs = TextInputs.of(examples)
        features = self.tokenize(inputs.texts, inputs.pairs, inputs.words)
        lengths = np.array([len(f["input_ids"]) for f in features], dtype=np.int64)
        token_targets = None
        if inputs.words is not None:
            token_targets = [align_tags(f["word_ids"], ex.label if isinstance(ex.label, tuple) else None)
                             for f, ex in zip(features, examples)]  # an unlabelled example: nothing scored
        return PreparedPart(list(examples), features, lengths, self.truncated(inputs, features), [],
                            time.perf_counter() - t0, token_targets)

    def tokenize(self, texts: Sequence[str] | None, pairs: Sequence[str] | None = None,
                 words: Sequence[Sequence[str]] | None = None) -> list[dict[str, list[int]]]:
        """Token ids per input (truncated to max_length, special tokens added, no padding): texts, texts with
        their pairs (the tokenizer's own pair encoding and truncation rule), or pre-split words (each
        feature then also has ``word_ids``: the word each token comes from, None for special tokens)."""
        if words is not None:
            encoded = self.tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True,
                                     max_length=self.max_length, padding=False)
        elif pairs is not None:
            encoded = self.tokenizer(list(texts), list(pairs), truncation=True, max_length=self.max_length,
                                     padding=False)
        else:
            encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        features = [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]
        if words is not None:
            for i, feature in enumerate(features):
                feature["word_ids"] = encoded.word_ids(i)
        return features

    def truncated(self, inputs: "TextInputs", features: Sequence[dict[str, list[int]]]) -> list[int]:
        """Indices of the inputs that :meth:`tokenize` cut to max_length.

        Only inputs that came out exactly max_length long can have been cut; those (few) are tokenised again
        without truncation to tell "cut" from "fits exactly".
        """
        full = [i for i, f in enumerate(features) if len(f["input_ids"]) >= self.max_length]
        if not full:
            return []
        some = inputs.subset(full)
        plain = dict(truncation=False, padding=False, return_attention_mask=False, return_token_type_ids=False)
        if some.words is not None:
            lengths = self.tokenizer([list(w) for w in some.words], is_split_into_words=True, **plain)["input_ids"]
        elif some.pairs is not None:
            lengths = self.tokenizer(some.texts, some.pairs, **plain)["input_ids"]
        else:
            lengths = self.tokenizer(some.texts, **plain)["input_ids"]
        return [i for i, ids in zip(full, lengths) if len(ids) > self.max_length]

    @torch.no_grad()
    def hidden_states(self, features: list[dict[str, list[int]]], dropout_seed: int | None = None,
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Pad a batch, run the frozen model, return (hidden states (B, N, D) each, mask (B, N) bool).
        ``dropout_seed``: run with train-mode dropout seeded so (a stochastic view); None = eval mode."""
        features = [{k: v for k, v in f.items() if k != "word_ids"} for f in features]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(self.device, self.config.autocast), \
                stochastic_forward(self.model, self.device, dropout_seed):
            out = self.model(**batch, output_hidden_states=True, return_dict=True)
        return out.hidden_states, batch["attention_mask"].bool()

    def provenance(self) -> dict[str, Any]:
        return {
            # A local folder is recorded absolute, so a checkpoint trained from the store finds it from anywhere.
            "location": (str(Path(self.config.model).resolve()) if Path(self.config.model).is_dir()
                         else self.config.model),
            "architecture": type(self.model).__name__,
            **backbone_hashes(self.folder),
            "num_hidden_states": self.num_hidden_states,
            "hidden_size": self.widths[-1],
            "max_length": self.max_length,
        }

    def close(self) -> None:
        pass
