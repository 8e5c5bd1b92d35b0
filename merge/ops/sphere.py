"""Operators computed from the members' Gram matrix: SLERP, multi-SLERP, Karcher mean, model stock.

Each needs only norms and dot products of whole tensors, then a linear combination. The engine
computes the Gram matrix (float64) in a first pass, chunk by chunk, holding a bounded tile of
members at a time; the functions here turn it into coefficients, following mergekit v0.1.5
(``slerp.py``, ``multislerp.py``, ``karcher.py``, ``model_stock.py``), and the engine streams the
combination in a second pass.
"""

from __future__ import annotations

import math

from merge.backend.lazy import lazy_torch

from merge.errors import InvalidArgumentError
from merge.ops.registry import Combination, Operator, Param, REQUIRED, Resolved, register, weight_param

torch = lazy_torch(__name__)

__all__ = ["slerp_coefficients", "multislerp_coefficients", "karcher_coefficients", "model_stock_coefficients"]


def _norms(gram: torch.Tensor) -> list[float]:
    return [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(gram.shape[0])]


def _quad(gram: torch.Tensor, a: list[float], b: list[float] | None = None) -> float:
    """``a^T G b`` in float64."""
    va = torch.tensor(a, dtype=torch.float64)
    vb = va if b is None else torch.tensor(b, dtype=torch.float64)
    return float(va @ gram.to(torch.float64) @ vb)


def slerp_coefficients(gram: torch.Tensor, resolved: Resolved, has_base: bool = True,
                       dot_threshold: float = 0.9995, eps: float = 1e-8) -> Combination:
    """Spherical interpolation from the base (``t = 0``) to the member (``t = 1``).

    As mergekit's ``slerp``: vectors are not normalised in the result; the angle comes from the
    normalised dot product; nearly colinear or antipodal pairs (``|cos| > 0.9995``) fall back to
    linear interpolation.
    """
    t = float(resolved.shared["t"])
    na, nb = _norms(gram)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(1.0, max(-1.0, float(gram[0, 1]) / na / nb))
    if abs(dot) > dot_threshold:
        return Combination([t], base_coefficient=1 - t, note="colinear: linear interpolation")
    theta = math.acos(dot)
    s = math.sin(theta)
    return Combination([math.sin(t * theta) / s], base_coefficient=math.sin((1 - t) * theta) / s)


def multislerp_coefficients(gram: torch.Tensor, resolved: Resolved, has_base: bool = False) -> Combination:
    """Barycentric interpolation on the hypersphere around the base (mergekit's ``multislerp``).

    mergekit projects the unit vectors onto the tangent space at their normalised weighted mean,
    averages there and maps back with the exponential map. The weighted average of those tangent
    vectors is zero (``sum_i w_i (u_i - <u_i, m> m) = |mean| m - |mean| m``), so the map returns the
    normalised mean itself, scaled by the weighted mean norm: that is what is computed here, in
    closed form. mergekit evaluates the zero tangent in floating point, which leaves its result
    different from this one by rounding noise only.
    """
    w = [float(x) for x in resolved.member("weight")]
    eps = float(resolved.shared.get("eps", 1e-8))
    n = len(w)
    if n == 1:
        return Combination([1.0], note="one member: returned as is")
    if resolved.shared.get("normalize_weights", True):
        total = sum(w)
        w = [x / total for x in w]
    norms = _norms(gram)
    a = [wi / (ni + eps) for wi, ni in zip(w, norms)]
    mean_norm = math.sqrt(max(_quad(gram, a), 0.0))
    if mean_norm < eps:
        if n == 2:
            return Combination(w, delta=has_base, note="antipodal pair: linear interpolation")
        raise InvalidArgumentError("multislerp: the weighted sum of the members' unit vectors is zero (antipodal "
                                   "members whose weights cancel); use other weights", option="weight")
    avg_norm = sum(wi * ni for wi, ni in zip(w, norms))
    return Combination([ai / mean_norm * avg_norm for ai in a], delta=has_base)


