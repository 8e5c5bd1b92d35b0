"""Merges in each layer's singular basis: TSV-M, Iso-C and Iso-CTS (``tensor`` path, base required).

Each works on the task matrices ``x_i - base`` of one 2-D tensor at a time:

- ``tsv`` (Gargiulo et al., CVPR 2025, Task Singular Vectors: Reducing Task Interference in Model
  Merging; code ``AntoAndGar/task_singular_vectors``, ``compute_and_sum_svd_mem_reduction``): each
  task matrix keeps its top ``rank // T`` singular components (T members); the members' left and right
  singular vectors are concatenated and each concatenation replaced by its nearest orthogonal matrix
  (``P Q^T`` from its SVD ``P S Q^T``), which decorrelates the tasks; the result is
  ``U_perp diag(s) V_perp``, scaled by alpha;
- ``iso_c`` (Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces; code ``danielm1405/iso-merging``): the sum of the task matrices with its
  singular values replaced by their mean, scaled by alpha;
- ``iso_cts`` (same paper): the top singular directions of the sum (the common subspace, a fraction of
  the rank) plus, for each member, the top directions of its task matrix once the common subspace is
  projected out; all of them orthogonalised together as TSV-M does, with one singular value, the mean.

Tensors that are not matrices (biases, norms, convolutions) and CLIP's ``text_projection`` are merged as
the references merge them: the mean of the task vectors, scaled by alpha.

SVDs are ``torch.linalg.svd(full_matrices=False)`` in the merge's compute dtype (float32, float64 on
request), on the merge device, as the references take them.

Example:
    >>> import torch
    >>> from merge.ops import get_operator
    >>> base = torch.zeros(3, 3)
    >>> out = get_operator("iso_c")([torch.diag(torch.tensor([3., 1., 2.]))], base=base)
    >>> out.diagonal().tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

from merge.backend.lazy import lazy_torch
from merge.ops.registry import Operator, Param, Resolved, register

torch = lazy_torch(__name__)

__all__ = ["tsv_tensor", "iso_c_tensor", "iso_cts_tensor", "is_matrix", "iso_cts_dimensions"]


def is_matrix(x: torch.Tensor, name: str) -> bool:
    """Whether the references decompose this tensor: 2-D, not empty, and not CLIP's ``text_projection``."""
    return x.dim() == 2 and x.numel() > 0 and "text_projection" not in name


