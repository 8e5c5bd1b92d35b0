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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merge.errors import InvalidArgumentError

__all__ = ["REQUIRED", "Param"]


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


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 10,000-character string stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
