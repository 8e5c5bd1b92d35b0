"""Merges that use data: the per-tensor mathematics of RegMean, Fisher merging and AdaMerging.

What each member computes on data (its input Gram matrices, its diagonal Fisher, the learned
coefficients) is gathered by :mod:`merge.datamerge`, which runs the members' model on a few batches;
the functions here are pure functions of one tensor name's member tensors and those extra tensors,
in float64, so the streaming engine can apply them one tensor at a time.

- RegMean (Jin et al., ICLR 2023, ``bloomberg/dataless-model-merging``, ``avg_merger.py``
  ``regmean_mean_params``): for a linear layer, the weight that minimises the summed squared
  difference of its outputs from each member's on that member's inputs,
  ``W* = (sum_i G_i)^-1 sum_i G_i W_i`` in the reference's orientation (``W_i`` transposed for
  ``nn.Linear``, as stored for Hugging Face's ``Conv1D``), ``G_i`` the mean of ``x x^T`` over the
  member's inputs, its off-diagonal entries scaled by ``alpha`` (the reference's ``reduce_non_diag``).
- Fisher merging (Matena & Raffel, NeurIPS 2022, ``mmatena/model_merging``, ``merging.py``):
  ``sum_i w_i F_i x_i / sum_i w_i F_i`` elementwise, each diagonal Fisher floored at ``fisher_floor``.
- AdaMerging (Yang et al., ICLR 2024, ``EnnengYang/AdaMerging``): ``base + sum_i lambda_i (x_i - base)``
  with the coefficients learned for this tensor (layer-wise) or for the member (task-wise).
"""

from __future__ import annotations

from collections.abc import Sequence

from merge.errors import InvalidArgumentError
from merge.backend.lazy import lazy_torch
from merge.ops.registry import Combination, Operator, Param, Resolved, normalised_weights, register, weight_param

torch = lazy_torch(__name__)

__all__ = ["REGMEAN_CITATION", "FISHER_CITATION", "ADAMERGING_CITATION", "reduce_off_diagonal", "regmean_solve",
           "fisher_average", "coefficient_combination", "regmean_tensor", "fisher_tensor", "adamerging_combination"]

REGMEAN_CITATION = ("Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (ICLR); "
                    "code: bloomberg/dataless-model-merging")
FISHER_CITATION = ("Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS); "
                   "code: mmatena/model_merging")
