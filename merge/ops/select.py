"""Exact order statistics of a tensor's magnitudes, streamed chunk by chunk in constant memory.

TIES keeps the ``k`` largest magnitudes of each task vector and breadcrumbs keeps a band of them;
mergekit finds them by sorting the whole tensor (``argsort``), which needs the tensor and its int64
indices in memory. Here the value at a given rank is found by radix selection over the bit patterns
of the magnitudes (non-negative floats order like their bits): one pass histograms the top bits,
the next histograms the following bits of the elements in the chosen bucket, and so on (2 passes
for float32, 3 for float64). Each pass streams the tensor chunk by chunk; memory is one histogram.

Ties at a boundary value are broken by position, as a stable sort would: of the elements equal to
the boundary, the ones earlier in the tensor come first in ascending order. (torch's default sort,
which mergekit uses, is not stable; where several elements share the boundary magnitude, which of
them mergekit keeps is unspecified.)

Written once against :mod:`merge.backend.arrays`: the same functions select on torch tensors (CPU or CUDA)
and on numpy arrays (the CPU merges that need no torch); every step is exact (integer counts, bit patterns,
comparisons), so both give the same band and masks.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from merge.backend.arrays import NUMPY, arrays_for, arrays_of
from merge.backend.lazy import lazy_torch
from merge.ops.rng import spread

torch = lazy_torch(__name__)

__all__ = ["RadixSelect", "Band", "keep_band", "BandCounters", "whole_band"]

def _levels(dtype: torch.dtype) -> tuple[torch.dtype, int, tuple[int, ...]]:
    """(integer view, total bits, bit widths per pass) of a compute dtype (float32 or float64, torch's or numpy's)."""
    bits, widths = {4: (32, (16, 16)), 8: (64, (20, 22, 22))}[dtype.itemsize]
    return arrays_for(dtype).bits_dtype(dtype), bits, widths


def radix_passes(dtype: torch.dtype) -> int:
    """How many passes over the data an exact selection takes in ``dtype``."""
    return len(_levels(dtype)[2])


@dataclass
class _Target:
    rank: int
    prefix: int = 0
    less: int = 0
    eq: int = 0
    value_bits: int | None = None


@dataclass
class RadixSelect:
    """Finds the values at given ascending ranks (0-based) of non-negative floats, pass by pass.

    Use: for each pass ``p`` in ``range(passes)``: ``begin(p)``, ``add(chunk)`` for every chunk of
    the data in any order, ``end()``. Then ``value(r)``, ``less(r)`` and ``equal(r)`` give, for each
    requested rank, the value, how many elements are strictly smaller and how many are equal.
    """

    ranks: tuple[int, ...]
    dtype: torch.dtype | None = None  # float32 when not given
    targets: list[_Target] = field(init=False)

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = torch.float32
        self.int_dtype, self.total_bits, self.widths = _levels(self.dtype)
        self.targets = [_Target(r) for r in self.ranks]
        self.passes = len(self.widths)
        self._hist: dict[int, torch.Tensor] = {}
        self._level = -1

    def begin(self, level: int) -> None:
        self._level = level
        self._hist = {}

    def _shifts(self) -> tuple[int, int, int]:
        used = sum(self.widths[: self._level])
        width = self.widths[self._level]
        return self.total_bits - used, self.total_bits - used - width, width  # prefix shift, field shift, width

    def add(self, magnitudes: torch.Tensor) -> None:
        """Count one chunk of non-negative values (in the selector's dtype)."""
        xp = arrays_of(magnitudes)
        bits = xp.bits(magnitudes.reshape(-1))
        pshift, fshift, width = self._shifts()
        mask_field = (1 << width) - 1
        for prefix in {t.prefix for t in self.targets}:
            if self._level == 0:
                sel = bits
            else:
                sel = bits[xp.shr(bits, pshift) == prefix]
            f = xp.shr(sel, fshift)
            if fshift + width < self.total_bits:
                f = xp.bitand(f, mask_field)
            counts = xp.bincount(xp.to_int64(f) if xp.is_cuda(f) else f, minlength=1 << width)
            prev = self._hist.get(prefix)
            self._hist[prefix] = xp.to_int64(counts) if prev is None else prev + counts

    def end(self) -> None:
        _, _, width = self._shifts()
        xp = arrays_for(self.dtype)
        for t in self.targets:
            counts = self._hist.get(t.prefix)
            if counts is None:
                counts = xp.zeros(1 << width, xp.int64)
            cum = xp.cumsum(xp.cpu(counts))
            rem = t.rank - t.less
            j = xp.searchsorted(cum, rem, right=True)
            before = int(cum[j - 1]) if j > 0 else 0
            t.less += before
            t.prefix = (t.prefix << width) | j
            t.eq = int(counts[j])
        self._hist = {}
        if self._level == self.passes - 1:
            for t in self.targets:
                t.value_bits = t.prefix

    def _target(self, rank: int) -> _Target:
        return self.targets[self.ranks.index(rank)]

    def value(self, rank: int) -> float:
        return _float_of_bits(self._target(rank).value_bits, self.total_bits)

    def less(self, rank: int) -> int:
        return self._target(rank).less

    def equal(self, rank: int) -> int:
        return self._target(rank).eq


@dataclass(frozen=True)
class Band:
    """Keep the elements whose stable ascending rank of magnitude is in ``[r0, r1)`` (of ``n``).

    ``lo``/``hi`` are the magnitudes at ranks ``r0`` and ``r1 - 1``; ``lo_skip`` is how many of the
    elements equal to ``lo`` come before rank ``r0`` (dropped, first by position), ``hi_keep`` how many
    of those equal to ``hi`` come before rank ``r1`` (kept, first by position).
    """

    n: int
    r0: int
    r1: int
    lo: float = 0.0
    lo_skip: int = 0
    hi: float = 0.0
    hi_keep: int = 0
    hi_eq: int = 0
    # Where known (:func:`whole_band`), the positions that split each boundary's ties: of the elements equal to
    # ``lo``, those before ``lo_cut`` are dropped; of those equal to ``hi``, those before ``hi_cut`` are kept.
    # A chunk then needs no running count of ties, only one comparison on each side of the cut.
    lo_cut: int | None = None
    hi_cut: int | None = None

    @property
    def keep_all(self) -> bool:
        return self.r0 <= 0 and self.r1 >= self.n

    @property
    def drop_all(self) -> bool:
        return self.r1 <= self.r0

    @property
    def counted(self) -> bool:
        """Whether :func:`keep_band` splits a boundary's run of ties with running counts (``BandCounters``): no cuts
        known and a boundary inside a run of equal values. A chunk's mask then depends on the chunks before it."""
        if self.keep_all or self.drop_all or (self.lo_cut is not None and self.hi_cut is not None):
            return False
        return (self.r0 > 0 and self.lo_skip > 0) or (self.r1 < self.n and self.hi_keep < self.hi_eq)

    @classmethod
    def from_select(cls, sel: RadixSelect | None, n: int, r0: int, r1: int) -> Band:
        if r0 <= 0 and r1 >= n or r1 <= r0:
            return cls(n, max(r0, 0), min(r1, n))
        lo = lo_skip = hi = hi_keep = hi_eq = 0
        if r0 > 0:
            lo, lo_skip = sel.value(r0), r0 - sel.less(r0)
        if r1 < n:
            hi, hi_keep, hi_eq = sel.value(r1 - 1), r1 - sel.less(r1 - 1), sel.equal(r1 - 1)
        return cls(n, r0, r1, lo, lo_skip, hi, hi_keep, hi_eq)


def _float_of_bits(bits: int, total_bits: int) -> float:
    """The float32 (or float64) whose bit pattern is the non-negative integer ``bits``."""
    fmt = "f" if total_bits == 32 else "d"
    return struct.unpack("<" + fmt, struct.pack("<" + fmt.replace("f", "I").replace("d", "Q"), bits))[0]


def _top16(a: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each non-negative float of contiguous ``a`` as non-negative int16 (a view where it can)."""
    xp = arrays_of(a)
    words = a.itemsize // 2
    if sys.byteorder == "little":
        return xp.view(a.reshape(-1), xp.int16)[words - 1:: words]
    return xp.convert(xp.shr(xp.bits(a.reshape(-1)), 16 * (words - 1)), xp.int16)


_PIECE = 1 << 20


def _by_runs(n: int, fn: Callable[[int, int], object], threads: int) -> list:
    """``fn(lo, hi)`` over runs of ``[0, n)`` on up to ``threads`` threads (runs of at least ``_PIECE`` elements;
    numpy's ufuncs, ``bincount`` and ``nonzero`` release the GIL for most of their work): the results in order of
    position."""
    out: dict[int, object] = {}
    spread(lambda lo, hi: out.__setitem__(lo, fn(lo, hi)), n, grain=_PIECE, threads=threads)
    return [out[lo] for lo in sorted(out)]


def whole_band(a: torch.Tensor, r0: int, r1: int) -> Band:
    """The :class:`Band` of ranks ``[r0, r1)`` of the non-negative floats ``a`` held whole in memory, with its cuts.

    The same band as :class:`RadixSelect`'s passes (the values at given ranks are what they are), found with
    two passes over ``a`` instead of one per radix level: a histogram of the top 16 bits of every element,
    then the elements of each boundary's bucket only (about 1% of them) gathered by position and sorted.
    Their positions also give the cuts, so that :func:`keep_band` needs no running count of ties.
    """
    xp = arrays_of(a)
    n = xp.numel(a)
    if r0 <= 0 and r1 >= n or r1 <= r0:
        return Band(n, max(r0, 0), min(r1, n))
    top = _top16(a)
    # Pieces of _PIECE elements keep the temporaries small (bincount copies its input); runs of pieces go on the
    # numpy lane's threads, torch's in one run (counts add up exactly, positions are concatenated in order).
    threads = NUMPY.threads() if xp is NUMPY else 1
    cum = xp.cumsum(sum(_by_runs(n, lambda lo, hi: sum(xp.bincount(top[s: min(s + _PIECE, hi)], minlength=1 << 15)
                                                       for s in range(lo, hi, _PIECE)), threads)))
    bits = xp.bits(a.reshape(-1))
    buckets: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def at(rank: int) -> tuple[float, int, torch.Tensor]:
        """The value at ``rank``, how many are smaller, and the positions of the elements equal to it (ascending)."""
        p = xp.searchsorted(cum, rank, right=True)
        if p not in buckets:
            pos = xp.cat(_by_runs(n, lambda lo, hi: xp.cat([xp.add_(xp.nonzero(top[s: min(s + _PIECE, hi)] == p), s)
                                                              for s in range(lo, hi, _PIECE)]), threads))
            vals, order = xp.sort_stable(bits[pos])  # equal values stay in position order
            buckets[p] = (int(cum[p - 1]) if p > 0 else 0, vals, pos[order])
        below, vals, pos = buckets[p]
        v = vals[rank - below: rank - below + 1]
        first = xp.searchsorted(vals, v)
        last = xp.searchsorted(vals, v, right=True)
        return v.view(a.dtype).item(), below + first, pos[first:last]

    lo = lo_skip = hi = hi_keep = hi_eq = 0
    lo_cut, hi_cut = 0, n
    if r0 > 0:
        lo, less, eq_pos = at(r0)
        lo_skip = r0 - less
        lo_cut = int(eq_pos[lo_skip - 1]) + 1 if lo_skip > 0 else 0
    if r1 < n:
        hi, less, eq_pos = at(r1 - 1)
        hi_keep, hi_eq = r1 - less, xp.numel(eq_pos)
        hi_cut = int(eq_pos[hi_keep - 1]) + 1 if hi_keep < hi_eq else n
    return Band(n, r0, r1, lo, lo_skip, hi, hi_keep, hi_eq, lo_cut, hi_cut)


@dataclass
class BandCounters:
    """How many elements equal to each boundary were seen in earlier chunks (ties break by position)."""

    lo: int = 0
    hi: int = 0


def _first_ties(a: torch.Tensor, value: float, seen: int, first: int) -> tuple[str | torch.Tensor, int]:
    """Which of chunk ``a``'s elements equal to ``value`` are among the ``first`` of them by position.

    ``seen`` of them came in earlier chunks. Returns ``(which, count)``, ``count`` being how many this chunk
    holds and ``which`` ``"all"``, ``"none"``, or a mask for the one chunk where the boundary falls inside a
    run of equal values: only that chunk needs the running count (a cumulative sum).
    """
    eq = a == value
    count = int(eq.sum())
    if seen + count <= first:
        return "all", count
    if seen >= first:
        return "none", count
    idx = arrays_of(a).cumsum(eq, int64=True)
    return eq & (idx + seen <= first), count


def _cmp(a: torch.Tensor, op: str, bound: float, dst: torch.Tensor | None) -> torch.Tensor:
    """``torch.<op>(a, bound)`` (op: gt, ge, lt, le, eq), into ``dst`` where given."""
    xp = arrays_of(a)
    return xp.cmp(a, op, bound) if dst is None else xp.cmp_into(dst, a, op, bound)


def _split_cmp(a: torch.Tensor, cut: int, before: str, after: str, bound: float,
               dst: torch.Tensor | None) -> torch.Tensor:
    """Comparison ``before`` (gt, ge, lt, le) with ``bound`` for the ``cut`` first elements of ``a``, ``after`` for
    the rest."""
    xp = arrays_of(a)
    if cut <= 0:
        return _cmp(a, after, bound, dst)
    if cut >= xp.numel(a):
        return _cmp(a, before, bound, dst)
    if dst is None:
        dst = xp.empty_bool(a)
    xp.cmp_into(dst[:cut], a[:cut], before, bound)
    xp.cmp_into(dst[cut:], a[cut:], after, bound)
    return dst


def keep_band(a: torch.Tensor, band: Band, counters: BandCounters,
              out: tuple[torch.Tensor, torch.Tensor] | None = None, start: int | None = None) -> torch.Tensor | None:
    """The keep-mask of one chunk of magnitudes ``a`` (in tensor order), or None to keep every element.

    With ``out`` (two buffers of ``a``'s dtype and at least its size) the mask is 1.0/0.0 in ``out[0]``:
    comparisons written into a float tensor, and products with it, are several times faster on the CPU
    than through a bool tensor, and multiplying by 1.0/0.0 is multiplying by True/False. With ``start`` (the
    chunk's position in the tensor) and a band that knows its cuts, ties are split by position without
    ``counters``.
    """
    if band.keep_all:
        return None
    xp = arrays_of(a)
    n = xp.numel(a)
    if band.drop_all:
        if out is None:
            return xp.zeros_bool(a)
        xp.zero_(out[0][:n])
        return out[0][:n]
    f1, f2 = (None, None) if out is None else (out[0][:n], out[1][:n])
    if start is not None and band.lo_cut is not None and band.hi_cut is not None:
        m = None
        if band.r0 > 0:  # equal to lo: dropped before the cut, kept from it
            m = _split_cmp(a, band.lo_cut - start, "gt", "ge", band.lo, f1)
        if band.r1 < band.n:  # equal to hi: kept before the cut, dropped from it
            m2 = _split_cmp(a, band.hi_cut - start, "le", "lt", band.hi, f2 if m is not None else f1)
            m = m2 if m is None else (m & m2 if out is None else xp.mul_mask_(m, m2))
        return m

    def as_out(mask: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
        if dst is None:
            return mask
        xp.copy_into(dst, mask)
        return dst

    m = None
    if band.r0 > 0:
        if band.lo_skip == 0:
            m = _cmp(a, "ge", band.lo, f1)
        else:  # of the elements equal to lo, the first lo_skip are dropped
            dropped, count = _first_ties(a, band.lo, counters.lo, band.lo_skip)
            counters.lo += count
            if isinstance(dropped, str):
                m = _cmp(a, "gt" if dropped == "all" else "ge", band.lo, f1)
            else:
                m = as_out((a > band.lo) | ((a == band.lo) & ~dropped), f1)
    if band.r1 < band.n:
        dst = f2 if m is not None else f1
        if band.hi_keep >= band.hi_eq:
            m2 = _cmp(a, "le", band.hi, dst)
        else:  # of the elements equal to hi, the first hi_keep are kept
            kept, count = _first_ties(a, band.hi, counters.hi, band.hi_keep)
            counters.hi += count
            if isinstance(kept, str):
                m2 = _cmp(a, "le" if kept == "all" else "lt", band.hi, dst)
            else:
                m2 = as_out((a < band.hi) | kept, dst)
        m = m2 if m is None else (m & m2 if out is None else xp.mul_mask_(m, m2))
    return m
