"""mergekit's remaining methods: passthrough, NuSLERP, SCE, RAM, RAM+ (tensor-local), NearSwap, Arcee Fusion.

Each follows mergekit 0.1.5's code (``mergekit/merge_methods/passthrough.py``, ``nuslerp.py``, ``sce.py``,
``ram.py``, ``nearswap.py``, ``arcee_fusion.py``), under mergekit's names and parameter names, so a recipe
from a model card runs unchanged. Each takes the streaming path its arithmetic allows:

- ``passthrough`` is a ``linear`` combination of its one member (a copy, times ``scale``);
- ``sce``, ``ram`` and ``ramplus_tl`` merge task vectors and need, per element, statistics over all members
  (a variance, a count of contributors): they run on the ``task`` path, member by member, with a fixed
  number of whole-tensor accumulators (the variance and mask, the contributor count), so memory stays flat
  in the number of members where mergekit stacks every task vector;
- ``nuslerp``, ``nearswap`` and ``arcee_fusion`` take two tensors (two members, or the base and one member)
  and need whole rows or a whole-tensor quantile: they run on the ``tensor`` path (at most three copies).

Every method computes in float32 (float64 on request or for float64 inputs), where mergekit computes in
the inputs' dtype (bfloat16 for most models): results agree to the rounding of the inputs' precision.

Example:
    >>> import torch
    >>> from merge.ops import get_operator
    >>> base = torch.zeros(3)
    >>> get_operator("nearswap")([torch.tensor([1e-4, 0.5, -2.0])], base=base, t=1e-3).tolist()
    [9.999999747378752e-05, 0.0010000000474974513, -0.0010000000474974513]
"""

from __future__ import annotations

import math

from merge.backend.lazy import lazy_torch
from merge.ops.apply import UNIT
from merge.ops.registry import REQUIRED, Combination, Operator, Param, Resolved, register

torch = lazy_torch(__name__)

__all__ = ["nuslerp", "nuslerp_tensor", "nearswap_tensor", "arcee_fusion_tensor", "passthrough_combination",
           "SceSpec", "RamSpec"]

_MERGEKIT = "Goddard et al. 2024, Arcee's MergeKit (EMNLP industry track)"
_DTYPE_DIFF = "computes in float32 (or float64) where mergekit computes in the inputs' dtype"


# ---- passthrough: one member, as is -------------------------------------------------------------------

def passthrough_combination(resolved: Resolved) -> Combination:
    """The member times its ``scale`` (1: a copy, bit for bit)."""
    return Combination([float(resolved.member("scale")[0])])


# ---- NuSLERP --------------------------------------------------------------------------------------------

def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """mergekit's ``nuslerp``: slerp from ``v0`` (t=0) to ``v1`` (t=1) of the flattened tensors, or of each
    vector along ``dim``; unnormalised results, linear interpolation where the vectors are colinear
    (``1 - cos^2 <= eps^2``); a zero vector counts as orthogonal to everything.
    """
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(out_shape)


def nuslerp_tensor(tensors: list, base: torch.Tensor | None, resolved: Resolved, **_: object) -> torch.Tensor:
    """``nuslerp`` merge of two members, as task vectors from the base when there is one.

    ``t = w1 / (w0 + w1)`` (0.5 when the weights sum to less than 1e-6 in magnitude).
    """
    w = [float(x) for x in resolved.member("weight")]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    flatten = bool(resolved.shared["nuslerp_flatten"])
    dim = 0 if resolved.shared["nuslerp_row_wise"] else -1
    v0, v1 = tensors
    if v0.dim() == 0:  # a 0-d tensor is a vector of one element (transpose has no dims to swap)
        v0, v1 = v0.reshape(1), v1.reshape(1)
        base = None if base is None else base.reshape(1)
    shape = tensors[0].shape
    if base is None:
        return nuslerp(t, v0, v1, dim=dim, flatten=flatten).reshape(shape)
    return (base + nuslerp(t, v0.sub_(base), v1.sub_(base), dim=dim, flatten=flatten)).reshape(shape)


