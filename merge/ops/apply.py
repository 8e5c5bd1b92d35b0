"""The arithmetic every path shares, and operators applied to whole tensors.

The engine streams the same functions over chunks that :func:`apply_whole` applies to whole
tensors, so a chunked merge and a whole-tensor merge perform the same floating-point operations on
each element: the tests check they agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from merge.errors import InvalidArgumentError, MismatchError
from merge.backend.arrays import arrays_for, arrays_of
from merge.backend.lazy import lazy_torch
from merge.ops.registry import Combination, Operator, Resolved, path_of, set_whole_tensor

torch = lazy_torch(__name__)

__all__ = ["fold_combination", "gram_pairs", "unit_dots", "GramSums", "gram_vectors", "apply_whole", "UNIT",
           "single_thread", "compute_dtype", "combination_from_gram", "check_combination", "coefficient_option",
           "apply_tensor"]

# Statistics (Gram partial sums, L1 sums) are taken per unit of UNIT elements and added in order.
UNIT = 1 << 16


@contextmanager
def single_thread():
    """Run torch on one thread: reductions then split work the same way as in the engine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compute_dtype(*dtypes: torch.dtype, accumulate: torch.dtype | None = None) -> torch.dtype:
    """float64 when asked for (``accumulate``; default float32) or when any input is float64 (so 1e-300
    stays 1e-300), else float32 (torch dtypes, or the numpy backend's: :mod:`merge.backend.arrays`)."""
    xp = arrays_for(accumulate if accumulate is not None else dtypes[0] if dtypes else None)
    return xp.float64 if accumulate == xp.float64 or xp.float64 in dtypes else xp.float32


def coefficient_option(op: Operator) -> str | None:
    """The parameter a coefficient out of range comes from: slerp's ``t``, or the members' weights."""
    names = {p.name for p in op.params}
    return "t" if "t" in names else "weights" if "weight" in names else None


