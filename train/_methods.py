"""The side networks and baselines that train from a store, by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .head2toe import Head2Toe, Head2ToeConfig
from .head2toe import prepare as head2toe_prepare
from .head2toe import select_and_retrain as head2toe_select
from .linear_probe import LinearProbe, LinearProbeConfig
from .lst import LSTClassifier, LSTConfig
from .restuning import ResTuningClassifier, ResTuningConfig
from .scalar_mix import ScalarMix, ScalarMixConfig
from .sherl import SHERLClassifier, SHERLConfig
from .sherl import bind_store as sherl_bind
from .side4video import Side4VideoClassifier, Side4VideoConfig
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
    prepare: Callable[[Any, Any, Any], None] | None = None
    """``prepare(run, train loader, eval loader)``: before a fresh run's first epoch (e.g. input statistics
    from the train split into the model's buffers; they are saved with its state, so a resumed run skips it)."""
    finish: Callable[[Any, Any, Any, Any], None] | None = None
    """``finish(run, train loader, eval loader, log)``: a phase of the method's own after the run's last epoch
    and before its test pass (Head2Toe: select features, retrain, save the chosen model as the checkpoint and
    what it chose as ``run.post_train``). It must be a function of the run's saved state: a run killed during
    it repeats it on restart."""
    bind: Callable[[Any, Any], Any] | None = None
    """``bind(model config, store) -> model config``: the config completed from the store a run trains on, before
    its layers are resolved (SHERL: the backbone folder, its weights hash, the layers up to H_{L-1}); the bound
    config is what the checkpoint saves, so a reload needs no store."""
    stackable: bool = True
    """False: its runs never train stacked (SHERL's frozen backbone block lives outside the stacked parameters)."""

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

    def store_config(self, values: Mapping[str, Any], store: Any) -> Any:
        """:meth:`make_config`, completed from ``store`` by :attr:`bind` where the method has one."""
        config = self.make_config(values)
        return config if self.bind is None else self.bind(config, store)


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
    # The epochs train the group-lasso head (its model's regularization(), which also keeps it off stacked
    # steps); finish selects the features and retrains the head on them.
    "head2toe": Method("head2toe", Head2ToeConfig, Head2Toe, token_outputs=False, prepare=head2toe_prepare,
                       finish=head2toe_select),
    # The CNN variant reads a maps store's stage maps (B, C_k, H_k, W_k); its widths are the stage channels.
    "unipt_cnn": Method("unipt_cnn", UniPTCNNConfig, UniPTCNNClassifier, ("maps",), token_outputs=False),
    # Res-Tuning-Bypass and the Side4Video side transformer: token outputs, runs of one shape stack (their dropout
    # is nn.Dropout only; Side4Video's attention splits its width into heads, so neither pads widths).
    "restuning": Method("restuning", ResTuningConfig, ResTuningClassifier, ("tokens",), token_outputs=True),
    "side4video": Method("side4video", Side4VideoConfig, Side4VideoClassifier, ("tokens",), token_outputs=True),
    # SHERL runs the backbone's frozen last block (read from the backbone folder the store names: bind) after its
    # side network; the block is no parameter of the stacked step's, so its runs step alone.
    "sherl": Method("sherl", SHERLConfig, SHERLClassifier, bind=sherl_bind, stackable=False),
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