# ---- NearSwap -----------------------------------------------------------------------------------------

def nearswap_tensor(tensors: list, base: torch.Tensor, resolved: Resolved, **_: object) -> torch.Tensor:
    """Move each element of the base toward the member by ``min(1, t / |base - member|)``: elements that
    differ by less than ``t`` take the member's value, far ones keep (nearly) the base's."""
    t = float(resolved.shared["t"])
    a, b = base, tensors[0]
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


# ---- Arcee Fusion -------------------------------------------------------------------------------------

def arcee_fusion_tensor(tensors: list, base: torch.Tensor, resolved: Resolved, **_: object) -> torch.Tensor:
    """Keep the member's changes whose importance ``|x - base| * KL(softmax(x) || softmax(base))`` (the KL
    per row, over the last dimension) reaches ``median + 1.5 * (q3 - q1)`` of all importances; the rest
    stay the base's."""
    x = tensors[0]
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    importance = (x - base).abs_().mul_(kl)
    flat = importance.reshape(-1)
    n = flat.numel()
    # mergekit's indices into the sorted importances: (q * (n - 1)).long(), q in float32
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in idx)
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).to(x.dtype)
    return base + (x - base) * mask


# ---- SCE: select, calculate, erase ----------------------------------------------------------------------

class SceSpec:
    """The ``task``-path recipe of SCE (the engine asks :meth:`tensor` for each tensor)."""

    sparsify = None

    def tensor(self, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
               name: str = "", method: str = "") -> SceTensor:
        return SceTensor(self, resolved, shape, dtype)


