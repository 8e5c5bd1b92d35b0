"""Per-tensor merge operators and their registry.

An operator is a pure function of the members' tensors of one name (no I/O, no state), registered
under a name that works the same in the CLI (``--method``), in Python and in the tests, which are
generated from this registry. Variants are parameters, not copies.

Each operator declares how the engine may stream it:

- ``linear``: the result is ``(sum_i c_i * x_i) / d`` with coefficients ``c`` and divisor ``d`` that
  depend only on the weights (uniform and weighted soups, PAPA's final average, the subspace
  midpoint, task arithmetic). The engine folds members one at a time into a float32/float64
  accumulator, chunk by chunk, so memory does not grow with the number of members. Dividing once
  at the end (rather than scaling each member by 1/N) keeps integer weights exact: a soup of
  identical bf16 members returns them bit for bit.
- ``elementwise``: the result at each element depends only on the members' values at that element;
  the engine may cut tensors into chunks but needs every member's chunk at once.
- ``tensor``: the operator needs whole tensors (TIES's magnitude threshold, SLERP's angle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from merge.errors import InvalidArgumentError, UnknownNameError

__all__ = ["Operator", "register", "get_operator", "list_operators", "OPERATORS", "normalised_weights",
           "linear_combination", "check_weights"]

Scope = Literal["linear", "elementwise", "tensor"]


@dataclass(frozen=True)
class Operator:
    """A registered merge operator.

    Attributes:
        name: registry key.
        fn: ``fn(tensors, weights) -> tensor``, the reference definition on whole tensors; the result
            has the dtype of the inputs (callers pass float32/float64 tensors).
        scope: how the engine may stream it (see the module docstring).
        coefficients: for linear operators, ``coefficients(weights) -> (c, d)`` with result
            ``(sum_i c_i x_i) / d``.
        citation: the paper that defines it.
        min_members: fewest members it accepts.
    """

    name: str
    fn: Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
    scope: Scope
    citation: str
    coefficients: Callable[[Sequence[float]], tuple[list[float], float]] | None = None
    min_members: int = 1

    def __call__(self, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
        weights = check_weights(weights, len(tensors))
        return self.fn(tensors, weights)


OPERATORS: dict[str, Operator] = {}


def register(name: str, *, scope: Scope, citation: str,
             coefficients: Callable[[Sequence[float]], tuple[list[float], float]] | None = None,
             min_members: int = 1) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as operator ``name``."""
    if scope == "linear" and coefficients is None:
        raise ValueError(f"linear operator {name!r} needs coefficients")

    def deco(fn: Callable) -> Callable:
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} registered twice")
        OPERATORS[name] = Operator(name, fn, scope, citation, coefficients, min_members)
        return fn

    return deco


def get_operator(name: str) -> Operator:
    """The operator registered as ``name``.

    Raises:
        UnknownNameError: no such operator; the message lists the valid names.
    """
    try:
        return OPERATORS[name]
    except KeyError:
        raise UnknownNameError("method", name, list(OPERATORS)) from None


def list_operators() -> list[str]:
    return sorted(OPERATORS)


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-member weights as floats (ones when None), checked against the member count."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise InvalidArgumentError(f"got {len(w)} weights for {n} members; give one weight per member "
                                   "(a file listed twice needs two weights)")
    if any(x != x or x in (float("inf"), float("-inf")) for x in w):
        raise InvalidArgumentError(f"weights must be finite numbers, got {w}")
    return w


def normalised_weights(weights: Sequence[float]) -> tuple[list[float], float]:
    """``(weights, sum(weights))``: a weighted mean; weights must be non-negative with a positive sum."""
    if any(x < 0 for x in weights):
        raise InvalidArgumentError(f"weights of an average must be non-negative, got {list(weights)}")
    total = sum(weights)
    if total <= 0:
        raise InvalidArgumentError(f"weights must have a positive sum, got {list(weights)}")
    return list(weights), total


def linear_combination(tensors: Sequence[torch.Tensor], coefficients: tuple[Sequence[float], float]) -> torch.Tensor:
    """``(sum_i c_i x_i) / d`` in the tensors' dtype, folded in member order exactly as the engine does."""
    c, d = coefficients
    out = tensors[0] * c[0] if c[0] != 1 else tensors[0].clone()
    for ci, t in zip(c[1:], tensors[1:]):
        out.add_(t, alpha=ci)
    return out.div_(d) if d != 1 else out


def _uniform_coefficients(weights: Sequence[float]) -> tuple[list[float], float]:
    return [1.0] * len(weights), float(len(weights))


@register("uniform", scope="linear", coefficients=_uniform_coefficients,
          citation="Wortsman et al. 2022, Model soups (uniform soup); also PAPA's final population average")
def uniform(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The plain mean of the members (weights are ignored: use ``weighted`` for those)."""
    return linear_combination(tensors, _uniform_coefficients(weights))


@register("weighted", scope="linear", coefficients=normalised_weights,
          citation="Wortsman et al. 2022, Model soups; Matena & Raffel 2022 (weighted parameter averaging)")
def weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i``: a weighted mean (weights need not sum to one)."""
    return linear_combination(tensors, normalised_weights(weights))
