"""The backbone's frozen last block, loaded alone from its folder: safetensors only, hash-checked.

SHERL's side network hands its output ``u`` to the backbone's own last transformer block. The store holds the
hidden states that feed that block, not the block, so it is read from the backbone's folder: its
``config.json`` builds the block (transformers' own layer class, inside a one-layer encoder so that an
architecture's encoder-level parts, such as MPNet's relative attention bias, come with it), and only the
block's tensors are read from ``model.safetensors`` (``safe_open``: the other layers are never loaded).

The folder must be the one the store was extracted with: its weights hash (sha256 over the weight files and
``config.json``, computed as extraction records it in the store's provenance) is checked against the store's
and the checkpoint's.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from unipt.store import files_sha256, weight_files



def weights_sha256(folder: str | Path) -> str:
    """The hash extraction records as the store's ``provenance["backbone"]["weights_sha256"]``."""
    folder = Path(folder)
    # A folder is hashed once per content: bind and build (and every run of a sweep) ask for the same one.
    return _hash_files(str(folder), tuple((n, *_stamp(folder / n)) for n in weight_files(folder)))


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=16)
def _hash_files(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    return files_sha256(folder, [name for name, _, _ in files])


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture's last block is built and fed."""

    encoder: Callable[[], type]  # the encoder class, built with one layer (imported when used)
    model_class: str  # its base model class: the key of transformers' checkpoint renamings for it
    attention: str  # the attention implementation its model runs ("sdpa"; MPNet has only "eager")
    encoder_tensors: tuple[str, ...] = ()  # encoder-level tensors the block needs (MPNet's relative bias)
    final_norm: str | None = None  # the model's LayerNorm after the last block, if it has one


def _bert():
    from transformers.models.bert.modeling_bert import BertEncoder
    return BertEncoder


def _mpnet():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    return MPNetEncoder


def _dinov2():
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Encoder
    return Dinov2Encoder


ARCHITECTURES = {
    "bert": Architecture(_bert, "BertModel", "sdpa"),  # all-MiniLM-L6-v2
    "mpnet": Architecture(_mpnet, "MPNetModel", "eager", encoder_tensors=("relative_attention_bias.weight",)),  # all-mpnet-base-v2
    "dinov2": Architecture(_dinov2, "Dinov2Model", "sdpa", final_norm="layernorm"),
}
"""Backbone ``model_type`` (config.json) -> how its last block is built."""


def read_backbone_config(folder: str | Path):
    """The folder's transformers config (config.json only: no code, no weights), refusing an architecture
    whose last block this module cannot build."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"backbone folder {folder} has no config.json: SHERL builds the backbone's last block "
                                "from a transformers folder (the one the store was extracted with)")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"SHERL cannot run the last block of a {model_type!r} backbone ({folder}); supported "
                         f"architectures: {sorted(ARCHITECTURES)}")
    return AutoConfig.from_pretrained(folder)


def _weights_file(folder: Path) -> tuple[Path, dict[str, str] | None]:
    """``model.safetensors`` (or a sharded one's index: tensor name -> shard); pickles are refused."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return single, None
    if index.is_file():
        return index, json.loads(index.read_text())["weight_map"]
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))
    raise FileNotFoundError(
        f"backbone folder {folder} has no model.safetensors{' (only ' + ', '.join(pickles) + ')' if pickles else ''}: "
        "SHERL reads the frozen block's weights with safetensors only, never from a pickle (loading one can run "
        "code); convert the folder once, e.g. AutoModel.from_pretrained(folder).save_pretrained(folder)")