class SceTensor:
    """One tensor of an SCE merge (mergekit ``sce.py``), in passes over the members' task vectors ``d_i``.

    1. Select (``select_topk < 1``): a Welford pass over the members gives each element's variance across
       them; the ``int(select_topk * count_nonzero(var))`` elements of largest variance are kept in every
       task vector, the others zeroed.
    2. Calculate: member ``i``'s weight is the mean square of its (selected) task vector, divided by the sum
       of those (``1 / n`` each when that sum is below 1e-6).
    3. Erase: per element the majority sign is that of ``sum_i d_i`` (zero counts as positive); only members
       of that sign contribute: ``base + sum_i w_i d_i / max(sum_i w_i, 1e-6)`` over them.

    Memory: the variance's two accumulators, then the mask, whole-tensor sized, whatever the member count.
    """

    unit = UNIT

    def __init__(self, spec: SceSpec, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype):
        self.spec, self.shape, self.dtype = spec, tuple(shape), dtype
        self.numel = math.prod(self.shape)
        self.n = len(resolved.members)
        self.topk = float(resolved.shared["select_topk"])
        self.select = self.topk < 1
        self.mask: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._squares: list[float] = []
        self._raw = [0.0] * self.n
        self.weights = [1.0 / self.n] * self.n
        itemsize = torch.empty(0, dtype=dtype).element_size()
        # Welford's two accumulators, then torch.topk's values and indices beside the mask
        self.extra_bytes = 0 if not self.select else self.numel if self.topk <= 0 else self.numel * (3 * itemsize + 9)

    def stat_passes(self) -> list[tuple[str, list[int]]]:
        everyone = list(range(self.n))
        moments = [("moments", everyone)] if self.select and self.topk > 0 else []
        return moments + [("weight", everyone)]

    def stat_begin(self, kind: str, i: int) -> None:
        self._squares = []

    def stat_chunk(self, kind: str, i: int, d: torch.Tensor, start: int) -> bool:
        """Fold one chunk of member ``i``'s task vector into a statistic; False when it is not finite."""
        end = start + d.numel()
        if kind == "moments":  # Welford, as torch.var reduces: mean += delta / k; m2 += delta * (x - mean)
            if self._mean is None:
                self._mean = torch.zeros(self.numel, dtype=self.dtype, device=d.device)
                self._m2 = torch.zeros(self.numel, dtype=self.dtype, device=d.device)
            mean, m2 = self._mean[start:end], self._m2[start:end]
            delta = d - mean
            mean.add_(delta / (i + 1))
            m2.add_(delta.mul_(d - mean))
            return math.isfinite(float(d.sum()))
        if self.select and self.mask is None:  # select_topk <= 0: nothing survives
            self.mask = torch.zeros(self.numel, dtype=torch.bool, device=d.device)
        if self.mask is not None:
            d = d * self.mask[start:end].to(d.device)
        finite = True
        for u in range(0, d.numel(), self.unit):  # per unit, added in order: the same sums for any chunking
            s = float(d[u: u + self.unit].square().sum(dtype=torch.float64))
            self._squares.append(s)
            finite = finite and math.isfinite(s)
        return finite

    def stat_end(self, kind: str, i: int) -> None:
        if kind == "moments":
            if i == self.n - 1:
                var = self._m2.div_(self.n).abs_()
                self._mean = self._m2 = None
                k = int(int(torch.count_nonzero(var)) * self.topk)
                self.mask = torch.zeros(self.numel, dtype=torch.bool, device=var.device)
                if k > 0:
                    self.mask[torch.topk(var, k=k, largest=True).indices] = True
            return
        total = 0.0
        for s in self._squares:
            total += s
        self._raw[i] = total / max(1, self.numel)
        self._squares = []
        if i == self.n - 1:
            weight_sum = sum(self._raw)
            if abs(weight_sum) >= 1e-6:
                self.weights = [r / weight_sum for r in self._raw]

    def begin_chunk(self, count: int, device: torch.device) -> dict:
        z = lambda: torch.zeros(count, dtype=self.dtype, device=device)  # noqa: E731
        return {"S": z(), "Pn": z(), "Pd": z(), "Qn": z(), "Qd": z(),
                "tmp": torch.empty(count, dtype=self.dtype, device=device)}

    def add_member(self, state: dict, i: int, d: torch.Tensor, start: int) -> None:
        """Fold member ``i``'s task-vector chunk ``d`` (changed in place) into the running sums."""
        if self.mask is not None:
            d.mul_(self.mask[start: start + d.numel()])
        w, tmp = self.weights[i], state["tmp"]
        state["S"].add_(d)
        for sign, num, den in ((1, "Pn", "Pd"), (-1, "Qn", "Qd")):
            agree = d > 0 if sign > 0 else d < 0
            torch.mul(d, agree, out=tmp)
            state[num].add_(tmp.mul_(w))          # w_i * d_i, rounded, then summed: as mergekit
            state[den].add_(agree.to(self.dtype), alpha=w)

    def finish_chunk(self, state: dict, base: torch.Tensor) -> torch.Tensor:
        up = state["S"] >= 0
        num = torch.where(up, state["Pn"], state["Qn"])
        den = torch.where(up, state["Pd"], state["Qd"]).clamp_(min=1e-6)
        return num.div_(den).add_(base)


# ---- RAM and RAM+ (tensor-local) ------------------------------------------------------------------------

class RamSpec:
    """The ``task``-path recipe of RAM (``plus=False``) and RAM+ tensor-local (``plus=True``)."""

    sparsify = None

    def __init__(self, plus: bool):
        self.plus = plus

    def tensor(self, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
               name: str = "", method: str = "") -> RamTensor:
        return RamTensor(self, resolved, shape, dtype)