def karcher_coefficients(gram: torch.Tensor, resolved: Resolved, has_base: bool = False) -> Combination:
    """The weighted Karcher (Riemannian) mean on the unit hypersphere, scaled by the mean norm.

    mergekit's ``karcher`` iterates on whole tensors; every iterate is a linear combination of the
    members' unit vectors, so the same iteration runs here on coefficients, with dot products taken
    from the Gram matrix (in float64: mergekit iterates in float32).
    """
    max_iter = int(resolved.shared.get("max_iter", 10))
    tol = float(resolved.shared.get("tol", 1e-5))
    m = gram.shape[0]
    if m == 1:
        return Combination([1.0])
    norms = _norms(gram)
    alphas = [1.0 / m] * m
    valid = [i for i in range(m) if norms[i] > tol]
    if not valid:
        return Combination([0.0] * m, note="all members near zero")
    total = sum(alphas[i] for i in valid)
    alpha = {i: alphas[i] / total for i in valid}
    a = [0.0] * m
    for i in valid:
        a[i] += alpha[i] / norms[i]
    mn = math.sqrt(max(_quad(gram, a), 0.0))
    if mn < tol:
        a = [0.0] * m
        a[valid[0]] = 1.0 / norms[valid[0]]
    else:
        a = [x / mn for x in a]
    g = gram.to(torch.float64)
    for _ in range(max_iter):
        ga = (g @ torch.tensor(a, dtype=torch.float64)).tolist()
        tangent = [0.0] * m
        for i in valid:
            dot = min(1.0, max(-1.0, ga[i] / norms[i]))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = alpha[i] * theta / math.sin(theta)
            tangent[i] += f / norms[i]
            tangent = [tj - f * dot * aj for tj, aj in zip(tangent, a)]
        tn = math.sqrt(max(_quad(gram, tangent), 0.0))
        if tn < tol:
            break
        a = [math.cos(tn) * aj + math.sin(tn) * tj / tn for aj, tj in zip(a, tangent)]
        un = math.sqrt(max(_quad(gram, a), 0.0))
        if un > tol:
            a = [x / un for x in a]
    scale = sum(al * nm for al, nm in zip(alphas, norms))
    return Combination([scale * x for x in a])


def model_stock_coefficients(gram: torch.Tensor, resolved: Resolved, has_base: bool = True) -> Combination:
    """Model stock: interpolate between the base and the members' average by ``t = N cos / (1 + (N-1) cos)``.

    ``cos`` is the mean over pairs of the cosine between the members' offsets from the base (each
    clamped to [-1, 1], norm products below 1e-6 taken as 1e-6); where ``|1 + (N-1) cos| < 1e-6``
    the base is kept, as in mergekit. (``filter_wise``: one ``t`` per row, :class:`ModelStockRows`.)
    """
    n = gram.shape[0]
    norms = _norms(gram)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = max(norms[i] * norms[j], 1e-6)
            cos.append(min(1.0, max(-1.0, float(gram[i, j]) / prod)))
    c = sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return Combination([t / n] * n, base_coefficient=1 - t, note=f"t={t:.6g}")


class ModelStockRowsSpec:
    """The ``task``-path recipe of model stock with ``filter_wise`` (the engine asks :meth:`tensor`)."""

    sparsify = None

    def tensor(self, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
               name: str = "", method: str = "") -> ModelStockRows:
        return ModelStockRows(self, resolved, shape, dtype)


