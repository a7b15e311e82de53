"""The side networks and baselines that train from a store, by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .linear_probe import LinearProbe, LinearProbeConfig
from .lst import LSTClassifier, LSTConfig
from .scalar_mix import ScalarMix, ScalarMixConfig
from .tasks import Task
from .unipt import UniPTClassifier, UniPTConfig
from .unipt_cnn import UniPTCNNClassifier, UniPTCNNConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Callable[[Any, Sequence[int], Any], nn.Module]  # (config, layer widths, HeadSpec or classes) -> model
    layouts: tuple[str, ...] = ("tokens",)  # store layouts it reads: token rows and/or feature maps
    token_outputs: bool = True  # it has an output per token (UniPT's Y), so per-token tasks fit it
    pad_options: tuple[str, ...] = ()
    """Model options that change only widths a stacked step may zero-pad: runs that differ in them still stack
    (``_stacked``). Empty: runs stack only where every parameter shape agrees. Opt in only for a model whose
    every op on such a width keeps zero-padded units at 0, LayerNorm aside (see ``_stacked``)."""

    def check_task(self, task: Task, layout: str) -> None:
        """Refuse a task this method cannot serve, naming the methods that can."""
        if task.per_token and (not self.token_outputs or layout != "tokens"):
            fits = sorted(name for name, m in METHODS.items() if m.token_outputs and "tokens" in m.layouts)
            why = "a feature-map store has no tokens" if layout != "tokens" else "it outputs one pooled vector per example"
            raise ValueError(f"method {self.name!r} cannot train a {task.kind} task ({why}); a {task.kind} task needs "
                             f"an output per token: use one of {fits}")

    def check_layout(self, layout: str, where: str) -> None:
        if layout not in self.layouts:
            fits = sorted(name for name, m in METHODS.items() if layout in m.layouts)
            raise ValueError(f"method {self.name!r} reads {' or '.join(self.layouts)} stores; {where} holds {layout} "
                             f"(methods for it: {fits})")

    def make_config(self, values: Mapping[str, Any]) -> Any:
        valid = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown {self.name} model option(s) {unknown}; valid: {sorted(valid)}")
        return self.config_cls(**values)


METHODS: dict[str, Method] = {
    # UniPT stacks across r: m = E // r, zero-padded to the group's largest m, is exact. The ops that touch m
    # are the Linears into it (zero rows, zero bias: padded units 0) and out of it (zero columns: they add 0),
    # ReLU, the token means, the sums over m in A·X_lᵀ and in the gate's Linear(m -> 1), and Z_l's mixing over
    # tokens and layers: all keep padded units at 0 and add nothing from them. LayerNorm(m) alone reads the whole
    # width; _stacked normalises it over each run's own m. (LST's attention splits its width into heads: padded,
    # the units would land in other heads, so it does not opt in.)
    "unipt": Method("unipt", UniPTConfig, UniPTClassifier, pad_options=("reduction",)),
    "linear_probe": Method("linear_probe", LinearProbeConfig, LinearProbe, ("tokens", "maps")),
    "scalar_mix": Method("scalar_mix", ScalarMixConfig, ScalarMix, token_outputs=False),
    "lst": Method("lst", LSTConfig, LSTClassifier),
    # The CNN variant reads a maps store's stage maps (B, C_k, H_k, W_k); its widths are the stage channels.
    "unipt_cnn": Method("unipt_cnn", UniPTCNNConfig, UniPTCNNClassifier, ("maps",), token_outputs=False),
}


def get_method(name: str, registry: Mapping[str, Method] = METHODS, what: str = "method") -> Method:
    """``registry[name]``; an unknown name is refused with the available ones."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(registry)}") from None


def resolve_layers(selection: str | Sequence[int], stored: Sequence[int]) -> list[int]:
    """Map a layer selection onto the layers a store holds.

    "all" = every stored layer; a non-negative index names a backbone hidden state (0 = embeddings) and
    must be stored; a negative index counts from the end of the stored layers (-1 = the last one).
    """
    stored = list(stored)
    if isinstance(selection, str):
        if selection != "all":
            raise ValueError(f"layer selection must be 'all' or a list of indices, got {selection!r}")
        return stored
    resolved = []
    for index in selection:
        index = int(index)
        layer = stored[index] if index < 0 and -len(stored) <= index else index
        if layer not in stored:
            raise ValueError(f"layer {index} is not in the store; it holds layers {stored}")
        resolved.append(layer)
    return resolved


def config_dict(config: Any) -> dict[str, Any]:
    out = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