def fold_combination(comb: Combination, member: Callable[[int], torch.Tensor], base: torch.Tensor | None,
                     acc: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``acc`` <- the combination of one chunk; ``member(i)`` returns member i's chunk in acc's dtype.

    Members are folded one at a time, in order; a member with coefficient 0 is not asked for. Torch tensors
    or numpy arrays (:mod:`merge.backend.arrays`: the same bits as torch on the CPU).
    """
    xp = arrays_of(acc)
    first = True
    for i, c in enumerate(comb.coefficients):
        if c == 0:
            continue
        x = member(i)
        if comb.delta:
            xp.sub_into(tmp, x, base)
            x = tmp
        if first:
            if c == 1:
                xp.copy_into(acc, x)
            else:
                xp.mul_into(acc, x, c)
            first = False
        elif c == 1:
            xp.add_(acc, x)
        else:
            xp.add_scaled_(acc, x, c)  # fused (one rounding) on the CPU
    if first:
        xp.zero_(acc)
    if comb.delta:
        xp.add_(acc, base)
    elif comb.base_coefficient:
        if comb.base_coefficient == 1:
            xp.add_(acc, base)
        else:
            xp.add_scaled_(acc, base, comb.base_coefficient)
    return acc


def check_combination(comb: Combination, dtype: torch.dtype, *, method: str, option: str | None = None) -> None:
    """Refuse coefficients the accumulator cannot hold (``weight 1e39`` without normalising, slerp ``t = 1e308``).

    torch multiplies a float32 chunk by a Python float converted to float32: a coefficient beyond its
    range has no float32 value. NaN coefficients (:func:`combination_from_gram`) pass: they are meant.

    Raises:
        InvalidArgumentError: a coefficient is infinite or beyond the largest finite value of ``dtype``.
    """
    top = arrays_for(dtype).finfo_max(dtype)
    for c in (*comb.coefficients, comb.base_coefficient):
        if math.isinf(c) or abs(c) > top:
            name = str(dtype).removeprefix("torch.")
            raise InvalidArgumentError(f"method {method!r}: coefficient {c:.4g} is beyond the range of the {name} "
                                       f"accumulator (largest {top:.4g}); use smaller values", option=option)


def combination_from_gram(op: Operator, gram: torch.Tensor, resolved: Resolved, has_base: bool,
                          n: int) -> Combination:
    """The coefficients of a ``gram`` operator over ``n`` members, from the float64 Gram matrix.

    A NaN or an infinity in one member (or dot products that overflow float64) leaves no norm or
    angle to take, and those of every element depend on them: the whole output tensor is NaN, rather
    than a result silently computed from the other members.
    """
    if not bool(torch.isfinite(gram).all()):
        nan = float("nan")
        return Combination([nan] * n, base_coefficient=nan if has_base else 0.0,
                           note="non-finite Gram matrix: the whole tensor is NaN")
    return op.from_gram(gram, resolved, has_base)


def gram_vectors(op: Operator, has_base: bool) -> str:
    """``raw`` or ``delta``: what the Gram matrix of ``op`` is taken over."""
    return "delta" if op.gram_of == "delta" and has_base else "raw"


def gram_pairs(rows: Sequence[int], cols: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
    """The dot products one unit adds to the Gram matrix, in the order they are added: ``(a, b, i, j)`` is
    ``vectors[a] . vectors[b]``, added to entries ``(i, j)`` and ``(j, i)``.

    ``vectors[a]`` is vector ``rows[a]``. With ``cols`` (the vectors after the ``len(rows)`` first), only the
    products between the two groups (a tile of members against a member read later).

    >>> gram_pairs([0, 1])
    [(0, 0, 0, 0), (0, 1, 0, 1), (1, 1, 1, 1)]
    >>> gram_pairs([0, 1], [2])
    [(0, 2, 0, 2), (1, 2, 1, 2)]
    """
    if cols is None:
        return [(a, b, i, rows[b]) for a, i in enumerate(rows) for b in range(a, len(rows))]
    k = len(rows)
    return [(a, k + b, i, j) for b, j in enumerate(cols) for a, i in enumerate(rows)]


def unit_dots(vectors: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int, int, int]]) -> list[float]:
    """The float64 dot products of one unit's ``vectors`` for ``pairs`` (:func:`gram_pairs`).

    Each is one ``torch.dot`` (MKL's ``ddot`` on the CPU), whose rounding depends on the threads it splits
    over: callers hold torch to one thread (the engine's compute thread, :func:`single_thread`).
    """
    return [float(torch.dot(vectors[a], vectors[b])) for a, b, _, _ in pairs]


class GramSums:
    """The float64 Gram matrix, summed unit by unit, in order, as Python floats.

    A Python float's ``+=`` is the same IEEE double addition as torch's on a float64 element, without an
    indexing call per entry (it was a third of the CPU Gram pass).
    """

    def __init__(self, m: int):
        self.g = [[0.0] * m for _ in range(m)]

    def add(self, pairs: Sequence[tuple[int, int, int, int]], values: Sequence[float]) -> None:
        """Add one unit's dot products ``values`` of ``pairs``, in order."""
        g = self.g
        for (_, _, i, j), v in zip(pairs, values):
            g[i][j] += v
            if i != j:
                g[j][i] += v

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.g, dtype=torch.float64).reshape(len(self.g), len(self.g))


def _gram_whole(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    m = len(vectors)
    sums = GramSums(m)
    flat = [v.reshape(-1).to(torch.float64) for v in vectors]
    n = flat[0].numel() if flat else 0
    pairs = gram_pairs(range(m))
    for u in range(0, n, UNIT):  # one unit at a time, in order: as the engine adds its chunks
        sums.add(pairs, unit_dots([f[u: u + UNIT] for f in flat], pairs))
    return sums.tensor()


def gram_of(op: Operator, tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The float64 Gram matrix an operator's coefficients come from, on whole tensors."""
    if gram_vectors(op, base is not None) == "delta":
        b = base.reshape(-1).to(torch.float64)
        vecs = [t.reshape(-1).to(torch.float64) - b for t in tensors]
    else:
        vecs = ([base] if base is not None and op.base == "required" else []) + list(tensors)
    return _gram_whole(vecs)


def _all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    return all(t is None or not t.numel() or bool(torch.isfinite(t).all()) for t in tensors)


def apply_tensor(op: Operator, tensors: list[torch.Tensor], base: torch.Tensor | None, resolved: Resolved, *,
                 name: str, aux: list[dict[str, torch.Tensor]] | None, seed: int = 0) -> torch.Tensor:
    """A ``tensor`` operator on whole tensors already in the compute dtype (the engine's kernel and
    :func:`apply_whole` both call this).

    A NaN or an infinity in a member or the base leaves no decomposition to take, and every element of
    the result depends on it: the whole result is NaN, as for ``gram`` operators.
    """
    shape = tensors[0].shape
    for who, t in [*((f"member {i}", t) for i, t in enumerate(tensors)), ("the base", base)]:
        if t is not None and t.shape != shape:
            raise MismatchError(f"tensor {name!r}: {who} has shape {list(t.shape)}, member 0 {list(shape)}; "
                                f"method {op.name!r} needs every copy of a tensor in one shape", tensor=name or None)
    if not _all_finite([*tensors, base]):
        return torch.full(shape, float("nan"), dtype=tensors[0].dtype, device=tensors[0].device)
    extra = {"seed": seed} if op.random else {}
    out = op.tensor_fn(tensors, base, resolved, name=name, aux=aux, **extra)
    if tuple(out.shape) != tuple(shape):
        raise RuntimeError(f"method {op.name!r} returned shape {list(out.shape)} for tensor {name!r} of shape "
                           f"{list(shape)}")
    return out.to(tensors[0].dtype)


def apply_whole(op: Operator, tensors: list[torch.Tensor], base: torch.Tensor | None, resolved: Resolved, *,
                seed: int = 0, name: str = "", aux: Sequence[dict[str, torch.Tensor] | None] | None = None
                ) -> torch.Tensor:
    """``op`` on whole tensors: the definition the streaming engine must reproduce bit for bit."""
    if op.base == "required" and base is None:
        raise InvalidArgumentError(f"method {op.name!r} needs a base model", option="base")
    if op.base == "none" and base is not None:
        raise InvalidArgumentError(f"method {op.name!r} takes no base model", option="base")
    if not tensors:
        raise InvalidArgumentError("no members given")
    if aux is not None and op.aux == "none":
        raise InvalidArgumentError(f"method {op.name!r} takes no auxiliary tensors", option="aux")
    if aux is None and op.aux == "required":
        raise InvalidArgumentError(f"method {op.name!r} needs auxiliary tensors, one per member", option="aux")
    if aux is not None and len(aux) != len(tensors):
        raise InvalidArgumentError(f"got {len(aux)} auxiliary dicts for {len(tensors)} members; give one per "
                                   "member (None or {} for a member without one)", option="aux")
    dtype = compute_dtype(*(t.dtype for t in tensors))
    shape = tensors[0].shape
    path = path_of(op, resolved)
    if path == "tensor":
        # fresh copies: the operator may overwrite its inputs (the engine's own buffers)
        xs = [t.to(dtype, copy=True) for t in tensors]
        b = base.to(dtype, copy=True) if base is not None else None
        a = None if aux is None else [{k: x.to(dtype, copy=True) for k, x in (d or {}).items()} for d in aux]
        with single_thread():
            return apply_tensor(op, xs, b, resolved, name=name, aux=a, seed=seed)
    xs = [t.reshape(-1).to(dtype) for t in tensors]
    b = base.reshape(-1).to(dtype) if base is not None else None
    with single_thread():
        if path == "task":
            tt = op.task.tensor(resolved, tuple(shape), dtype, seed=seed, name=name, method=op.name)
            for kind, members in tt.stat_passes():
                for i in members:
                    tt.stat_begin(kind, i)
                    tt.stat_chunk(kind, i, xs[i] - b, 0)
                    tt.stat_end(kind, i)
            state = tt.begin_chunk(xs[0].numel(), xs[0].device)
            for i in range(len(xs)):
                tt.add_member(state, i, xs[i] - b, 0)
            return tt.finish_chunk(state, b).reshape(shape)
        if path == "linear":
            comb = op.combine(resolved)
        else:
            comb = combination_from_gram(op, gram_of(op, tensors, base), resolved, base is not None, len(tensors))
        check_combination(comb, dtype, method=op.name, option=coefficient_option(op))
        acc = torch.empty_like(xs[0])
        tmp = torch.empty_like(xs[0])
        return fold_combination(comb, lambda i: xs[i], b, acc, tmp).reshape(shape)


set_whole_tensor(apply_whole)  # Operator.__call__ applies this