class RamTensor:
    """One tensor of a RAM merge (mergekit ``ram.py``): each element of ``base + merged`` is the mean of the
    task-vector values above ``epsilon`` in magnitude (a value only one member has is kept whole).

    RAM+ (``plus``) scales member ``i``'s unique values by ``lambda_i = 1 + r * min(alpha, shared_i /
    max(unique_i, epsilon))``, from the counts of its values shared with others and unique to it. Its
    passes: the count of contributors per element (one whole-tensor counter), each member's counts, then
    the combination. RAM needs no statistics: one pass summing the kept values and their count.
    """

    unit = UNIT

    def __init__(self, spec: RamSpec, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype):
        self.spec, self.plus, self.dtype = spec, spec.plus, dtype
        self.numel = math.prod(tuple(shape))
        self.n = len(resolved.members)
        sh = resolved.shared
        self.eps = float(sh["epsilon"])
        self.r, self.alpha = float(sh.get("r", 0.0)), float(sh.get("alpha", 0.0))
        self.count: torch.Tensor | None = None
        self._shared = [0] * self.n
        self._unique = [0] * self.n
        self.lambdas = [1.0] * self.n
        self._count_dtype = torch.int16 if self.n < 2 ** 15 else torch.int32
        self.extra_bytes = self.numel * self._count_dtype.itemsize if self.plus else 0

    def stat_passes(self) -> list[tuple[str, list[int]]]:
        everyone = list(range(self.n))
        return [("count", everyone), ("share", everyone)] if self.plus else []

    def stat_begin(self, kind: str, i: int) -> None:
        pass

    def stat_chunk(self, kind: str, i: int, d: torch.Tensor, start: int) -> bool:
        end = start + d.numel()
        nz = d.abs() > self.eps
        if self.count is None:
            self.count = torch.zeros(self.numel, dtype=self._count_dtype, device=d.device)
        if kind == "count":
            self.count[start:end] += nz
        else:
            c = self.count[start:end]
            self._shared[i] += int((nz & (c > 1)).sum())
            self._unique[i] += int((nz & (c == 1)).sum())
        return math.isfinite(float(d.sum()))

    def stat_end(self, kind: str, i: int) -> None:
        if kind == "share" and i == self.n - 1:
            # as mergekit: counts over a float32 clamp, the ratio and lambda in float32
            rho = torch.tensor(self._shared) / torch.tensor(self._unique).clamp(min=self.eps)
            self.lambdas = (1 + self.r * rho.clamp(min=0, max=self.alpha)).tolist()

    def begin_chunk(self, count: int, device: torch.device) -> dict:
        z = lambda: torch.zeros(count, dtype=self.dtype, device=device)  # noqa: E731
        return {"S": z(), "c": None} if self.plus else {"S": z(), "C": z()}

    def add_member(self, state: dict, i: int, d: torch.Tensor, start: int) -> None:
        """Fold member ``i``'s task-vector chunk ``d`` (changed in place) into the running sums."""
        nz = d.abs() > self.eps
        d.mul_(nz)
        if not self.plus:
            state["S"].add_(d)
            state["C"].add_(nz.to(self.dtype))
            return
        if state["c"] is None:  # this chunk's contributor counts, from the count pass
            state["c"] = self.count[start: start + d.numel()].to(device=d.device, dtype=self.dtype)
        c = state["c"]
        unique_part = (d * (c == 1)).mul_(self.lambdas[i])
        overlap_part = (d * (c > 1)).div_(c.clamp(min=1))
        state["S"].add_(unique_part.add_(overlap_part))

    def finish_chunk(self, state: dict, base: torch.Tensor) -> torch.Tensor:
        if self.plus:
            return state["S"].add_(base)
        return state["S"].div_(state["C"].clamp_(min=1)).add_(base)


# ---- registrations ------------------------------------------------------------------------------------

register(Operator(
    "passthrough", f"mergekit passthrough ({_MERGEKIT}): the frankenmerge's copy of layers",
    "one member's tensor as is, times an optional scale", "linear",
    params=(Param("scale", 1.0, float, per_member=True, help="factor on the member's tensor (1: a copy)"),),
    min_members=1, max_members=1, combine=passthrough_combination,
    differences="scale's default is 1.0 where mergekit's is None (no scaling): the same bits"))

