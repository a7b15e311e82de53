"""Searches: a sweep whose values are sampled instead of crossed, within a run budget, pruning weak runs early.

    space = parse_space({"lr": {"low": 1e-5, "high": 1e-2, "log": True}, "model.reduction": [2, 4, 8]}, base)
    search = SweepSearch("unipt", base, space, SearchConfig(sampler="tpe", trials=32, parallel=8),
                         direction="maximize", storage="runs/x/search-unipt.journal")
    while search.remaining:
        wave = search.ask(8)                       # {"unipt@trial=07": TrainConfig(lr=..., model={...}), ...}
        ... train the wave, calling search.report(name, epoch, value) after each epoch (True: prune it) ...
        search.tell(name, best_value, pruned=...)  # for every run of the wave

A sweep key takes a list (categorical choices, as in a grid) or a range ``{low, high, log?, step?}``: integers
when both ends are integers, else real numbers. The keys are those of :func:`unipt.train.sweep_keys`.

Sampling is optuna's (random, or TPE), pruning optuna's successive halving (asynchronous: a run is compared,
at each rung ``min_epochs * reduction_factor**k`` epochs, with every run that reached that rung before it).
The study lives in an optuna journal file, so a search killed mid-way continues where it stopped: finished
trials are kept, and the trials that were training come back first from :meth:`SweepSearch.ask`, under the
same names and parameters. One process drives a search at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ._methods import METHODS, Method, config_dict, get_method
from ._sweep import MODEL_PREFIX, sweep_keys
from .config import TrainConfig

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

SAMPLERS = ("random", "tpe")
PRUNERS = ("asha", "none")
DIRECTIONS = ("maximize", "minimize")
RANGE_KEYS = ("low", "high", "log", "step")
OBJECTIVE_KEYS = ("select_metric", "eval_split")
"""What a search may not vary: its trials are compared on one metric of one split."""
_STUDY_ATTR = "unipt_search"


@dataclass
class SearchConfig:
    sampler: str = "tpe"
    """How trials' values are drawn: "random" (uniform over the space) or "tpe" (optuna's TPE, which draws
    more where earlier trials scored well; its first 10 trials are random)."""
    trials: int = 32
    """The run budget: trials trained in all (pruned ones included)."""
    parallel: int = 8
    """Trials that train together from one pass over the store (a wave); TPE draws a wave's trials at once."""
    prune: str = "asha"
    """"asha": stop a trial whose eval metric trails the others' at a rung (successive halving); "none"."""
    min_epochs: int = 1
    """Epochs every trial trains before it can be pruned (the first rung)."""
    reduction_factor: int = 3
    """Rungs lie at min_epochs * reduction_factor**k epochs; about 1 / reduction_factor of a rung goes on."""
    seed: int = 0
    """Seeds the sampler (the runs keep their own TrainConfig seeds)."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.prune not in PRUNERS:
            raise ValueError(f"prune must be one of {PRUNERS}, got {self.prune!r}")
        for name in ("trials", "parallel", "min_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass
class SectionSearch:
    """A recipe's [train.<section>] with a ``search`` table: what its trials start from and vary."""

    base: TrainConfig
    """The section's own options, which every trial starts from."""
    space: dict[str, Any]
    """The sweep as optuna distributions, by sweep key (:func:`parse_space`)."""
    config: SearchConfig
    """The budget, sampler and pruner."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search, as its study holds it."""

    name: str
    params: dict[str, Any]
    state: str
    """"complete", "pruned", "running", "fail" (no usable eval value) or "waiting"."""
    value: float | None
    """The best eval value of its select metric (pruned: before it was pruned); None while running."""
    pruned_at: int | None
    """The epoch after which it was pruned; None if it was not."""


