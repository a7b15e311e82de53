"""Stacked runs: several runs of one method whose parameter shapes agree, or can be padded to agree, stepped as
one batched model.

A sweep over learning rates, weight decay, seeds, schedules or dropout trains K models of one shape on the same
batches. Stepped in turn, every batch costs K small forwards and backwards; stacked, it costs one: each step
stacks the runs' parameters on a leading run axis, ``torch.stack([run's tensor, ...])`` (K, ...) per name, and
:func:`torch.func.vmap` maps :func:`torch.func.functional_call` of one structural copy of the model over that
axis, the batch's hidden states and mask shared by every run. The stacked tensors are built from the runs' own
parameters at every step, so the gradients of one backward land on each run's own leaves, and each run's own
AdamW, learning-rate schedule and gradient clipping step it unchanged. Stacked and in turn are the same
training, to float rounding (batched kernels sum in another order).

Runs of different widths (UniPT's r: m = E // r) are padded into groups by shape, where their method opts in
(``Method.pad_options``). Each run keeps its own unpadded parameters and optimiser; at every step each tensor is
zero-padded (``F.pad``: its gradient is the unpadded slice's, the padding gets none) to the group's largest size
along each axis where the runs differ, then stacked; the structural copy is the largest run's. Zero padding is
exact through Linears, ReLU and sums over the padded width (padded units stay 0 and add 0), but not through
everything: LayerNorm reads the whole width, so each LayerNorm over a padded width becomes a masked one, fed each
run's valid-width mask as dropout is fed its masks, that normalises over the run's own width and outputs 0 on the
padding. Nor is it generic: multi-head attention splits the width into heads, so padded units would shift which
features each head sees; a method opts in only where every op on the width is of the first kind (see its
registration in ``_methods``). A padded stack costs every run the largest run's compute.

Dropout draws from each run's own random stream (``run.rng``). vmap runs the model's Python once for all runs,
so the structural copy's dropout layers do not draw: they multiply by masks drawn before the step, inside each
run's stream, in the order the model calls them (found by a dry run without gradients, one per shape among the
runs: each run draws masks of its own shapes, zero-padded to the stack's), exactly as torch's CPU dropout draws
them (``empty(shape).bernoulli_(1 - p)``, then ``div_(1 - p)``). On CPU a stacked run thus gets the very masks
it would draw alone. On CUDA torch's fused dropout kernel draws another way: stacked runs still draw from their
own streams (which runs a run is stacked with does not change its masks), but not the masks they would draw
alone.

:func:`group_steppers` sorts a pass's runs into such stacks (``TrainConfig.stack``): "on" stacks wherever the
stack key agrees, "auto" measures on the first batches whether stacking is faster (:class:`AutoStack`; a padded
stack may well lose), "off" steps the run alone.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ._methods import config_dict, get_method

logger = logging.getLogger(__name__)

MAX_STACK = 32
"""Most runs in one stack. One stacked step holds every run's activations at once (K times the largest run's:
UniPT's (B, L, N, N) scores included), so its memory grows with K; a larger group is split into near-equal stacks."""

_clock: Callable[[], float] = time.perf_counter  # what AutoStack times with


class Unstackable(ValueError):
    """The runs' model does something a stacked step cannot reproduce (a random draw outside ``nn.Dropout``)."""


