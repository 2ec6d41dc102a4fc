"""Typed, ranged settings: the one check that config dataclasses and the CLI's numeric options share.

A config states each field's type in its annotation and its range in a `rules` class dict;
`check_fields` checks every field before any work is done, so `--set steps=20.5` fails at once with
one line instead of a TypeError after the expensive phases. `option_type` makes an argparse
`type=` from the same rule, so an option and the config field it fills never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass

from .errors import SocoError


@dataclass(frozen=True)
class Rule:
    """The values a setting may take besides its type: a range (each end open or closed) or choices.
    For a list setting the rule applies to every item."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    note: str = ""  # what the setting means, said after the range

    def allows(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        def num(x: float) -> str:  # 4294967295, not 4.29497e+09
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.choices:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{num(self.low)}, {num(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {num(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {num(self.high)}"
        return text + (f", {self.note}" if self.note else "")


def at_least(low: float, note: str = "") -> Rule:
    return Rule(low=low, note=note)


def above(low: float, note: str = "") -> Rule:
    return Rule(low=low, low_open=True, note=note)


def between(low: float, high: float, low_open: bool = False, high_open: bool = False, note: str = "") -> Rule:
    return Rule(low, high, low_open, high_open, note=note)


def one_of(*choices) -> Rule:
    return Rule(choices=choices)


SEED = between(0, 2**32 - 1)  # what torch's and Python's generators take from every caller alike


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def has_type(value, tp) -> bool:
    """Strict: bool is not an int, a float must be finite, a string non-empty, a list's items are checked."""
    if tp is typing.Any:
        return True
    if _is_union(tp):
        return any(has_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a float setting's value too: JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str) and value != ""
    if typing.get_origin(tp) is list:
        item = (typing.get_args(tp) or (typing.Any,))[0]
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    return isinstance(value, tp) if isinstance(tp, type) else True  # an annotation this check cannot read


_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          bool: ("true or false", "true/false values"), str: ("a non-empty string", "non-empty strings")}


def type_name(tp, plural: bool = False) -> str:
    if _is_union(tp):
        args = typing.get_args(tp)
        text = " or ".join(type_name(a, plural) for a in args if a is not type(None))
        return text + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is list:
        return f"a list of {type_name((typing.get_args(tp) or (typing.Any,))[0], plural=True)}"
    if tp in _NAMES:
        return _NAMES[tp][plural]
    return getattr(tp, "__name__", str(tp))


def problem(value, tp, rule: Rule | None = None) -> str | None:
    """What is wrong with `value` ("must be an integer >= 1; got 0"), or None when it is fine."""
    if not has_type(value, tp):
        return f"must be {type_name(tp)}; got {value!r}"
    items = value if isinstance(value, list) else [value]
    if rule is not None and any(v is not None and not rule.allows(v) for v in items):
        if rule.choices:
            return f"must be {rule.describe()}; got {value!r}"
        plain = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        # "an integer >= 1" (not "... or null >= 1"); a float's range says enough: "in (0, 1)", "> 0"
        kind = "" if plain == [float] else (type_name(plain[0]) if len(plain) == 1 else "a value") + " "
        return f"must be {kind}{rule.describe()}; got {value!r}"
    return None


def check(name: str, value, tp, rule: Rule | None = None) -> None:
    """Raise SocoError("NAME must be ...; got ...") when `value` does not fit."""
    wrong = problem(value, tp, rule)
    if wrong:
        raise SocoError(f"{name} {wrong}")


def class_rules(cls: type) -> dict[str, Rule]:
    """`rules` of a class and its bases, a subclass's entry replacing its base's."""
    out: dict[str, Rule] = {}
    for c in reversed(cls.__mro__):
        out.update(c.__dict__.get("rules", {}))
    return out


def check_fields(obj, prefix: str = "") -> None:
    """Check every dataclass field of `obj` against its annotation and its class's `rules`."""
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # an annotation that does not resolve (a user's config): check the ranges only
        hints = {}
    rules = class_rules(type(obj))
    for f in dataclasses.fields(obj):
        check(f"{prefix}{f.name}", getattr(obj, f.name), hints.get(f.name, typing.Any), rules.get(f.name))


def option_type(tp: type, rule: Rule | None = None, name: str = ""):
    """An argparse `type=` that parses `tp` and applies `rule`; a bad value is argparse's one-line error."""

    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name + ' ' if name else ''}must be {type_name(tp)}; "
                                             f"got {text!r}") from None
        wrong = problem(value, tp, rule)
        if wrong:
            raise argparse.ArgumentTypeError(f"{name + ' ' if name else ''}{wrong}")
        return value

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its messages
    return parse