register(Operator(
    "nuslerp", f"mergekit NuSLERP ({_MERGEKIT}); Shoemake 1985, Animating rotation with quaternion curves",
    "slerp between two members (of their task vectors with a base), flattened or per row, t from the weights",
    "tensor", base="optional",
    params=(Param("weight", REQUIRED, float, per_member=True, help="weight of each member: t = w1 / (w0 + w1)"),
            Param("nuslerp_flatten", True, bool, help="slerp the flattened tensors (else each row)"),
            Param("nuslerp_row_wise", False, bool, help="without flattening: slerp vectors along dim 0 "
                  "(mergekit's row_wise) rather than the last dim")),
    min_members=2, max_members=2, tensor_fn=nuslerp_tensor, scratch=6,
    differences=_DTYPE_DIFF + "; a tensor missing from one member is an error (mergekit passes the other's)"))

register(Operator(
    "sce", "Wan et al. 2024, FuseChat: knowledge fusion of chat models (SCE merging, arXiv 2408.07990); "
    f"mergekit sce ({_MERGEKIT})",
    "keep the elements of largest variance across members, weight members by their energy, erase minority signs",
    "task", base="required",
    params=(Param("select_topk", 1.0, float, help="fraction of elements kept, by variance across members"),
            Param("int8_mask", False, bool, help="mergekit's memory option for the masks; no effect on the result")),
    task=SceSpec(),
    differences=_DTYPE_DIFF + "; the variance by Welford's recurrence over the members one at a time, the "
    "weights' mean squares summed in float64"))

_RAM_CITE = (f"Reinforced agent merging (RAM, arXiv 2601.13572); mergekit ram and ramplus_tl ({_MERGEKIT})")
register(Operator(
    "ram", _RAM_CITE, "average each element's task-vector values above epsilon over the members that have one",
    "task", base="required",
    params=(Param("epsilon", 1e-5, float, low=0.0, help="task-vector magnitudes at or below it count as zero"),),
    task=RamSpec(plus=False),
    differences=_DTYPE_DIFF + "; sums the kept values, then divides by their count (mergekit divides each "
    "value, then sums): the same up to rounding"))
register(Operator(
    "ramplus_tl", _RAM_CITE,
    "RAM, with each member's unique values scaled up by how much of it the others share (per tensor)",
    "task", base="required",
    params=(Param("r", 0.1, float, help="strength of the rescaling of unique values"),
            Param("alpha", 0.2, float, help="cap on the shared/unique ratio"),
            Param("epsilon", 1e-5, float, low=0.0, help="task-vector magnitudes at or below it count as zero")),
    task=RamSpec(plus=True), differences=_DTYPE_DIFF))

register(Operator(
    "nearswap", "alchemonaut 2024, NearSwap (model card of QuartetAnemoi-70B-t0.0001); "
    f"mergekit nearswap ({_MERGEKIT})",
    "take the member's value where it is within t of the base's, interpolate toward it elsewhere", "tensor",
    base="required", params=(Param("t", REQUIRED, float, help="distance under which the member's value is taken"),),
    min_members=1, max_members=1, tensor_fn=nearswap_tensor, scratch=3, differences=_DTYPE_DIFF))

register(Operator(
    "arcee_fusion", f"Arcee AI 2025, Arcee Fusion (arcee.ai); mergekit arcee_fusion ({_MERGEKIT})",
    "keep the member's changes whose importance (|change| x row KL divergence) is an upper outlier",
    "tensor", base="required", min_members=1, max_members=1, tensor_fn=arcee_fusion_tensor, scratch=6,
    differences=_DTYPE_DIFF + "; quantiles of all importances (mergekit samples 1,000,000 of them at random, "
    "with replacement, in tensors larger than that); a tensor missing from the member is an error"))