def parse_space(sweep: Mapping[str, Any], base: TrainConfig,
                registry: Mapping[str, Method] = METHODS) -> dict[str, BaseDistribution]:
    """``sweep`` (key -> list of choices, or ``{low, high, log?, step?}``) as optuna distributions.

    Keys are those of :func:`unipt.train.sweep_keys`, except the objective's (select_metric, eval_split).
    Every choice, and both ends of every range, are checked with each method the search may run (TrainConfig's
    checks and the method's model options), as :func:`unipt.train.expand_sweep` checks a grid's runs. Choices
    that are arrays or tables (``"model.layers" = ["all", [0, 1]]``) are held as their JSON text, since optuna's
    choices are scalars (so a string choice may not begin with ``[`` or ``{``); :meth:`SweepSearch.ask` reads
    them back.
    """
    if not sweep:
        raise ValueError("a search needs a sweep to sample from, e.g. sweep = { lr = {low = 1e-5, high = 1e-2, "
                         "log = true} }")
    choices = sweep.get("method", [base.method])
    if not isinstance(choices, (list, tuple)):
        raise ValueError(f"method = {choices!r}: a method is chosen from a list, e.g. method = ['unipt', 'lst']")
    methods = [get_method(m, registry).name for m in choices]
    fixed = sorted(set(sweep) & set(OBJECTIVE_KEYS))
    if fixed:
        raise ValueError(f"a search compares its trials on one metric of one split, so it cannot vary {fixed}: "
                         f"set them in the section itself")
    valid = [key for key in sweep_keys(methods, registry) if key not in OBJECTIVE_KEYS]
    unknown = sorted(set(sweep) - set(valid))
    if unknown:
        raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {valid}")
    if not base.eval_split:
        raise ValueError("a search compares its trials on the eval split, but eval_split is empty: set it")
    space = {key: _distribution(key, spec, _annotation(key, methods, registry)) for key, spec in sweep.items()}
    for method in methods:  # every value each key may take, with each method the search may run
        for key, distribution in space.items():
            for value in _probes(distribution):
                params = {"method": method, key: value} if key != "method" else {key: value}
                try:
                    apply_params(base, params, registry)
                except ValueError as exc:
                    also = f" with method {method!r}" if "method" in sweep and key != "method" else ""
                    raise ValueError(f"{key} = {_decode(value)!r}{also}: {exc}") from exc
    return space


def apply_params(base: TrainConfig, params: Mapping[str, Any], registry: Mapping[str, Method] = METHODS) -> TrainConfig:
    """``base`` with a trial's values (sweep keys; JSON-held choices read back), checked as a run's config."""
    params = {key: _decode(value) for key, value in params.items()}
    train = {k: v for k, v in params.items() if not k.startswith(MODEL_PREFIX)}
    model = {**base.model, **{k[len(MODEL_PREFIX):]: v for k, v in params.items() if k.startswith(MODEL_PREFIX)}}
    try:
        config = dataclasses.replace(base, **train, model=model)
        get_method(config.method, registry).make_config(config.model)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    return config


