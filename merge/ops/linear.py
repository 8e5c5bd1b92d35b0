"""Averages: the uniform and the weighted soup (``linear`` in mergekit's vocabulary)."""

from __future__ import annotations

from merge.errors import InvalidArgumentError
from merge.ops.registry import Combination, Operator, Param, Resolved, normalised_weights, register, weight_param

__all__ = ["uniform_combination", "weighted_combination"]


def uniform_combination(resolved: Resolved) -> Combination:
    return Combination(normalised_weights([1.0] * len(resolved.members)))


def weighted_combination(resolved: Resolved) -> Combination:
    w = [float(x) for x in resolved.member("weight")]
    if resolved.shared.get("normalize", True):
        return Combination(normalised_weights(w))
    if not w:
        raise InvalidArgumentError("no members to combine")
    return Combination(w)


register(Operator(
    "uniform", "Wortsman et al. 2022, Model soups (uniform soup); also PAPA's final population average",
    "the plain mean of the members", "linear", combine=uniform_combination))
register(Operator(
    "weighted", "Wortsman et al. 2022, Model soups; Matena & Raffel 2022 (weighted parameter averaging); "
    "mergekit linear", "sum_i w_i x_i / sum_i w_i (weights need not sum to one)", "linear",
    params=(weight_param(), Param("normalize", True, bool, help="divide by the sum of the weights")),
    combine=weighted_combination, aliases=("linear",),
    differences="weights are normalised in float64 before use and must be non-negative (mergekit allows any "
                "weights with a non-zero sum)"))
