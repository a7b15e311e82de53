"""Recipe values checked against the config dataclasses' field annotations, before the configs are built.

A recipe is typed text: ``epochs = "five"`` or ``dedupe = "no"`` must be refused naming the field, not reach
a component's ``__post_init__`` (a raw TypeError) or slip through it (a non-empty string is truthy). The
components' own range checks stay where they are; this checks only that each value is of its field's type.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any, Callable, Mapping, NamedTuple


class _Rule(NamedTuple):
    fits: Callable[[Any], bool]
    one: str  # what fits, as a recipe's author reads it: "an integer"
    many: str  # the same in the plural, for the items of an array or a table: "integers"


# bool is a subclass of int in Python, but `epochs = true` or `lr = false` is never meant as a number.
_SCALARS = {
    bool: _Rule(lambda v: isinstance(v, bool), "true or false", "booleans"),
    int: _Rule(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "integers"),
    float: _Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", "numbers"),
    str: _Rule(lambda v: isinstance(v, str), "a string", "strings"),
}


def check_fields(cls: type, values: Mapping[str, Any], where: str, prefix: str = "", *, swept: bool = False) -> None:
    """Refuse a value of ``values`` that is not of its field's type in ``cls``, e.g.
    ``[train.unipt] epochs = 'five': expected an integer``.

    ``where`` is the recipe section and ``prefix`` the key's path inside it (``model.``); ``swept``: each value
    is a sweep's list of values for its field. Keys that are not fields are left to the caller, which refuses
    them with the list of valid ones.
    """
    # The config modules use `from __future__ import annotations`: annotations stay strings until resolved.
    for key, annotation in typing.get_type_hints(cls).items():
        if key in values:
            check_value(values[key], list[annotation] if swept else annotation, f"{where} {prefix}{key}")


def check_value(value: Any, annotation: Any, what: str) -> None:
    rule = _rule(annotation)
    if not rule.fits(value):
        raise ValueError(f"{what} = {value!r}: expected {rule.one}")


def _rule(annotation: Any) -> _Rule:
    """The check for ``annotation``, built from the whole annotation whatever the value: a form not handled
    here raises, so a config field of a new form fails the test that checks every field's default, instead
    of going unchecked."""
    if annotation is Any:
        return _Rule(lambda v: True, "any value", "any values")
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        # None is allowed but not named: TOML has no null, so a recipe never writes one (it leaves the key out).
        options = [_rule(arg) for arg in args if arg is not type(None)]
        nullable = len(options) < len(args)
        return _Rule(lambda v: (nullable and v is None) or any(option.fits(v) for option in options),
                     " or ".join(option.one for option in options), " or ".join(option.many for option in options))
    if origin in (list, collections.abc.Sequence) and len(args) == 1:  # a TOML array (a tuple from Python), not a str
        item = _rule(args[0])
        return _Rule(lambda v: isinstance(v, (list, tuple)) and all(item.fits(x) for x in v),
                     f"an array of {item.many}", f"arrays of {item.many}")
    if origin is dict and len(args) == 2 and args[0] is str:  # a TOML table (whose keys are always strings)
        entry = _rule(args[1])
        return _Rule(lambda v: isinstance(v, Mapping) and all(entry.fits(x) for x in v.values()),
                     f"a table of {entry.many}", f"tables of {entry.many}")
    raise TypeError(f"recipes cannot check a field annotated {annotation!r}: teach unipt.pipelines._field_types")