ADAMERGING_CITATION = ("Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning (ICLR); "
                       "code: EnnengYang/AdaMerging")


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``gram`` with its off-diagonal entries scaled by ``alpha`` (the reference's ``reduce_non_diag(cov, a)``:
    ``cov * (diag(1 - a) + a)``); ``alpha = 1`` leaves it as it is, ``alpha = 0`` keeps the diagonal alone."""
    if alpha == 1.0:
        return gram
    scale = torch.full_like(gram, float(alpha))
    scale.diagonal().fill_(1.0)
    return gram * scale


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], *, alpha: float = 1.0,
                  transposed: bool = False, member_weights: Sequence[float] | None = None) -> torch.Tensor:
    """RegMean's closed form for one linear layer, in float64.

    Args:
        weights: each member's weight: ``[out, in]`` as ``nn.Linear`` stores it, or ``[in, out]``
            (``transposed``, as Hugging Face's ``Conv1D`` stores it).
        grams: each member's input Gram matrix ``[in, in]`` (the mean of ``x x^T`` over its inputs).
        alpha: scale of the off-diagonal Gram entries (1: the exact least-squares solution).
        transposed: the weights are stored ``[in, out]``.
        member_weights: scale of each member's Gram matrix (the reference's ``model_coeffs * n``); None: ones.

    Returns:
        The merged weight, shaped and oriented as the members', in float64.

    Where ``sum_i G_i`` is singular (an input feature no member's data ever excites), the weight's
    component along the null space is undetermined by the objective; it is taken from the
    (``member_weights``-weighted) average of the members, so the result is the least-squares solution
    nearest the average. The reference inverts the sum with ``torch.inverse``, which fails or returns
    infinities there; where the sum is invertible both give the same solution.

    Raises:
        InvalidArgumentError: shapes that do not fit.
    """
    if not weights or len(weights) != len(grams):
        raise InvalidArgumentError(f"regmean: got {len(weights)} weights and {len(grams)} Gram matrices; give one "
                                   "Gram matrix per member")
    c = [1.0] * len(weights) if member_weights is None else [float(x) for x in member_weights]
    # The reference's orientation: W^T [in, out] for nn.Linear, the stored weight for Conv1D.
    ws = [(w if transposed else w.T).to(torch.float64) for w in weights]
    d = ws[0].shape[0]
    total = torch.zeros(d, d, dtype=torch.float64, device=ws[0].device)
    rhs = torch.zeros_like(ws[0])
    mean = torch.zeros_like(ws[0])
    for ci, w, g in zip(c, ws, grams):
        if tuple(g.shape) != (d, d) or w.shape != ws[0].shape:
            raise InvalidArgumentError(f"regmean: a Gram matrix of shape {tuple(g.shape)} does not fit a weight of "
                                       f"{tuple(w.shape)} inputs x outputs; expected ({d}, {d})")
        g = reduce_off_diagonal(g.to(device=w.device, dtype=torch.float64), alpha) * ci
        total += g
        rhs += g @ w
        mean += ci * w
    mean /= sum(c)
    # The eigendecomposition of the symmetric sum solves it where it is invertible and exposes its null space.
    total = (total + total.T) / 2
    evals, evecs = torch.linalg.eigh(total)
    tol = max(float(evals.abs().max()), 0.0) * d * torch.finfo(torch.float64).eps
    keep = evals > tol
    v = evecs[:, keep]
    out = v @ ((v.T @ rhs) / evals[keep].unsqueeze(1))
    if int(keep.sum()) < d:
        out = out + mean - v @ (v.T @ mean)
    return out if transposed else out.T


def fisher_average(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], *, floor: float = 1e-6,
                   member_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Fisher-weighted average, elementwise, in float64: ``sum_i w_i F_i x_i / sum_i w_i F_i``.

    Each member's diagonal Fisher is floored at ``floor`` first (``max(F_i, floor)``, the reference's
    ``fisher_floor``), so elements no member's data is sensitive to fall back to the weighted mean.

    Raises:
        InvalidArgumentError: a Fisher whose shape is not its tensor's, or no positive member weight.
    """
    c = [1.0] * len(tensors) if member_weights is None else [float(x) for x in member_weights]
    if not tensors or len(fishers) != len(tensors) or not sum(c) > 0:
        raise InvalidArgumentError(f"fisher: got {len(tensors)} tensors, {len(fishers)} Fisher diagonals and weights "
                                   f"{c}; give one Fisher per member and a positive weight")
    num = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    den = torch.zeros_like(num)
    for ci, x, f in zip(c, tensors, fishers):
        if f.shape != x.shape:
            raise InvalidArgumentError(f"fisher: a Fisher of shape {tuple(f.shape)} for a tensor of "
                                       f"{tuple(x.shape)}")
        f = f.to(device=num.device, dtype=torch.float64).clamp(min=floor) * ci
        num += f * x.to(torch.float64)
        den += f
    return num / den


def coefficient_combination(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                            coefficients: Sequence[float]) -> torch.Tensor:
    """``base + sum_i c_i (x_i - base)`` in float64: AdaMerging's merge of one tensor with its learned coefficients."""
    if len(coefficients) != len(tensors):
        raise InvalidArgumentError(f"adamerging: {len(coefficients)} coefficients for {len(tensors)} members")
    b = base.to(torch.float64)
    out = b.clone()
    for c, x in zip(coefficients, tensors):
        out += float(c) * (x.to(torch.float64) - b)
    return out


# --- the registered operators ------------------------------------------------------------------------------


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    w = normalised_weights(weights)
    out = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for wi, x in zip(w, tensors):
        out += wi * x.to(torch.float64)
    return out


def _kinds(aux: Sequence[dict | None] | None, kinds: tuple[str, ...]) -> tuple[str, list[torch.Tensor]] | None:
    """The one aux kind of ``kinds`` every member holds for this tensor, with each member's tensor (None: not all)."""
    if not aux:
        return None
    for kind in kinds:
        got = [a.get(kind) if a else None for a in aux]
        if all(g is not None for g in got):
            return kind, got
    return None


def regmean_tensor(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, resolved: Resolved, *, name: str = "",
                   aux: Sequence[dict | None] | None = None) -> torch.Tensor:
    """RegMean for one tensor: the closed form where every member has a Gram matrix for it (``NAME:gram`` for an
    ``[out, in]`` weight, ``NAME:gram_in_out`` for an ``[in, out]`` one), else the (weighted) average."""
    w = [float(x) for x in resolved.member("weight")]
    found = _kinds(aux, ("gram", "gram_in_out")) if tensors[0].dim() == 2 else None
    if found is None:
        return _weighted_mean(tensors, w).to(tensors[0].dtype)
    kind, grams = found
    # The reference scales each member's Gram matrix by model_coeffs[i] * n_models (weights that sum to one).
    scale = [x * len(w) for x in normalised_weights(w)]
    return regmean_solve(tensors, grams, alpha=float(resolved.shared["alpha"]), transposed=kind == "gram_in_out",
                         member_weights=scale).to(tensors[0].dtype)


def fisher_tensor(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, resolved: Resolved, *, name: str = "",
                  aux: Sequence[dict | None] | None = None) -> torch.Tensor:
    """Fisher merging for one tensor where every member has its Fisher (``NAME:fisher``), else the (weighted) average
    (buffers, such as BatchNorm statistics, have no gradient and so no Fisher)."""
    w = [float(x) for x in resolved.member("weight")]
    found = _kinds(aux, ("fisher",))
    if found is None:
        return _weighted_mean(tensors, w).to(tensors[0].dtype)
    return fisher_average(tensors, found[1], floor=float(resolved.shared["fisher_floor"]),
                          member_weights=normalised_weights(w)).to(tensors[0].dtype)


def adamerging_combination(resolved: Resolved) -> Combination:
    """``base + sum_i c_i (x_i - base)`` with this tensor's learned coefficients (the ``coefficient`` parameter)."""
    return Combination([float(c) for c in resolved.member("coefficient")], delta=True)


register(Operator(
    "regmean", REGMEAN_CITATION,
    "per linear layer, the weight whose outputs are closest to every member's on its own inputs (closed form from "
    "each member's input Gram matrix); other tensors averaged", "tensor",
    params=(weight_param(help="scale of each member's Gram matrix (normalised to sum to the member count)"),
            Param("alpha", 1.0, float, low=0.0, high=1.0,
                  help="scale of the Gram matrices' off-diagonal entries (1: exact least squares)")),
    tensor_fn=regmean_tensor, aux="optional", scratch=4,
    data="training batches: each member's input Gram matrices of its linear layers",
    differences="Gram matrices accumulated in float64 with the model in eval mode; where the summed Gram matrix is "
                "singular the null-space component is the members' average (the reference's torch.inverse fails); "
                "nn.Conv1d is averaged (the reference hooks it but reshapes its input as [.., length]); the "
                "classifier head is merged like any linear layer unless the members' heads differ in shape"))

register(Operator(
    "fisher", FISHER_CITATION,
    "each parameter weighted by each member's diagonal Fisher: sum_i F_i x_i / sum_i F_i, elementwise", "tensor",
    params=(weight_param(help="scale of each member's Fisher (the reference's merging coefficients)"),
            Param("fisher_floor", 1e-6, float, low=0.0, help="lower bound of every Fisher element (smoothing)")),
    tensor_fn=fisher_tensor, aux="optional", scratch=3,
    data="training batches: each member's diagonal Fisher of its own predictions",
    differences="the floor is applied to every member (the reference's favor_target_model floors only the first); "
                "Fishers are not normalised by their norm (the reference's merge script's normalize_fishers; the "
                "paper's formula and the RegMean repository's Fisher baseline do not normalise); buffers "
                "(BatchNorm statistics) have no Fisher and are averaged"))

register(Operator(
    "adamerging", ADAMERGING_CITATION,
    "task arithmetic with one coefficient per member per layer (or per member), learned by minimising the merged "
    "model's prediction entropy on unlabeled held-out batches", "linear", base="required",
    params=(Param("coefficient", 0.3, float, per_member=True, low=0.0, high=1.0,
                  help="each member's coefficient (learned per tensor from data; the initial value otherwise)"),
            Param("granularity", "layer", str, choices=("layer", "task"),
                  help="one coefficient per member per tensor (layer), or one per member (task)"),
            Param("steps", 100, int, low=0, help="Adam steps, each one batch per task"),
            Param("lr", 1e-3, float, low=0.0, help="Adam's learning rate"),
            Param("prior", 0.3, float, low=0.0, high=1.0, help="initial coefficient")),
    combine=adamerging_combination,
    data="unlabeled held-out batches: each member's validation split, labels unused",
    differences="BatchNorm running statistics are merged with their layer weight's coefficients (the reference "
                "merges parameters only and keeps the base's buffers); one batch per task per step from a fixed "
                "set, from the validation split (the reference draws two fresh batches of 16 per task per step "
                "from the test split); 100 steps by default "
                "(the reference: 500 on a GPU)"))
