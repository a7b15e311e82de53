"""Sweeps: one run's config plus ``{key: [values, ...]}`` expands into the cartesian product of runs.

    expand_sweep("unipt", TrainConfig(), {"lr": [1e-4, 5e-4], "model.reduction": [2, 4], "seed": [0, 1]})
    -> {"unipt@lr=0.0001,model.reduction=2,seed=0": TrainConfig(lr=1e-4, model={"reduction": 2}, seed=0),
        ...                                                                     (8 runs, the last key fastest)}

Keys are TrainConfig fields (``lr``, ``seed``, ``method``, ...) or ``model.<option>`` of the run's method.
Names read ``<base>@<key>=<value>,...`` in the sweep's key order: ``@ = , . + -`` need no quoting in a
shell (brackets would glob) and are valid in file names everywhere, so a name is also its checkpoint folder.
Train the runs with :func:`unipt.train.fit_many` (one pass over the store per epoch for runs that share
:data:`unipt.train.PASS_FIELDS`; :func:`unipt.train.pass_groups` groups them).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Mapping, Sequence

from ._methods import METHODS, Method, get_method
from .config import TrainConfig

MODEL_PREFIX = "model."
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+@-]")


def sweep_keys(methods: Sequence[str], registry: Mapping[str, Method] = METHODS) -> list[str]:
    """Every key a sweep over runs of ``methods`` (names in ``registry``) may vary."""
    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    model = {f.name for m in methods for f in dataclasses.fields(get_method(m, registry).config_cls)}
    return sorted(train) + sorted(MODEL_PREFIX + name for name in model)


def expand_sweep(name: str, base: TrainConfig, sweep: Mapping[str, Sequence[Any]],
                 registry: Mapping[str, Method] = METHODS) -> dict[str, TrainConfig]:
    """``{run name: config}`` for every combination of ``sweep``'s values on top of ``base``.

    An empty sweep gives ``{name: base}``. Unknown keys are refused with the list of valid ones; every
    expanded config is checked (TrainConfig's checks, and the method's model options).
    """
    if not sweep:
        return {name: base}
    for key, values in sweep.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"sweep values must be a non-empty list, got {key} = {values!r}")
    methods = [get_method(m, registry).name for m in sweep.get("method", [base.method])]
    valid = sweep_keys(methods, registry)
    unknown = sorted(set(sweep) - set(valid))
    if unknown:
        raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {valid}")

    runs: dict[str, TrainConfig] = {}
    for combination in itertools.product(*sweep.values()):
        chosen = dict(zip(sweep, combination))
        run = f"{name}@" + ",".join(f"{key}={_format(value)}" for key, value in chosen.items())
        train = {k: v for k, v in chosen.items() if not k.startswith(MODEL_PREFIX)}
        model = {**base.model, **{k[len(MODEL_PREFIX):]: v for k, v in chosen.items() if k.startswith(MODEL_PREFIX)}}
        try:
            config = dataclasses.replace(base, **train, model=model)
            get_method(config.method, registry).make_config(config.model)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sweep run {run!r}: {exc}") from exc
        if run in runs:
            raise ValueError(f"sweep values {chosen} give the run name {run!r} twice; make the values distinct")
        runs[run] = config
    return runs


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "+".join(_format(v) for v in value)
    return _UNSAFE.sub("_", str(value))