class ModelStockRows:
    """Model stock with one ratio per row (mergekit's ``filter_wise``): rows are the vectors along the last
    dimension (a 1-d tensor is one row), each with ``t = N cos / (1 + (N-1) cos)`` from the mean cosine over
    pairs of the members' offsets in that row; ``base + t * mean_i (x_i - base)``.

    Flat in the member count: pass ``k`` holds member ``k``'s offsets (one whole tensor) and reads each later
    member once for the row dot products with it, so the pairs take ``N (N - 1) / 2`` reads of a member
    rather than all members in memory; chunks hold whole rows (``unit`` is the row length).
    """

    def __init__(self, spec: ModelStockRowsSpec, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.numel = math.prod(tuple(shape))
        self.row = max(1, shape[-1]) if len(shape) else 1
        self.rows = self.numel // self.row
        self.unit = self.row
        self.n = len(resolved.members)
        self.held: torch.Tensor | None = None
        self._held_sq: torch.Tensor | None = None
        self._dot: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._cos: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.extra_bytes = self.numel * torch.empty(0, dtype=dtype).element_size() + self.rows * 8 * 6

    def stat_passes(self) -> list[tuple[str, list[int]]]:
        passes = []
        for k in range(self.n - 1):
            passes += [(f"hold{k}", [k]), (f"dot{k}", list(range(k + 1, self.n)))]
        return passes

    def stat_begin(self, kind: str, i: int) -> None:
        pass

    def _row_sums(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per row (of the chunk, whole rows) the float64 sum of ``a * b``."""
        return (a * b).reshape(-1, self.row).sum(dim=1, dtype=torch.float64)

    def stat_chunk(self, kind: str, i: int, d: torch.Tensor, start: int) -> bool:
        end, r0, r1 = start + d.numel(), start // self.row, (start + d.numel()) // self.row
        if self._cos is None:
            z = lambda: torch.zeros(self.rows, dtype=torch.float64, device=d.device)  # noqa: E731
            self._cos, self._held_sq, self._dot, self._sq = z(), z(), z(), z()
            self.held = torch.empty(self.numel, dtype=self.dtype, device=d.device)
        if kind.startswith("hold"):
            self.held[start:end] = d
            self._held_sq[r0:r1] = self._row_sums(d, d)
        else:
            self._dot[r0:r1] = self._row_sums(self.held[start:end], d)
            self._sq[r0:r1] = self._row_sums(d, d)
        return math.isfinite(float(d.sum()))

    def stat_end(self, kind: str, i: int) -> None:
        if not kind.startswith("dot"):
            return
        # as mergekit: dot / max(|a| |b|, 1e-6), clamped to [-1, 1]
        prod = (self._held_sq.sqrt() * self._sq.sqrt()).clamp_(min=1e-6)
        self._cos.add_((self._dot / prod).clamp_(-1, 1))
        if int(kind[3:]) == self.n - 2:  # the last pair: one t per row
            c = self._cos / (self.n * (self.n - 1) // 2)
            den = 1 + (self.n - 1) * c
            singular = den.abs() < 1e-6
            self.t = torch.where(singular, torch.zeros_like(c), self.n * c / torch.where(singular, 1.0, den))
            self.held = self._cos = self._dot = self._sq = self._held_sq = None

    def begin_chunk(self, count: int, device: torch.device) -> dict:
        return {"S": torch.zeros(count, dtype=self.dtype, device=device), "start": 0}

    def add_member(self, state: dict, i: int, d: torch.Tensor, start: int) -> None:
        state["S"].add_(d)
        state["start"] = start

    def finish_chunk(self, state: dict, base: torch.Tensor) -> torch.Tensor:
        s = state["S"]
        r0 = state["start"] // self.row
        t = self.t[r0: r0 + s.numel() // self.row].to(device=s.device, dtype=self.dtype)
        mean = s.div_(self.n).reshape(-1, self.row)
        return mean.mul_(t.unsqueeze(1)).reshape(-1).add_(base)


_MODEL_STOCK_ROWS = ModelStockRowsSpec()


register(Operator(
    "slerp", "Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); mergekit slerp",
    "spherical interpolation between the base (t=0) and one member (t=1)", "gram", base="required",
    params=(Param("t", REQUIRED, float, help="interpolation factor, 0 = base, 1 = member"),),
    min_members=1, max_members=1, gram_of="raw", from_gram=slerp_coefficients,
    differences="angle from a float64 Gram matrix (mergekit: float32 chunked norms)"))
register(Operator(
    "multislerp", "Goddard 2025, Multi-SLERP (mergekit multislerp); barycentric interpolation on the hypersphere",
    "weighted interpolation of several members on the hypersphere (around the base, if given)", "gram",
    base="optional",
    params=(weight_param(), Param("normalize_weights", True, bool, help="scale weights to sum to one"),
            Param("eps", 1e-8, float, low=0.0, help="numerical floor of norms")),
    min_members=1, gram_of="delta", from_gram=multislerp_coefficients,
    differences="closed form of the exponential map of a zero tangent (mergekit evaluates it in floating point)"))
register(Operator(
    "karcher", "Karcher 1977, Riemannian center of mass; mergekit karcher (arXiv 2603.04972)",
    "iterative Riemannian mean of the members on the hypersphere, scaled by their mean norm", "gram",
    params=(Param("max_iter", 10, int, low=0, help="iterations"),
            Param("tol", 1e-5, float, low=0.0, help="convergence tolerance")),
    min_members=1, gram_of="raw", from_gram=karcher_coefficients,
    differences="iterates on coefficients in float64 (mergekit: on tensors in float32)"))
register(Operator(
    "model_stock", "Jang et al. 2024, Model Stock: all we need is just a few fine-tuned models (ECCV); "
    "mergekit model_stock",
    "average of the members pulled toward the base by the angle between their offsets", "gram",
    base="required", params=(Param("filter_wise", False, bool, help="one ratio per row (vectors along the last "
                                                                      "dimension) rather than per tensor"),),
    min_members=2, gram_of="delta", from_gram=model_stock_coefficients, task=_MODEL_STOCK_ROWS,
    path_for=lambda resolved: "task" if resolved.shared.get("filter_wise") else "gram",
    differences="cosines from a float64 Gram matrix (per row with filter_wise: float64 row sums, the pairs "
                "taken one held member at a time, N(N-1)/2 reads of a member); the result as base + t * mean "
                "offset (mergekit: t * mean + (1 - t) * base), the same up to rounding"))