def _mean_task(tensors: list[torch.Tensor], base: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base + alpha * mean_i (x_i - base)``: how the references merge what they do not decompose."""
    acc = tensors[0].sub_(base)
    for x in tensors[1:]:
        acc.add_(x.sub_(base))
    return acc.mul_(alpha / len(tensors)).add_(base)


def _tolerance(s: torch.Tensor, shape: tuple[int, ...], scale: float | None = None) -> float:
    """Singular values at or below this are zero (numpy's ``matrix_rank`` tolerance, relative to the largest
    singular value, or to ``scale`` for a matrix computed from a larger one): their vectors are arbitrary."""
    top = scale if scale is not None else float(s[0]) if s.numel() else 0.0
    return top * max(shape) * torch.finfo(s.dtype).eps


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """``P Q^T`` from ``x = P S Q^T``: the reference's orthogonalisation of the concatenated singular vectors."""
    p, _, qt = _svd(x)
    return p @ qt


class _Components:
    """Kept singular components, concatenated into buffers allocated once: the per-member SVDs' large temporaries
    then come and go without small long-lived pieces between them (which fragment the heap as members grow)."""

    def __init__(self, like: torch.Tensor, width: int):
        m, n = like.shape
        self.u = torch.empty(m, width, dtype=like.dtype, device=like.device)
        self.s = torch.empty(width, dtype=like.dtype, device=like.device)
        self.vt = torch.empty(width, n, dtype=like.dtype, device=like.device)
        self.used = 0

    def add(self, u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, count: int) -> None:
        a, b = self.used, self.used + count
        self.u[:, a:b] = u[:, :count]
        self.s[a:b] = s[:count]
        self.vt[a:b] = vt[:count]
        self.used = b

    def recombine(self, *, isotropic: bool, like: torch.Tensor) -> torch.Tensor:
        """``U_perp diag(s) V_perp`` from the kept components (a zero matrix when none is kept)."""
        k = self.used
        if not k:
            return torch.zeros_like(like)
        u = _nearest_orthogonal(self.u[:, :k])
        vt = _nearest_orthogonal(self.vt[:k])
        s = torch.full_like(self.s[:k], float(self.s[:k].mean())) if isotropic else self.s[:k]
        return (u * s) @ vt


def tsv_tensor(tensors: list[torch.Tensor], base: torch.Tensor, resolved: Resolved, *, name: str,
               aux: object = None) -> torch.Tensor:
    """TSV-M on one tensor (see the module docstring); ``tensors`` are overwritten."""
    alpha = float(resolved.shared["alpha"])
    if not is_matrix(base, name):
        return _mean_task(tensors, base, alpha)
    per_member = max(1, min(base.shape) // len(tensors))  # the reference's rank budget (at least 1: see differences)
    kept = _Components(base, per_member * len(tensors))
    for x in tensors:
        delta = x.sub_(base)
        u, s, vt = _svd(delta)
        kept.add(u, s, vt, int((s[:per_member] > _tolerance(s, delta.shape)).sum()))  # sorted: the kept come first
        del u, s, vt
    merged = kept.recombine(isotropic=False, like=base)
    return merged.mul_(alpha).add_(base)


def iso_c_tensor(tensors: list[torch.Tensor], base: torch.Tensor, resolved: Resolved, *, name: str,
                 aux: object = None) -> torch.Tensor:
    """Iso-C on one tensor (see the module docstring); ``tensors`` are overwritten."""
    alpha = float(resolved.shared["alpha"])
    if not is_matrix(base, name):
        return _mean_task(tensors, base, alpha)
    total = tensors[0].sub_(base)
    for x in tensors[1:]:
        total.add_(x.sub_(base))
    u, s, vt = _svd(total)
    keep = int((s > _tolerance(s, total.shape)).sum())
    if not keep:
        return base.clone()
    flat = float(s[:keep].mean())
    return (u[:, :keep] * (alpha * flat)) @ vt[:keep] + base


def iso_cts_dimensions(rank: int, members: int, common_fraction: float) -> tuple[int, int]:
    """``(common, per_member)`` directions of Iso-CTS: the reference's split, its task-specific part a
    multiple of the member count, capped so the common part is never negative."""
    common = int(rank * common_fraction)
    per_member = min(rank // members, round((rank - common) / members))
    return rank - per_member * members, per_member


def iso_cts_tensor(tensors: list[torch.Tensor], base: torch.Tensor, resolved: Resolved, *, name: str,
                   aux: object = None) -> torch.Tensor:
    """Iso-CTS on one tensor (see the module docstring); ``tensors`` are overwritten."""
    alpha = float(resolved.shared["alpha"])
    if not is_matrix(base, name):
        return _mean_task(tensors, base, alpha)
    common, per_member = iso_cts_dimensions(min(base.shape), len(tensors), float(resolved.shared["common_fraction"]))
    deltas = [x.sub_(base) for x in tensors]
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    kept = _Components(base, per_member * len(deltas) + common)
    common_kept = _Components(base, common)
    u, s, vt = _svd(total)
    common_kept.add(u, s, vt, int((s[:common] > _tolerance(s, total.shape)).sum()))
    uc = common_kept.u[:, :common_kept.used]
    del u, s, vt, total
    for delta in deltas:
        specific = delta - uc @ (uc.T @ delta)  # the task matrix with the common subspace projected out
        u, s, vt = _svd(specific)
        # zero is judged against the task matrix: what is left of one inside the common subspace is rounding
        scale = float(torch.linalg.matrix_norm(delta))
        kept.add(u, s, vt, int((s[:per_member] > _tolerance(s, specific.shape, scale)).sum()))
        del u, s, vt, specific
    # the reference's order: the task-specific blocks, then the common one
    kept.add(common_kept.u, common_kept.s, common_kept.vt, common_kept.used)
    merged = kept.recombine(isotropic=True, like=base)
    return merged.mul_(alpha).add_(base)


_NON_MATRIX = ("tensors that are not matrices, and CLIP's text_projection, are the mean of the task vectors "
               "times alpha, as the reference merges them")
_ZERO_COMPONENTS = ("singular components whose value is zero (at or below numpy's matrix_rank tolerance: a "
                    "rank-deficient task matrix, a member equal to the base) are dropped before the "
                    "orthogonalisation, where the reference keeps their arbitrary singular vectors and so "
                    "depends on the SVD routine's choice of them")


def _alpha(help: str) -> Param:
    return Param("alpha", 1.0, help=help)


register(Operator(
    "tsv", "Gargiulo et al. CVPR 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
    "(TSV-M; AntoAndGar/task_singular_vectors)",
    "per matrix: each task matrix's top rank/T singular components, the stacked singular vectors "
    "orthogonalised, times alpha", "tensor", base="required",
    params=(_alpha("scale of the merged task matrix (the reference uses 1.0)"),),
    tensor_fn=tsv_tensor, scratch=5,
    differences="each member keeps rank // T components (the reference's compute_and_sum_svd_mem_reduction_3; "
                "its first version's int(rank * (1/T)) can round one lower) and at least one where members "
                "outnumber the rank (the reference keeps none and the matrix merges to zero); "
                + _ZERO_COMPONENTS + "; " + _NON_MATRIX))
register(Operator(
    "iso_c", "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (Iso-C; danielm1405/iso-merging)",
    "per matrix: the sum of the task matrices with its singular values replaced by their mean, times alpha",
    "tensor", base="required",
    params=(_alpha("scale of the merged task matrix (the reference picks it on validation data; 1.0 as in "
                   "FusionBench)"),),
    tensor_fn=iso_c_tensor, scratch=4,
    differences="the spectrum is flattened on the sum's support: singular values at or below numpy's matrix_rank "
                "tolerance stay zero and the mean is taken over the others (the reference gives every direction "
                "the mean over all of them, its null-space vectors being arbitrary); " + _NON_MATRIX))
register(Operator(
    "iso_cts", "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (Iso-CTS; danielm1405/iso-merging)",
    "per matrix: the sum's top directions (common subspace) plus each task's top directions outside it, "
    "orthogonalised, one flattened singular value, times alpha", "tensor", base="required",
    params=(_alpha("scale of the merged task matrix (the reference picks it on validation data; 1.0 as in "
                   "FusionBench)"),
            Param("common_fraction", 0.8, low=0.0, high=1.0,
                  help="fraction of the rank given to the common subspace (the reference's common_space_fraction)")),
    tensor_fn=iso_cts_tensor, scratch=5,
    differences="the task-specific directions per member are capped at rank // T so the common part is never "
                "negative (the reference's round() can exceed the rank with few dimensions and many members); "
                + _ZERO_COMPONENTS + ", and the flattened value is the mean over the kept ones; " + _NON_MATRIX))