class SweepSearch:
    """One section's search: asks for trials' configs, hears their per-epoch values and final scores.

    ``storage``: the journal file that holds the study (created if missing, continued if not); None keeps it in
    memory. A journal written by a different search of this section (another space, sampler, pruner, direction
    or base config) is refused; the budget (``trials``) and ``parallel`` may change between sessions.
    """

    def __init__(self, section: str, base: TrainConfig, space: Mapping[str, BaseDistribution], config: SearchConfig,
                 direction: str = "maximize", storage: str | Path | None = None,
                 registry: Mapping[str, Method] = METHODS):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        optuna = _optuna()
        self._optuna = optuna
        self.section, self.base, self.space, self.config, self.registry = section, base, dict(space), config, registry
        self.storage = Path(storage) if storage is not None else None
        self.study = optuna.create_study(study_name=section, storage=self._open_storage(), direction=direction,
                                         sampler=self._sampler(), pruner=self._pruner(), load_if_exists=True)
        self._width = self._check_identity(direction)
        self._in_flight: dict[str, Any] = {}  # run name -> optuna Trial, asked and not yet told
        self._reported: dict[str, set[int]] = {}  # run name -> epochs already reported
        # Trials left running by a session that ended before telling them: asked again first, but for those it had
        # already pruned (they left their pass then), which are told so now.
        running = [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        self._unfinished = [t for t in running if "pruned_at" not in t.user_attrs]
        for frozen in running:
            if "pruned_at" in frozen.user_attrs:
                best = (min if direction == "minimize" else max)(frozen.intermediate_values.values())
                self.tell(self._resume(frozen), best, pruned=True)

    # ----------------------------------------------------------------- the loop
    @property
    def remaining(self) -> int:
        """Trials :meth:`ask` can still give out: unfinished ones of an earlier session, then the budget's rest."""
        started = len(self.study.get_trials(deepcopy=False))
        return len(self._unfinished) + max(0, self.config.trials - started)

    def ask(self, n: int) -> dict[str, TrainConfig]:
        """Up to ``n`` trials to train (fewer when the budget runs out): ``{run name: config}``."""
        if n < 1:
            raise ValueError(f"ask for at least one trial, got n = {n}")
        # Seeded from the trials started so far: a search resumed between waves draws what it would have drawn.
        self.study.sampler = self._sampler(len(self.study.get_trials(deepcopy=False)))
        asked: dict[str, Any] = {}
        while self._unfinished and len(asked) < n:
            name = self._resume(self._unfinished.pop(0))
            asked[name] = self._in_flight[name]
        while len(asked) < n and len(self.study.get_trials(deepcopy=False)) < self.config.trials:
            trial = self.study.ask(self.space)
            name = self.name(trial.number)
            asked[name], self._in_flight[name], self._reported[name] = trial, trial, set()
        configs = {}
        for name, trial in asked.items():
            try:
                configs[name] = apply_params(self.base, trial.params, self.registry)
            except ValueError as exc:
                self.tell(name, None)  # a failed trial, not asked again on resume
                raise ValueError(f"search trial {name} ({_shown(trial.params)}): {exc}; narrow the sweep so every "
                                 f"combination is a valid run") from exc
        return configs

    def report(self, name: str, epoch: int, value: float) -> bool:
        """Record trial ``name``'s eval value after ``epoch`` (1-based); True: prune it now."""
        trial = self._trial(name)
        if epoch not in self._reported[name]:  # a resumed trial may report an epoch again
            trial.report(float(value), epoch)
            self._reported[name].add(epoch)
        prune = trial.should_prune()
        if prune:
            trial.set_user_attr("pruned_at", epoch)
        return prune

    def tell(self, name: str, value: float | None, pruned: bool = False) -> None:
        """Finish trial ``name`` with its best eval value (``pruned``: its best before it was pruned). A value
        that is None or NaN (no eval score, a diverged run) fails the trial."""
        trial = self._trial(name)
        states = self._optuna.trial.TrialState
        usable = value is not None and not math.isnan(value)
        if usable:
            trial.set_user_attr("best_value", float(value))
        if pruned:
            self.study.tell(trial, state=states.PRUNED)
        elif usable:
            self.study.tell(trial, float(value))
        else:
            self.study.tell(trial, state=states.FAIL)
        del self._in_flight[name], self._reported[name]

    def records(self) -> list[TrialRecord]:
        """Every trial so far, in order."""
        out = []
        for t in self.study.get_trials(deepcopy=False):
            state = t.state.name.lower()
            value = t.user_attrs.get("best_value", t.value) if state in ("complete", "pruned") else None
            out.append(TrialRecord(self.name(t.number), {k: _decode(v) for k, v in t.params.items()}, state, value,
                                   t.user_attrs.get("pruned_at")))
        return out

    def name(self, number: int) -> str:
        """Trial ``number``'s run name: ``<section>@trial=07`` (zero-padded to the first session's budget)."""
        return f"{self.section}@trial={number:0{self._width}d}"

    # ----------------------------------------------------------------- optuna's parts
    def _resume(self, frozen) -> str:
        """Put a trial an earlier session left running back in flight; its name."""
        name = self.name(frozen.number)
        # optuna's own way back into a stored trial (what Study.ask does with an enqueued one)
        self._in_flight[name] = self._optuna.Trial(self.study, frozen._trial_id)
        self._reported[name] = set(frozen.intermediate_values)
        return name

    def _trial(self, name: str):
        if name not in self._in_flight:
            raise ValueError(f"{name!r} is not a trial in flight in this search; in flight: {sorted(self._in_flight)}")
        return self._in_flight[name]

    def _open_storage(self):
        if self.storage is None:
            return None  # optuna's in-memory storage
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        storages = self._optuna.storages
        journal = getattr(storages, "journal", None)
        backend = getattr(journal, "JournalFileBackend", None) or storages.JournalFileStorage  # optuna < 4.0
        with _stable_in_optuna_4():
            return storages.JournalStorage(backend(str(self.storage)))

    def _sampler(self, started: int = 0):
        seed = int(np.random.SeedSequence([self.config.seed, started]).generate_state(1)[0])
        samplers = self._optuna.samplers
        if self.config.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        # constant_liar: a wave's trials, drawn before any of them is scored, spread out instead of clustering
        with _stable_in_optuna_4():
            return samplers.TPESampler(seed=seed, constant_liar=True)

    def _pruner(self):
        pruners = self._optuna.pruners
        if self.config.prune == "none":
            return pruners.NopPruner()
        return pruners.SuccessiveHalvingPruner(min_resource=self.config.min_epochs,
                                               reduction_factor=self.config.reduction_factor)

    def _check_identity(self, direction: str) -> int:
        """Record what defines this search in a new study, or refuse a study made by another; the names' width."""
        distributions = self._optuna.distributions
        identity = json.loads(json.dumps({
            "direction": direction,
            "space": {key: distributions.distribution_to_json(d) for key, d in sorted(self.space.items())},
            "search": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("trials", "parallel")},
            "base": {k: v for k, v in config_dict(self.base).items() if k != "device"},
        }))
        saved = self.study.user_attrs.get(_STUDY_ATTR)
        if saved is None:
            width = len(str(self.config.trials - 1))
            self.study.set_user_attr(_STUDY_ATTR, {**identity, "width": width})
            return width
        differ = sorted(k for k in identity if identity[k] != saved.get(k))
        if differ:
            raise ValueError(f"{self.storage} holds another search of [train.{self.section}] (its {differ} differ): "
                             f"restore the section's settings to continue that search, or delete the file to start "
                             f"a new one")
        return saved["width"]


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("searching hyper-parameters needs optuna: pip install 'unipt[tune]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no INFO line per trial
    return optuna


@contextlib.contextmanager
def _stable_in_optuna_4():
    """Silence optuna 3.x's ExperimentalWarning for the journal storage and TPE's constant_liar (stable since 4.0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
        yield


def _distribution(key: str, spec: Any, annotation: Any) -> BaseDistribution:
    distributions = _optuna().distributions
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"{key} = []: give at least one choice")
        if any(isinstance(v, str) and v[:1] in ("[", "{") for v in spec):  # would read back as an array or table
            raise ValueError(f"{key} = {list(spec)!r}: a string choice cannot begin with [ or {{")
        held = [json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple, dict)) else v for v in spec]
        if len(set(map(repr, held))) < len(held):
            raise ValueError(f"{key} = {list(spec)!r} repeats a choice; make the choices distinct")
        return distributions.CategoricalDistribution(held)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key} = {spec!r}: expected a list of choices or a range "
                         f"{{low = ..., high = ...[, log = true][, step = ...]}}")
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    missing = [k for k in ("low", "high") if k not in spec]
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"no {' or '.join(missing)}"
        raise ValueError(f"{key} = {dict(spec)!r}: {problem}; a range takes {list(RANGE_KEYS)} (low and high required)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for end, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key}: {end} = {value!r} is not a number")
    if not isinstance(log, bool):
        raise ValueError(f"{key}: log = {log!r} must be true or false")
    if low >= high:
        raise ValueError(f"{key}: low = {low!r} must be below high = {high!r}")
    if log and low <= 0:
        raise ValueError(f"{key}: a log range needs low > 0, got low = {low!r}")
    if step is not None and step <= 0:
        raise ValueError(f"{key}: step = {step!r} must be positive")
    if log and step is not None and step != 1:
        raise ValueError(f"{key}: a range is either log-spaced or stepped, not both (log = true, step = {step!r})")
    integers = isinstance(low, int) and isinstance(high, int)
    if integers and annotation is float:
        raise ValueError(f"{key} = {{low = {low}, high = {high}}}: both ends are integers, which searches the integers "
                         f"{low}..{high}, but {key} takes any number: write low = {float(low)} to search between them")
    if not integers and annotation is int:
        raise ValueError(f"{key} = {{low = {low}, high = {high}}}: {key} takes integers; give integer ends")
    if integers and step is not None and not isinstance(step, int):
        raise ValueError(f"{key}: an integer range takes an integer step, got step = {step!r}")
    with warnings.catch_warnings():  # optuna warns when it shortens a range to a whole number of steps
        warnings.simplefilter("ignore")
        if integers:
            distribution = distributions.IntDistribution(low, high, log=log, step=step or 1)
        else:
            distribution = distributions.FloatDistribution(low, high, log=log, step=step)
    if distribution.high != high:
        raise ValueError(f"{key}: high - low = {high - low!r} is not a whole number of steps of {step!r}; "
                         f"set high = {distribution.high!r}")
    return distribution


def _annotation(key: str, methods: Sequence[str], registry: Mapping[str, Method]) -> Any:
    """The field type a sweep key sets (a model option: as the first of ``methods`` that has it declares it)."""
    if not key.startswith(MODEL_PREFIX):
        return typing.get_type_hints(TrainConfig).get(key)
    for method in methods:
        hints = typing.get_type_hints(get_method(method, registry).config_cls)
        if key[len(MODEL_PREFIX):] in hints:
            return hints[key[len(MODEL_PREFIX):]]
    return None


def _probes(distribution) -> list[Any]:
    """The values that bound what ``distribution`` draws: its choices, or its range's ends."""
    if hasattr(distribution, "choices"):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def _decode(value: Any) -> Any:
    """A choice as the run takes it: JSON-held arrays and tables read back (see :func:`parse_space`)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _shown(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_decode(value)!r}" for key, value in params.items())
