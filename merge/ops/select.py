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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["RadixSelect", "Band", "keep_band", "BandCounters", "whole_band"]

def _levels(dtype: torch.dtype) -> tuple[torch.dtype, int, tuple[int, ...]]:
    """(integer view, total bits, bit widths per pass) of a compute dtype."""
    return {torch.float32: (torch.int32, 32, (16, 16)), torch.float64: (torch.int64, 64, (20, 22, 22))}[dtype]


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
        bits = magnitudes.reshape(-1).view(self.int_dtype)
        pshift, fshift, width = self._shifts()
        mask_field = (1 << width) - 1
        for prefix in {t.prefix for t in self.targets}:
            if self._level == 0:
                sel = bits
            else:
                sel = bits[torch.bitwise_right_shift(bits, pshift) == prefix]
            f = torch.bitwise_right_shift(sel, fshift)
            if fshift + width < self.total_bits:
                f = torch.bitwise_and(f, mask_field)
            counts = torch.bincount(f.to(torch.int64) if f.device.type == "cuda" else f, minlength=1 << width)
            prev = self._hist.get(prefix)
            self._hist[prefix] = counts.to(torch.int64) if prev is None else prev + counts

    def end(self) -> None:
        _, _, width = self._shifts()
        for t in self.targets:
            counts = self._hist.get(t.prefix)
            if counts is None:
                counts = torch.zeros(1 << width, dtype=torch.int64)
            cum = torch.cumsum(counts.cpu(), 0)
            rem = t.rank - t.less
            j = int(torch.searchsorted(cum, torch.tensor([rem]), right=True)[0])
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
        bits = self._target(rank).value_bits
        return torch.tensor([bits], dtype=self.int_dtype).view(self.dtype).item()

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


def _top16(a: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each non-negative float of contiguous ``a`` as non-negative int16 (a view where it can)."""
    words = a.element_size() // 2
    if sys.byteorder == "little":
        return a.reshape(-1).view(torch.int16)[words - 1:: words]
    return torch.bitwise_right_shift(a.reshape(-1).view(_levels(a.dtype)[0]), 16 * (words - 1)).to(torch.int16)


_PIECE = 1 << 20


def whole_band(a: torch.Tensor, r0: int, r1: int) -> Band:
    """The :class:`Band` of ranks ``[r0, r1)`` of the non-negative floats ``a`` held whole in memory, with its cuts.

    The same band as :class:`RadixSelect`'s passes (the values at given ranks are what they are), found with
    two passes over ``a`` instead of one per radix level: a histogram of the top 16 bits of every element,
    then the elements of each boundary's bucket only (about 1% of them) gathered by position and sorted.
    Their positions also give the cuts, so that :func:`keep_band` needs no running count of ties.
    """
    n = a.numel()
    if r0 <= 0 and r1 >= n or r1 <= r0:
        return Band(n, max(r0, 0), min(r1, n))
    top = _top16(a)
    pieces = range(0, n, _PIECE)  # temporaries (bincount copies its input) stay small
    cum = sum(torch.bincount(top[s: s + _PIECE], minlength=1 << 15) for s in pieces).cumsum(0)
    int_dtype = _levels(a.dtype)[0]
    bits = a.reshape(-1).view(int_dtype)
    buckets: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def at(rank: int) -> tuple[float, int, torch.Tensor]:
        """The value at ``rank``, how many are smaller, and the positions of the elements equal to it (ascending)."""
        p = int(torch.searchsorted(cum, torch.tensor([rank]), right=True)[0])
        if p not in buckets:
            pos = torch.cat([torch.nonzero(top[s: s + _PIECE] == p).reshape(-1).add_(s) for s in pieces])
            vals, order = torch.sort(bits[pos], stable=True)  # equal values stay in position order
            buckets[p] = (int(cum[p - 1]) if p > 0 else 0, vals, pos[order])
        below, vals, pos = buckets[p]
        v = vals[rank - below: rank - below + 1]
        first = int(torch.searchsorted(vals, v))
        last = int(torch.searchsorted(vals, v, right=True))
        return v.view(a.dtype).item(), below + first, pos[first:last]

    lo = lo_skip = hi = hi_keep = hi_eq = 0
    lo_cut, hi_cut = 0, n
    if r0 > 0:
        lo, less, eq_pos = at(r0)
        lo_skip = r0 - less
        lo_cut = int(eq_pos[lo_skip - 1]) + 1 if lo_skip > 0 else 0
    if r1 < n:
        hi, less, eq_pos = at(r1 - 1)
        hi_keep, hi_eq = r1 - less, eq_pos.numel()
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
    idx = torch.cumsum(eq, 0, dtype=torch.int64)
    return eq & (idx + seen <= first), count


def _split_cmp(a: torch.Tensor, cut: int, before, after, bound: float, dst: torch.Tensor | None) -> torch.Tensor:
    """``before(a, bound)`` for the ``cut`` first elements of ``a``, ``after(a, bound)`` for the rest."""
    if cut <= 0:
        return after(a, bound) if dst is None else after(a, bound, out=dst)
    if cut >= a.numel():
        return before(a, bound) if dst is None else before(a, bound, out=dst)
    if dst is None:
        dst = torch.empty_like(a, dtype=torch.bool)
    before(a[:cut], bound, out=dst[:cut])
    after(a[cut:], bound, out=dst[cut:])
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
    n = a.numel()
    if band.drop_all:
        return torch.zeros_like(a, dtype=torch.bool) if out is None else out[0][:n].zero_()
    f1, f2 = (None, None) if out is None else (out[0][:n], out[1][:n])
    if start is not None and band.lo_cut is not None and band.hi_cut is not None:
        m = None
        if band.r0 > 0:  # equal to lo: dropped before the cut, kept from it
            m = _split_cmp(a, band.lo_cut - start, torch.gt, torch.ge, band.lo, f1)
        if band.r1 < band.n:  # equal to hi: kept before the cut, dropped from it
            m2 = _split_cmp(a, band.hi_cut - start, torch.le, torch.lt, band.hi, f2 if m is not None else f1)
            m = m2 if m is None else (m & m2 if out is None else m.mul_(m2))
        return m

    def cmp(fn, bound: float, dst: torch.Tensor | None) -> torch.Tensor:
        return fn(a, bound) if dst is None else fn(a, bound, out=dst)

    def as_out(mask: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
        return mask if dst is None else dst.copy_(mask)

    m = None
    if band.r0 > 0:
        if band.lo_skip == 0:
            m = cmp(torch.ge, band.lo, f1)
        else:  # of the elements equal to lo, the first lo_skip are dropped
            dropped, count = _first_ties(a, band.lo, counters.lo, band.lo_skip)
            counters.lo += count
            if isinstance(dropped, str):
                m = cmp(torch.gt if dropped == "all" else torch.ge, band.lo, f1)
            else:
                m = as_out((a > band.lo) | ((a == band.lo) & ~dropped), f1)
    if band.r1 < band.n:
        dst = f2 if m is not None else f1
        if band.hi_keep >= band.hi_eq:
            m2 = cmp(torch.le, band.hi, dst)
        else:  # of the elements equal to hi, the first hi_keep are kept
            kept, count = _first_ties(a, band.hi, counters.hi, band.hi_keep)
            counters.hi += count
            if isinstance(kept, str):
                m2 = cmp(torch.le if kept == "all" else torch.lt, band.hi, dst)
            else:
                m2 = as_out((a < band.hi) | kept, dst)
        m = m2 if m is None else (m & m2 if out is None else m.mul_(m2))
    return m
