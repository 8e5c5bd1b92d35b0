"""Typed, documented options: one definition shared by merge operators and training methods.

A :class:`Param` names an option, its type, default and domain, and checks a value against them. The
operator registry (:mod:`merge.ops.registry`) declares each operator's parameters with it, and the
training-method registry (:mod:`merge.train.registry`) each method's options, so both are checked the
same way before any work, listed the same way (``--list-methods``), and turned into command-line flags
by the CLI from the declarations alone.

Example:
    >>> from merge.params import Param
    >>> Param("density", 1.0, low=0.0, high=1.0).check("0.5", method="ties")
    0.5
    >>> Param("by", "nll", str, choices=("nll", "acc")).check("acc", method="hyper-deep")
    'acc'
    >>> gradient_value([0.0, 0.5, 1.0], 0.75)  # a gradient over the layers, at 3/4 of the way
    0.75
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merge.errors import InvalidArgumentError

__all__ = ["REQUIRED", "Param", "Gradient", "gradient_value"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Param:
    """One typed option of an operator or a training method.

    Attributes:
        name: as written in recipes and Python (``density``, ``lambda``, ``t``, ``every``).
        default: its value when not given, :data:`REQUIRED`, or None where the method chooses it from the
            job (``help`` then says how, e.g. PAPA's alpha: 0.99 from scratch, 0.9995 pretrained).
        kind: ``float``, ``int``, ``bool`` or ``str``.
        per_member: may differ per member (``weight``); otherwise shared by all.
        low, high: inclusive bounds of a number's domain (None: unbounded).
        choices: the values a ``str`` option takes.
        help: one line for ``--list-methods``, ``--help`` and errors.
    """

    name: str
    default: object
    kind: type = float
    per_member: bool = False
    low: float | None = None
    high: float | None = None
    help: str = ""
    choices: tuple[str, ...] = ()

    def check(self, value: object, *, method: str, member: int | None = None) -> object:
        """``value`` converted to ``kind`` and checked against the domain.

        Raises:
            InvalidArgumentError: wrong type or out of the domain; names the parameter (and member).
        """
        who = f" of member {member}" if member is not None else ""
        where = f"method {method!r}: parameter {self.name}{who}"
        if self.kind is str:
            if isinstance(value, str) and (not self.choices or value in self.choices):
                return value
            allowed = " or ".join(self.choices) if self.choices else "a string"
            raise InvalidArgumentError(f"{where} must be {allowed}, got {value!r}", member=member, option=self.name,
                                       choices=self.choices)
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise InvalidArgumentError(f"{where} must be true or false, got {value!r}", member=member,
                                       option=self.name)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidArgumentError(f"{where} must be a number, got {value!r}", member=member, option=self.name)
        try:
            number = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{where} must be a number, got {_shown(value)}", member=member,
                                       option=self.name) from None
        except OverflowError:  # an integer past float's range (10**400)
            raise InvalidArgumentError(f"{where} must be a number within float range, got an integer of "
                                       f"{len(str(abs(value))) if abs(value) < 10 ** 4000 else 'over 4000'} digits",
                                       member=member, option=self.name) from None
        if not math.isfinite(number):
            raise InvalidArgumentError(f"{where} must be finite, got {value!r}", member=member, option=self.name)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise InvalidArgumentError(f"{where} must be in [{lo}, {hi}], got {value!r}", member=member,
                                       option=self.name)
        if self.kind is int:
            if number != int(number):
                raise InvalidArgumentError(f"{where} must be an integer, got {value!r}", member=member,
                                           option=self.name)
            return int(number)
        return number

    def describe_default(self) -> str:
        """The default as ``--list-methods`` shows it (``required``; ``per job`` where the method chooses)."""
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return "per job"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


class Gradient(list):
    """A parameter's values over the layers (mergekit's gradient list), for every member.

    A plain list already means a gradient for a parameter shared by all members (``t``, ``lambda``); for a
    per-member parameter a plain list gives one value per member, so a gradient that every member follows is
    written ``Gradient([0.3, 0.7])`` (``papa-merge soup --param density=0.3,0.7``).

    Example:
        >>> Gradient([0.3, 0.7])
        Gradient([0.3, 0.7])
    """

    def __repr__(self) -> str:
        return f"Gradient({list(self)!r})"


def gradient_value(value: object, t: float) -> object:
    """A gradient's value at position ``t`` in [0, 1] over the layers, as mergekit 0.1.5 evaluates it
    (``mergekit/config.py``: ``evaluate_setting``); anything but a list is returned as is.

    Numbers are interpolated linearly between the anchors around ``t * (len - 1)``; a list holding words or
    booleans picks ``value[int(t * (len - 1))]``.

    Example:
        >>> gradient_value([0.0, 0.5, 0.3, 0.7, 1.0], 0.5), gradient_value(["a", "b"], 0.9)
        (0.3, 'a')
    """
    if not isinstance(value, list):
        return value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 10,000-character string stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