def group_steppers(runs: list) -> list:
    """``runs`` as steppers (``train_step(batch)``, ``stepping``), in the order of their first run.

    Runs with equal :func:`stack_key` form one :class:`StackedRuns` (every member "on") or :class:`AutoStack`
    (any member "auto"), split into stacks of at most :data:`MAX_STACK`; a run with no key ("off", or a model
    that cannot stack) or alone with its key steps alone: the run is its own stepper."""
    slots: list[Any] = []  # a run, or the list of its group's runs at the group's first run
    groups: dict[tuple, list] = {}
    for run in runs:
        key = stack_key(run)
        if key is None:
            slots.append(run)
        elif key in groups:
            groups[key].append(run)
        else:
            groups[key] = [run]
            slots.append(groups[key])
    steppers = []
    for slot in slots:
        if not isinstance(slot, list):
            steppers.append(slot)
            continue
        stacks = math.ceil(len(slot) / MAX_STACK)
        for k in range(stacks):
            members = slot[k * len(slot) // stacks:(k + 1) * len(slot) // stacks]
            if len(members) == 1:
                steppers.append(members[0])
            elif any(run.config.stack == "auto" for run in members):
                steppers.append(AutoStack(members))
            else:
                steppers.append(StackedRuns(members))
    return steppers


def stack_key(run) -> tuple | None:
    """What runs must share to be stepped as one batched model; None: the run steps alone.

    The same method and model config (dropout rates aside: each run keeps its own), the same layers in the
    batch (``run.pick``), the same parameter and buffer names, shapes and dtypes, the same task kind and head,
    and the same device. A method with ``pad_options`` (UniPT's ``reduction``) lets those options differ, and
    the shapes with them (ranks still agree): its runs stack zero-padded. A run with ``stack = "off"``, or whose
    model :func:`why_not_stackable` refuses, has none."""
    if not getattr(run, "stackable", False) or run.config.stack == "off" or why_not_stackable(run.model) is not None:
        return None  # (two-tower retrieval runs share the pass loop but not this step)
    method = get_method(run.config.method)
    padded = set(method.pad_options)
    model_config = config_dict(method.make_config(run.config.model))
    shared = sorted((k, repr(v)) for k, v in model_config.items() if "dropout" not in k and k not in padded)

    def shape(t: torch.Tensor) -> int | tuple[int, ...]:
        return t.dim() if padded else tuple(t.shape)

    params = tuple((n, shape(p), p.dtype, p.requires_grad) for n, p in run.model.named_parameters())
    buffers = tuple((n, shape(b), b.dtype) for n, b in run.model.named_buffers())
    return (run.config.method, tuple(shared), tuple(run.pick), params, buffers, run.task.kind, run.task.head,
            str(run.device))


def why_not_stackable(model: nn.Module) -> str | None:
    """Why ``model`` cannot train stacked (None: it can): a stacked step reproduces what depends on the
    parameters alone, and dropout through ``nn.Dropout`` layers; not state that training changes besides the
    parameters, nor random draws elsewhere."""
    if callable(getattr(model, "regularization", None)):
        return "it adds its own regularization() to the loss, which the stacked step does not compute"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return f"{name} keeps running statistics that change in training"
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            return f"{name} draws its attention dropout inside the attention kernel"
        if isinstance(module, nn.modules.dropout._DropoutNd) and type(module) is not nn.Dropout and module.p > 0:
            return f"{name} is a {type(module).__name__}, not an nn.Dropout"
    return None


class StackedRuns:
    """Runs of one :func:`stack_key` stepped as one model: one batched forward and backward per batch, then
    each run's own optimiser step. Members that stop (``max_steps``) drop out; a lone member left steps alone.

    Dropout masks come from each run's own random stream: on CPU the masks it would draw alone, on CUDA others
    (torch's fused CUDA dropout draws another way; see the module's docstring).

    Runs of different widths (a method's ``pad_options``) are zero-padded to the largest run's shapes, which
    the structural copy has; its LayerNorms over a padded width normalise over each run's own width."""

    def __init__(self, runs: list):
        if len(runs) < 2:
            raise ValueError(f"a stack needs at least 2 runs, got {len(runs)}")
        self.runs = list(runs)
        first = self.runs[0]
        self.device, self.pick = first.device, list(first.pick)
        self.feed = _Feed()
        self.params = [dict(run.model.named_parameters()) for run in self.runs]
        self.buffers = [dict(run.model.named_buffers()) for run in self.runs]
        shapes = [tuple(tuple(t.shape) for t in [*params.values(), *buffers.values()])
                  for params, buffers in zip(self.params, self.buffers)]
        widest = tuple(tuple(map(max, *dims)) for dims in zip(*shapes))  # each tensor's largest size per axis
        if widest not in shapes:
            raise ValueError(f"runs {[run.name for run in self.runs]} cannot stack: no run has the largest size of "
                             f"every parameter ({widest}), to lend its structure to the padded stack")
        # one dry run per distinct shape (each run draws dropout masks of its own shapes); the stack takes the
        # widest's, whose model lends the stack its structure
        distinct = list(dict.fromkeys(shapes))
        self.shape_class = [distinct.index(s) for s in shapes]
        self.widest_class = distinct.index(widest)
        names = [*self.params[0], *self.buffers[0]]
        self.pads = [{name: _padding(own, wide) for name, own, wide in zip(names, s, widest)} for s in shapes]
        self.valid = _valid_widths(self.runs)  # per run, each LayerNorm over a padded width: its own features
        self.base = _structural_copy(self.runs[shapes.index(widest)].model, self.feed, masked=self.valid[0].keys())
        own_bases = [self.base] if len(distinct) == 1 else [
            _structural_copy(self.runs[shapes.index(d)].model, self.feed) for d in distinct]
        self._dry_runs = [(shapes.index(d), base, self._vmapped(base)) for d, base in zip(distinct, own_bases)]
        self.dropouts = [{name: m for name, m in run.model.named_modules() if type(m) is nn.Dropout}
                         for run in self.runs]
        # the dropout calls of one forward, by input shapes; per shape class: [(module name, shape, dtype), ...]
        # in call order
        self.calls: dict[tuple, list[list[tuple[str, tuple[int, ...], torch.dtype]]]] = _group_state(
            self.runs).setdefault("dropout_calls", {})
        self._forward = self._vmapped(self.base)

    @property
    def stepping(self) -> bool:
        return any(run.stepping for run in self.runs)

    def train_step(self, batch) -> None:
        from ._trainer import _autocast, step_optimizer  # _trainer imports this module

        runs = [run for run in self.runs if run.stepping]
        if len(runs) < 2:
            for run in runs:
                run.train_step(batch)
            return
        index = [self.runs.index(run) for run in runs]
        hidden = [batch.hidden_states[i] for i in self.pick]
        calls = self.dropout_calls(hidden, batch.mask)
        masks = self._masks(index, calls)
        params = self._stacked(self.params, index)  # (K, ...), zero-padded to the widest run's shapes
        buffers = self._stacked(self.buffers, index)
        valid = {name: torch.stack([self.valid[k][name] for k in index]) for name in self.valid[0]}  # (K, width)
        self.base.train(runs[0].model.training)
        with _autocast(self.device):
            # (K, B, outputs), or (K, B, N, outputs) per token
            outputs = self._forward(params, buffers, masks, valid, hidden, batch.mask)
        losses = [run.task.loss(out.float(), batch.labels) for run, out in zip(runs, outputs.unbind(0))]
        for run in runs:
            run.optimizer.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()  # each run's loss reaches its own parameters only
        for run, loss in zip(runs, losses):
            step_optimizer(run, len(batch))
            run.record_step(loss, batch)
            run.stacked = True

    def dropout_calls(self, hidden: list[torch.Tensor],
                      mask: torch.Tensor) -> list[list[tuple[str, tuple, torch.dtype]]]:
        """The dropout layers a run's forward calls on these inputs, in order, with their input shapes, for each
        shape among the runs: a dry run of the first such run's model on them, without gradients and without
        dropping (cached by input shapes; on the meta device it would take some 20 times as long). vmap's
        randomness="error" also checks that nothing else draws random numbers, raising :class:`Unstackable`
        otherwise, as it does for runs of other widths whose models call dropout differently."""
        from ._trainer import _autocast

        key = (tuple((tuple(h.shape), h.dtype) for h in hidden), tuple(mask.shape), mask.dtype)
        if key not in self.calls:
            names = [run.name for run in self.runs]
            by_class = []
            for k, base, dry_run in self._dry_runs:
                params = {name: p.detach().unsqueeze(0) for name, p in self.params[k].items()}  # one run: (1, ...)
                buffers = {name: b.unsqueeze(0) for name, b in self.buffers[k].items()}
                self.feed.recording = []
                base.train(self.runs[k].model.training)
                try:
                    with torch.no_grad(), _autocast(self.device):
                        dry_run(params, buffers, [], {}, hidden, mask)
                except RuntimeError as error:
                    if "random" not in str(error):
                        raise
                    method = self.runs[0].config.method
                    raise Unstackable(f"runs {names} cannot train stacked: their {method} model draws random "
                                      f"numbers outside nn.Dropout ({error}); set stack = \"off\" for them") from None
                finally:
                    recorded, self.feed.recording = self.feed.recording, None
                by_class.append(recorded)
            wide = by_class[self.widest_class]
            for calls in by_class:
                if [(n, len(s), d) for n, s, d in calls] != [(n, len(s), d) for n, s, d in wide]:
                    raise Unstackable(f"runs {names} cannot train stacked: their models of different widths call "
                                      f"dropout differently ({calls} vs {wide}); set stack = \"off\" for them")
            self.calls[key] = by_class
        return self.calls[key]

    def _stacked(self, tensors: list[dict[str, torch.Tensor]], index: list[int]) -> dict[str, torch.Tensor]:
        """The runs' tensors by name, each zero-padded to the widest run's shape and stacked: (K, ...)."""
        return {name: torch.stack([_padded(tensors[k][name], self.pads[k][name]) for k in index])
                for name in tensors[0]}

    def _masks(self, index: list[int], calls: list[list]) -> list[torch.Tensor]:
        """The stacked dropout masks (K, *shape) of one step, one per call that any run drops in, drawn in each
        run's own stream at its own shapes and zero-padded to the stack's (the widest run's: padded units are 0
        whatever they are multiplied by); sets the feed's plan (which mask each call takes, None: it passes its
        input on)."""
        drawn = []
        for k in index:
            own = calls[self.shape_class[k]]
            rates = [self._rate(k, name) for name, _, _ in own]
            if not any(rates):
                drawn.append([None] * len(own))
                continue
            with self.runs[k].rng:  # in call order, as the run's own forward draws them alone
                drawn.append([_dropout_mask(shape, dtype, p, self.device) for (_, shape, dtype), p in zip(own, rates)])
        plan, masks = [], []
        for c, (_, shape, dtype) in enumerate(calls[self.widest_class]):
            per_run = [run_masks[c] for run_masks in drawn]
            if all(m is None for m in per_run):
                plan.append(None)
                continue
            ones = torch.ones(shape, dtype=dtype, device=self.device)  # p = 0: the input as it is
            plan.append(len(masks))
            masks.append(torch.stack([ones if m is None else _padded(m, _padding(m.shape, shape)) for m in per_run]))
        self.feed.plan = plan
        return masks

    def _rate(self, k: int, name: str) -> float:
        module = self.dropouts[k][name]
        return module.p if module.training else 0.0

    def _vmapped(self, base: nn.Module) -> Callable:
        """``base``'s forward mapped over the run axis: (params, buffers, masks, valid, hidden, mask)."""
        return vmap(partial(self._one_run, base), in_dims=(0, 0, 0, 0, None, None), randomness="error")

    def _one_run(self, base, params, buffers, masks, valid, hidden, mask):
        """One run's forward through ``base`` (vmap maps it over the run axis of ``params``, ``buffers``,
        ``masks`` and ``valid``)."""
        self.feed.start(masks, valid)
        return functional_call(base, (params, buffers), (hidden, mask))


class AutoStack:
    """Runs that may stack (``stack = "auto"``): the first batches measure, per token, stepping them in turn
    against :class:`StackedRuns`, alternating batch by batch after one untimed warm-up batch each way; then the
    faster way steps the rest of the pass and later passes of the same runs. Both ways are the same training (to
    float rounding), so the measuring batches are real steps.

    ``decision``: "stacked", "separate", or None while measuring (the measurements and the decision are kept on
    the runs, by the group's run names, for the later passes of the fit). ``run.stacked`` follows the decision;
    a pass that ends undecided leaves it True where a measuring batch stepped the run stacked."""

    WARMUP = 1
    """Untimed batches each way first (the first stacked step dry-runs the model; first steps allocate)."""
    MEASURE = 6
    """Timed batches each way before deciding."""

    def __init__(self, runs: list):
        self.runs = list(runs)
        self.stack = StackedRuns(self.runs)
        self.state = _group_state(self.runs)  # kept across passes: measurements so far, and the decision
        self.state.setdefault("measured", {"separate": [0, 0.0, 0], "stacked": [0, 0.0, 0]})  # batches, s, tokens
        self.state.setdefault("decision", None)

    @property
    def decision(self) -> str | None:
        return self.state["decision"]

    @property
    def stepping(self) -> bool:
        return any(run.stepping for run in self.runs)

    def train_step(self, batch) -> None:
        if self.decision == "stacked":
            self.stack.train_step(batch)
        elif self.decision == "separate":
            self._in_turn(batch)
        else:
            self._measure(batch)

    def _in_turn(self, batch) -> None:
        for run in self.runs:
            if run.stepping:
                run.train_step(batch)

    def _measure(self, batch) -> None:
        measured = self.state["measured"]
        way = "separate" if measured["separate"][0] <= measured["stacked"][0] else "stacked"
        tokens = int(batch.mask.sum())  # waits for the device
        _synchronize(self.stack.device)
        start = _clock()
        if way == "stacked":
            try:
                self.stack.train_step(batch)
            except Unstackable as why:  # raised before any step: step this batch in turn instead
                self._decide("separate", f"they cannot stack: {why}")
                self._in_turn(batch)
                return
        else:
            self._in_turn(batch)
        _synchronize(self.stack.device)
        batches, seconds, counted = measured[way]
        if batches >= self.WARMUP:
            seconds, counted = seconds + _clock() - start, counted + tokens
        measured[way] = [batches + 1, seconds, counted]
        if min(m[0] for m in measured.values()) >= self.WARMUP + self.MEASURE:
            per_token = {w: s / max(t, 1) for w, (_, s, t) in measured.items()}
            speedup = per_token["separate"] / max(per_token["stacked"], 1e-30)
            self._decide("stacked" if speedup > 1 else "separate",
                         f"stacked {per_token['stacked'] * 1e6:.3g} us/token vs in turn "
                         f"{per_token['separate'] * 1e6:.3g} us/token over {self.MEASURE} batches each: "
                         f"stacking is {speedup:.2f}x as fast")

    def _decide(self, decision: str, why: str) -> None:
        self.state["decision"] = decision
        for run in self.runs:
            run.stacked = decision == "stacked"
        names = [run.name for run in self.runs]
        logger.info("%d %s runs %s train %s: %s", len(names), self.runs[0].config.method, names,
                    "stacked" if decision == "stacked" else "in turn", why)


class _Feed:
    """What the structural copy's fed layers take. Its dropout layers record their calls (a dry run), or multiply
    by the mask the plan gives each call (a stacked step; inside vmap, one run's slice of the stacked mask). Its
    masked LayerNorms take their run's valid-width mask by module name (``valid``, also one run's slice)."""

    def __init__(self):
        self.recording: list | None = None
        self.plan: list[int | None] = []
        self.valid: dict[str, torch.Tensor] = {}
        self._calls = iter(())
        self._masks: list[torch.Tensor] = []

    def start(self, masks: list[torch.Tensor], valid: dict[str, torch.Tensor]) -> None:
        self._calls, self._masks, self.valid = iter(self.plan), masks, valid

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.recording is not None:
            self.recording.append((name, tuple(x.shape), x.dtype))
            return x
        index = next(self._calls)
        if index is None:
            return x
        mask = self._masks[index]
        if mask.shape != x.shape:  # masks of the widest run's shapes: a method that opted into padding wrongly
            raise ValueError(f"dropout {name} of the padded stacked model got {tuple(x.shape)}, its masks are "
                             f"{tuple(mask.shape)}: its method's pad_options do not only pad")
        return x * mask.to(x.dtype)


class _FedDropout(nn.Module):
    """An ``nn.Dropout`` of the structural copy: its mask comes from the feed (drawn in the run's own stream)."""

    def __init__(self, name: str, feed: _Feed):
        super().__init__()
        self.module_name, self.feed = name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed(self.module_name, x)


class _MaskedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` of the structural copy whose width is padded: :func:`masked_layer_norm` over its
    run's own width, the valid-width mask from the feed. (Its weight and bias come from functional_call.)"""

    def __init__(self, name: str, feed: _Feed, like: nn.LayerNorm):
        super().__init__(like.normalized_shape, like.eps, like.elementwise_affine, bias=like.bias is not None,
                         device="meta")
        self.module_name, self.feed = name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_layer_norm(x, self.feed.valid[self.module_name], self.weight, self.bias, self.eps)


def masked_layer_norm(x: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """torch's layer norm of ``x`` (..., *W) over the features ``valid`` (W, bool) marks only: their mean, their
    biased variance, ``(x - mean) / sqrt(var + eps) * weight + bias``; 0 on the rest. ``x``'s padded entries
    are ignored, and get no gradient. Under autocast it computes and returns float32, as autocast's layer_norm
    does; otherwise it returns ``x``'s dtype.

    (On a zero-padded stack the padding's weight and bias are 0, so its outputs are exactly 0 already:
    ``0 * rsqrt(var + eps) * 0 + 0``; the mask keeps them so whatever the input holds there.)"""
    dims = tuple(range(-valid.dim(), 0))
    compute = torch.promote_types(x.dtype, torch.float32)
    out = compute if torch.is_autocast_enabled(x.device.type) else x.dtype
    keep = valid.to(compute)  # (*W)
    x = x.to(compute)
    count = keep.sum()
    mean = (x * keep).sum(dims, keepdim=True) / count
    centred = (x - mean) * keep  # (..., *W): 0 on the padding
    var = (centred * centred).sum(dims, keepdim=True) / count
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return (y * keep).to(out)


def _structural_copy(model: nn.Module, feed: _Feed, masked=()) -> nn.Module:
    """``model``'s structure on the meta device (functional_call hands it every parameter and buffer), with
    every ``nn.Dropout`` fed by ``feed``, and the LayerNorms named in ``masked`` (padded widths) masked."""
    base = copy.deepcopy(model).to("meta")
    for name, module in list(base.named_modules()):
        if type(module) is nn.Dropout:
            replacement = _FedDropout(name, feed)
        elif name in masked:
            replacement = _MaskedLayerNorm(name, feed, module)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, replacement)
    return base


def _padding(own: tuple[int, ...], wide: tuple[int, ...]) -> tuple[int, ...] | None:
    """``F.pad``'s padding from shape ``own`` up to ``wide`` (zeros after each axis's entries; last axis
    first); None where they agree."""
    if tuple(own) == tuple(wide):
        return None
    return tuple(n for o, w in zip(reversed(own), reversed(wide)) for n in (0, w - o))


def _padded(t: torch.Tensor, padding: tuple[int, ...] | None) -> torch.Tensor:
    """``t`` zero-padded (differentiable: the gradient of the result's unpadded slice flows to ``t``)."""
    return t if padding is None else F.pad(t, padding)


def _valid_widths(runs: list) -> list[dict[str, torch.Tensor]]:
    """Per run, for each LayerNorm whose width differs between ``runs``: which of the widest width's features
    are the run's own (bool, the widest ``normalized_shape``). Empty dicts where the widths agree. A norm of
    another kind over differing widths is refused: only LayerNorm is masked."""
    valid: list[dict[str, torch.Tensor]] = [{} for _ in runs]
    for name, module in runs[0].model.named_modules():
        widths = [tuple(getattr(run.model.get_submodule(name), "normalized_shape", ())) for run in runs]
        if len(set(widths)) == 1:
            continue
        if type(module) is not nn.LayerNorm:
            raise ValueError(f"runs {[run.name for run in runs]} cannot stack padded: {name} is a "
                             f"{type(module).__name__} over widths {widths}, and only nn.LayerNorm is masked")
        widest = tuple(map(max, *widths))
        for own, run_valid in zip(widths, valid):
            keep = torch.ones(own, dtype=torch.bool, device=runs[0].device)
            run_valid[name] = _padded(keep, _padding(own, widest))
    return valid


def _dropout_mask(shape: tuple, dtype: torch.dtype, p: float, device: torch.device) -> torch.Tensor | None:
    """What torch's CPU dropout multiplies its input by, drawn as it draws it (aten's ``_dropout_impl``:
    ``empty_like(input).bernoulli_(1 - p)``, then ``div_(1 - p)``); None for p = 0, which draws nothing."""
    if p == 0:
        return None
    if p == 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p).div_(1 - p)


def _group_state(runs: list) -> dict:
    """State a group keeps for the whole fit (its auto decision, its dropout calls by input shapes), kept on its
    first run by the group's run names: the steppers are rebuilt every pass, the runs live for the fit."""
    names = tuple(run.name for run in runs)
    if not hasattr(runs[0], "stack_state"):
        runs[0].stack_state = {}
    return runs[0].stack_state.setdefault(names, {})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