def _read_tensors(folder: Path, names: list[str], wanted: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """The tensors of ``names`` that ``wanted`` maps to a new name (None: not read), each read alone with
    ``safe_open`` (the rest of the file is never loaded)."""
    from safetensors import safe_open

    path, shards = _weights_file(folder)
    picked = {name: new for name in names if (new := wanted(name)) is not None}
    files = {}
    for name in picked:
        files.setdefault(folder / shards[name] if shards is not None else path, []).append(name)
    out = {}
    for file, file_names in files.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                tensor = f.get_tensor(name)  # float32 like the side network (a float16 folder's are upcast)
                out[picked[name]] = tensor.float() if tensor.is_floating_point() else tensor
    return out


class FrozenLastBlock(nn.Module):
    """The backbone's last transformer block (+ DINOv2's final LayerNorm), frozen: ``(u, mask) -> output``.

    ``u``: (B, N, D) input of the block; ``mask``: (B, N), 1 = real token (padded keys are masked out).
    Parameters never require gradients; gradients flow through to ``u``."""

    def __init__(self, folder: str | Path, final_norm: bool = True):
        super().__init__()
        folder = Path(folder)
        config = copy.deepcopy(read_backbone_config(folder))
        self.model_type = config.model_type
        arch = ARCHITECTURES[config.model_type]
        last = config.num_hidden_layers - 1
        self.hidden_size = int(config.hidden_size)
        config.num_hidden_layers = 1  # the encoder around the one block (and its encoder-level tensors)
        config._attn_implementation = arch.attention  # unset, transformers would ignore the padding mask
        self.config = config
        with torch.device("meta"):  # no init draws, no memory: every tensor comes from the file
            self.encoder = arch.encoder()(config)
            self.norm = (nn.LayerNorm(self.hidden_size, eps=config.layer_norm_eps)
                         if arch.final_norm and final_norm else None)
        names = _tensor_names(folder)
        block = re.compile(rf"^(.*?)encoder\.layer\.{last}\.(.+)$")
        prefixes = sorted({m.group(1) for m in map(block.match, names) if m})  # "" or e.g. "bert."
        if len(prefixes) != 1:
            raise ValueError(f"backbone folder {folder}: expected the tensors of layer {last} (encoder.layer.{last}.*, "
                             f"its config.json's last) under one prefix, found prefixes {prefixes}")
        prefix = prefixes[0]
        renamed = {f"{prefix}encoder.{t}": f"encoder.{t}" for t in arch.encoder_tensors}
        if self.norm is not None:
            renamed.update({f"{prefix}{arch.final_norm}.{leaf}": f"norm.{leaf}" for leaf in ("weight", "bias")})

        current = _current_names(arch.model_class, folder)

        def wanted(name: str) -> str | None:  # the file's name -> this module's (None: not read)
            if (m := block.match(name)) is not None:
                return current("encoder.layer.0." + m.group(2))
            return renamed.get(name)

        state = _read_tensors(folder, names, wanted)
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"backbone folder {folder}: the last block's tensors do not fit {type(self.encoder).__name__}"
                             f" (missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})")
        self.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*self.parameters(), *self.buffers()]):  # a non-persistent buffer never loads
            raise ValueError(f"backbone folder {folder}: {type(self.encoder).__name__} keeps state the weights file "
                             "does not hold; SHERL cannot build its last block")
        self.requires_grad_(False)
        self.eval()

    def forward(self, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        # transformers' own mask for its attention implementation (sdpa: boolean; eager: additive), as the
        # full model builds it: padded keys get no weight.
        attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=u, attention_mask=mask.bool())
        y = self.encoder(u, attention_mask=attention_mask)[0]  # (B, N, D)
        return y if self.norm is None else self.norm(y)


def _current_names(model_class: str, folder: Path) -> Callable[[str], str]:
    """Tensor name as saved -> as the current transformers modules name it: transformers renames some on load
    (DINOv2's ``attention.attention.query`` is now ``attention.q_proj``); its own renamings are applied here.
    A tensor it would split or merge (a SwiGLU DINOv2's ``mlp.weights_in``) is refused."""
    from transformers.conversion_mapping import WeightRenaming, get_checkpoint_conversion_mapping

    transforms = get_checkpoint_conversion_mapping(model_class) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def current(name: str) -> str:
        for converter in converters:
            if converter.rename_source_key(name)[1] is not None:
                raise ValueError(f"backbone folder {folder}: tensor {name!r} must be converted on load ({converter.source_patterns}"
                                 f" -> {converter.target_patterns}); SHERL loads only renamed tensors, not this "
                                 f"{model_class} variant")
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        return name

    return current


def _tensor_names(folder: Path) -> list[str]:
    """The tensor names of the folder's safetensors weights (read from the header or the shard index)."""
    from safetensors import safe_open

    path, shards = _weights_file(folder)
    if shards is not None:
        return list(shards)
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())
