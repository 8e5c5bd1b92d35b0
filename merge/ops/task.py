"""Task-vector merges: task arithmetic, TIES, DARE, model breadcrumbs, DELLA.

Each member contributes its task vector ``d_i = x_i - base``. Following mergekit's
``generalized_task_arithmetic.py`` and ``sparsify.py`` (v0.1.5), one method is a choice of:

- sparsification of each ``d_i`` with the member's ``density``:
  ``magnitude`` (TIES: keep the ``max(1, int(density * n))`` largest ``|d|``), ``random`` (DARE:
  keep each element with probability ``density``), ``magnitude_outliers`` (breadcrumbs: drop the
  ``int(gamma * n)`` largest and the smallest, keep ``int(density * n)`` in between) or
  ``della_magprune`` (DELLA: keep with probability ``density - epsilon + 2 * epsilon * r`` where ``r``
  is the element's magnitude rank within its row, scaled to [0, 1]); ``density >= 1`` keeps all;
- ``rescale``: multiply the kept part by ``sum|d| / sum|kept d|`` (mergekit's L1 rescale, applied when
  both sums are at least 1e-7);
- ``weight``: ``d_i *= weight_i``;
- consensus (TIES' sign election, ``sum`` method): per element, the majority sign is that of
  ``sum_i w_i d_i`` (ties count as positive); only members agreeing with it are summed, and with
  ``normalize`` the sum is divided by the sum of their weights (1 where none agree); without
  consensus, ``normalize`` divides by the sum of all weights (1 when that is below 1e-8 in magnitude);
- ``lambda`` scales the merged task vector; the result is ``base + lambda * merged``.

Streaming (see :mod:`merge.engine`): a method whose sparsification needs statistics gets them in
passes over each member, one member at a time (the radix selection of :mod:`merge.ops.select`, the
L1 sums of the rescale); the combination is then one pass, chunk by chunk, that folds each member's
sparsified, weighted task vector into five running sums (all, positive part, negative part, and the
weights of the positive and negative contributions), from which the elected sign picks the result:
peak memory is a fixed number of chunks, whatever the number of members.

The combination and the magnitude masks run on torch tensors or on numpy arrays (a numpy compute dtype,
:mod:`merge.backend.arrays`), through the same code; the random masks and the rescale's L1 sums are torch's.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from merge.backend.arrays import arrays_for, arrays_of
from merge.backend.lazy import lazy_torch

from merge.errors import InvalidArgumentError
from merge.ops.apply import UNIT  # statistics per unit (a row slab for DELLA), added in order
from merge.ops.registry import Operator, Param, Resolved, register, weight_param
from merge.ops.rng import BLOCK, below, numpy_draws, numpy_uniforms, rng_key, spread, uniforms, word_limits, \
    words_within
from merge.ops.select import Band, BandCounters, RadixSelect, keep_band, radix_passes, whole_band

torch = lazy_torch(__name__)

__all__ = ["TaskSpec", "TaskTensor", "UNIT"]

Sparsify = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
RESCALE_EPS = 1e-7
DRAWN_MEMBERS = 4  # members whose random masks the rescale pass keeps for the combination (n / 8 bytes each)


@dataclass(frozen=True)
class TaskSpec:
    consensus: bool
    sparsify: Sparsify
    normalize: bool
    rescale: bool

    def tensor(self, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0,
               name: str = "", method: str = "") -> TaskTensor:
        """The :class:`TaskTensor` that merges one tensor of this method (the whole-tensor path asks here)."""
        return TaskTensor(self, resolved, shape, dtype, seed=seed, name=name, method=method)


@dataclass
class _Member:
    weight: float
    density: float
    gamma: float = 0.0
    epsilon: float = 0.0
    band: Band | None = None           # magnitude / outliers: which ranks survive
    select: RadixSelect | None = None
    scale: float = 1.0                 # rescale factor
    key: tuple[int, ...] | None = None  # random: the keyed generator
    sparse: bool = False               # sparsification changes this member's task vector
    sums: list[tuple[float, float]] = field(default_factory=list)  # rescale pass: (sum|d|, sum|kept d|) per unit
    # random masks drawn in the rescale pass, kept for the combination as bits (1/32 of the tensor in float32),
    # by chunk start: DELLA's ranking (a sort of every row) and the draws then run once per element, not twice
    drawn: dict[int, np.ndarray] = field(default_factory=dict)
    keep_drawn: bool = True


class TaskTensor:
    """One tensor of a task-vector merge: its statistics passes, then its combination, chunk by chunk.

    Args:
        spec: the method.
        resolved: parameter values for this tensor.
        shape: the tensor's shape.
        dtype: compute dtype (float32 or float64).
        seed, name: key the random masks.
    """

    def __init__(self, spec: TaskSpec, resolved: Resolved, shape: tuple[int, ...], dtype: torch.dtype, *,
                 seed: int = 0, name: str = "", method: str = ""):
        self.spec, self.shape, self.dtype, self.name = spec, tuple(shape), dtype, name
        # numpy arrays for a numpy dtype (merge.backend.arrays), torch tensors otherwise: the same kernels
        self.xp = arrays_for(dtype)
        n = 1
        for s in self.shape:
            n *= s
        self.numel = n
        sh = resolved.shared
        self.normalize = bool(sh.get("normalize", spec.normalize))
        self.rescale = bool(sh.get("rescale", spec.rescale))
        self.lam = float(sh.get("lambda", 1.0))
        self.members: list[_Member] = []
        for i, p in enumerate(resolved.members):
            m = _Member(float(p["weight"]), float(p.get("density", 1.0)), float(p.get("gamma", 0.0)),
                        float(p.get("epsilon", 0.0)))
            m.sparse = spec.sparsify is not None and m.density < 1
            if spec.sparsify == "della_magprune" and m.sparse and m.density > 0:
                if m.density + m.epsilon >= 1 or m.density - m.epsilon <= 0:
                    raise InvalidArgumentError(
                        f"method {method!r}: member {i}: epsilon {m.epsilon:g} must keep density +/- epsilon inside "
                        f"(0, 1) (density {m.density:g})", member=i, option="epsilon")
            if m.sparse and spec.sparsify in ("random", "della_magprune"):
                m.key = rng_key(seed, name, i)
            if m.sparse and spec.sparsify in ("magnitude", "magnitude_outliers"):
                r0, r1 = self._band_ranks(m)
                if r0 < r1 and (r0 > 0 or r1 < n):  # a real boundary: find it in the statistics passes
                    ranks = {r0} if r0 > 0 else set()
                    if r1 < n:
                        ranks.add(r1 - 1)
                    m.select = RadixSelect(tuple(sorted(ranks)), dtype)
                else:
                    m.band = Band(n, r0, r1)
            self.members.append(m)
        self._check_range(method)
        # the rescale pass's random masks, kept as bits until the combination (see _Member.drawn), for at most
        # DRAWN_MEMBERS members: working memory stays the same whatever the number of members
        drawn = [m for m in self.members if m.key is not None] if self.rescale else []
        for m in drawn[DRAWN_MEMBERS:]:
            m.keep_drawn = False
        self.extra_bytes = DRAWN_MEMBERS * ((self.numel + 7) // 8) if drawn else 0
        # as mergekit sums them: the weights in the compute dtype (read only to normalise without consensus)
        self._weight_sum = self.xp.weight_sum([m.weight for m in self.members], dtype) \
            if self.normalize and not spec.consensus else None
        # DELLA ranks magnitudes within each row (dim 1 of the tensor seen as [rows, row, rest]).
        if spec.sparsify == "della_magprune":
            dims = self.shape if len(self.shape) >= 2 else (1, self.numel)
            self.rows = dims[0]
            self.row_len = dims[1]
            rest = 1
            for s in dims[2:]:
                rest *= s
            self.rest = rest
            self.unit = max(1, self.row_len * self.rest)
        else:
            self.unit = UNIT

    def _check_range(self, method: str) -> None:
        """Refuse weights and lambda the compute dtype cannot hold: the weights (and the sums of them that
        normalise, in that dtype) multiply every chunk as they are given."""
        top = self.xp.finfo_max(self.dtype)
        name = str(self.dtype).removeprefix("torch.")
        total = sum(abs(m.weight) for m in self.members)  # float64: inf when it overflows, refused below
        if not total <= top:
            shown = ", ".join(f"{m.weight:g}" for m in self.members[:4]) + (", ..." if len(self.members) > 4 else "")
            raise InvalidArgumentError(f"method {method!r}: the weights ({shown}) add up beyond the range of the "
                                       f"{name} accumulator (largest {top:.4g}); a task merge uses them as given: "
                                       "scale them down", option="weight")
        if not abs(self.lam) <= top:
            raise InvalidArgumentError(f"method {method!r}: lambda {self.lam:.4g} is beyond the range of the {name} "
                                       f"accumulator (largest {top:.4g}); use a smaller value", option="lambda")

    # ---- the schedule ----------------------------------------------------------------------------------

    def _band_ranks(self, m: _Member) -> tuple[int, int]:
        n = self.numel
        if self.spec.sparsify == "magnitude":
            if m.density <= 0 or n == 0:
                return 0, 0
            k = max(1, int(m.density * n))
            return max(0, n - k), n
        target = int(m.density * n)
        n_top = int(m.gamma * n)
        n_bot = max(0, n - target - n_top)
        return n_bot, n_bot + target

    def stat_passes(self) -> list[tuple[str, list[int]]]:
        """The passes over members before the combination: ``(kind, members)``, in order."""
        passes: list[tuple[str, list[int]]] = []
        sel = [i for i, m in enumerate(self.members) if m.select is not None]
        if sel:
            for level in range(radix_passes(self.dtype)):
                passes.append((f"radix{level}", sel))
        if self.rescale:
            resc = [i for i, m in enumerate(self.members)
                    if m.sparse and not (m.band is not None and m.band.drop_all)
                    and not (self.spec.sparsify in ("random", "della_magprune") and m.density <= 0)]
            if resc:
                passes.append(("rescale", resc))
        return passes

    # ---- statistics -------------------------------------------------------------------------------------

    def select_whole(self, i: int, a: torch.Tensor) -> None:
        """Member ``i``'s band from its whole magnitudes ``a`` in memory (:func:`merge.ops.select.whole_band`).

        The same band as the chunked radix passes, from one read of the member instead of one per level, and
        with the positions of its ties' cuts, which spare the combination a running count of ties.
        """
        m = self.members[i]
        m.band = whole_band(a, *self._band_ranks(m))
        m.select = None

    def stat_begin(self, kind: str, i: int) -> None:
        m = self.members[i]
        if kind.startswith("radix"):
            m.select.begin(int(kind[5:]))
        else:
            m.sums = []
            m.drawn = {}
            self._counters = BandCounters()

    def stat_chunk(self, kind: str, i: int, d: torch.Tensor, start: int) -> bool:
        """Fold one chunk of member ``i``'s task vector (flattened, in tensor order) into a statistic.

        Returns False when the chunk holds a NaN or an infinity.
        """
        m = self.members[i]
        a = self.xp.abs(d)
        if kind.startswith("radix"):
            m.select.add(a)
            return kind != "radix0" or self.xp.sum_is_finite(a)  # one check per member is enough
        mask = self.keep_mask(i, a, start, self._counters)
        if mask is not None and m.key is not None and m.keep_drawn and mask.device.type == "cpu":
            m.drawn[start] = np.packbits(mask.numpy())
        totals = _unit_sums(a, self.unit)
        # in place, after the totals: a fresh ``a * mask`` cost 4x the multiplication (a new buffer's page faults)
        m.sums.extend(zip(totals, totals if mask is None else _unit_sums(self.xp.mul_mask_(a, mask), self.unit)))
        return all(math.isfinite(t) for t in totals)

    def stat_end(self, kind: str, i: int) -> None:
        m = self.members[i]
        if kind.startswith("radix"):
            m.select.end()
            if m.select._level == m.select.passes - 1:
                r0, r1 = self._band_ranks(m)
                m.band = Band.from_select(m.select, self.numel, r0, r1)
                m.select = None  # the histograms are done with: memory stays flat in the member count
            return
        before = after = 0.0
        for t, k in m.sums:  # units in order: the same additions for any chunking
            before += t
            after += k
        m.scale = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
        m.sums = []

    # ---- masks -------------------------------------------------------------------------------------------

    def keep_mask(self, i: int, a: torch.Tensor, start: int, counters: BandCounters,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Which elements of member ``i``'s chunk of magnitudes ``a`` survive (None: all).

        A bool mask, or with ``out`` (two float buffers) a 1.0/0.0 mask in ``out[0]`` (see ``keep_band``).
        """
        m = self.members[i]
        if not m.sparse:
            return None
        kind = self.spec.sparsify
        if kind in ("magnitude", "magnitude_outliers"):
            if m.band is None:
                r0, r1 = self._band_ranks(m)
                m.band = Band(self.numel, r0, r1)
            return keep_band(a, m.band, counters, out, start)
        dst = None if out is None else out[0][: a.numel()]
        if m.density <= 0:
            return torch.zeros_like(a, dtype=torch.bool) if dst is None else dst.zero_()
        if a.device.type == "cpu" and numpy_draws(a.device) and (kind == "random" or a.dtype == torch.float32):
            # numpy on the CPU: the same comparisons, on the draws' words and in rank order (see _della_rank_order)
            keep = torch.from_numpy(below(m.key, start, a.numel(), m.density) if kind == "random"
                                    else self._della_keep_cpu(m, a, start))
            if dst is not None:
                self.xp.copy_into(dst, keep)
            return keep if dst is None else dst
        u = uniforms(m.key, start, a.numel(), device=a.device)
        bound = m.density if kind == "random" else self._della_probs(m, a)
        return torch.lt(u, bound) if dst is None else torch.lt(u, bound, out=dst)

    def _della_probs(self, m: _Member, a: torch.Tensor) -> torch.Tensor:
        """DELLA's keep probability of each element, from its magnitude rank within its row (torch, any device)."""
        rows = a.numel() // max(1, self.row_len * self.rest)
        v = a.reshape(rows, self.row_len, self.rest)
        order = torch.argsort(v, dim=1, stable=True)
        ranks = torch.empty_like(order)
        ar = torch.arange(self.row_len, device=a.device).view(1, -1, 1).expand_as(order)
        ranks.scatter_(1, order, ar)
        # the probabilities of ranks 0 .. row_len - 1 computed on the CPU, gathered by rank: the same floats on
        # every device (CUDA divides by a scalar through its reciprocal, which may differ in the last bit)
        table = self._della_table(m).to(a.device)
        return table[ranks.reshape(-1)]

    def _della_table(self, m: _Member) -> torch.Tensor:
        """DELLA's keep probability of each rank ``0 .. row_len - 1`` (float32, on the CPU).

        ``(density - epsilon) + r / (row_len - 1) * 2 * epsilon`` in float32, in torch's order of operations; a
        row of one element (mergekit divides 0 by 0) ranks as the lowest.
        """
        ranks = torch.arange(self.row_len)
        if self.row_len > 1:
            rank_norm = ranks.to(torch.float32) / (self.row_len - 1)
        else:
            rank_norm = torch.zeros(ranks.shape, dtype=torch.float32)
        return (m.density - m.epsilon) + rank_norm * 2 * m.epsilon

    def _della_keep_cpu(self, m: _Member, a: torch.Tensor, start: int) -> np.ndarray:
        """``uniforms < _della_probs`` of a float32 chunk on the CPU, with numpy, rows split across threads."""
        limits = word_limits(self._della_table(m).numpy())
        v = np.ascontiguousarray(a.numpy())
        unit = self.row_len * self.rest
        keep = np.empty(v.size, dtype=bool)

        def part(r0: int, r1: int) -> None:
            lo, hi = r0 * unit, r1 * unit
            rows = v[lo:hi].reshape(r1 - r0, self.row_len, self.rest)
            if limits is None:  # a probability of 0 (density - epsilon below float32's range): compare the floats
                bound = _della_rank_order(rows, self._della_table(m).numpy())
                np.less(numpy_uniforms(m.key, start + lo, hi - lo), bound, out=keep[lo:hi])
            else:
                words_within(m.key, start + lo, _della_rank_order(rows, limits), keep[lo:hi])

        spread(part, v.size // max(1, unit), grain=max(1, BLOCK // max(1, unit)))
        return keep

    # ---- the combination ---------------------------------------------------------------------------------

    def begin_chunk(self, count: int, device: torch.device, *, zero: bool = True) -> dict:
        """The working state of a chunk of ``count`` elements, its running sums zeroed (with ``zero=False``, left
        for :meth:`zero_sums` to clear, part by part)."""
        xp = self.xp
        buffers = getattr(self, "_buffers", None)
        if buffers is None or xp.numel(buffers["S"]) < count or self._device != device:
            names = ("S", "abs", "m1", "m2", "tmp") + (("P", "Q", "Dp", "Dn") if self.spec.consensus else ())
            buffers = self._buffers = {k: xp.empty(count, self.dtype, device) for k in names}
            buffers["up"] = xp.empty(count, xp.bits_dtype(self.dtype), device)  # the float's bit pattern
            self._device = device
        state = {k: v[:count] for k, v in buffers.items()}
        if zero:
            self.zero_sums(state)
        if not hasattr(self, "_merge_counters"):
            self._merge_counters = [BandCounters() for _ in self.members]
        return state

    def zero_sums(self, state: dict) -> None:
        """Zero the running sums of a chunk's state (or of one part of it)."""
        for k in ("S", "P", "Q", "Dp", "Dn"):
            if k in state:
                self.xp.zero_(state[k])

    @staticmethod
    def part(state: dict, lo: int, hi: int) -> dict:
        """Elements ``[lo, hi)`` of a chunk's state, as views: :meth:`add_member` and :meth:`finish_chunk` on one part
        write only its slice (and use its slice of the scratch), so parts can run on different threads."""
        return {k: v[lo:hi] for k, v in state.items()}

    def splits(self) -> bool:
        """Whether an element's combination depends only on its own values and position, so that a chunk can be cut
        into parts (:meth:`part`) merged on several threads with the same bits: not where a band splits a run of ties
        with running counts (:attr:`merge.ops.select.Band.counted`), nor where masks are drawn (they are torch's).
        Asked after the statistics passes (the bands are known then)."""
        if self.spec.sparsify not in (None, "magnitude", "magnitude_outliers"):
            return False
        return not any(m.sparse and (m.band is None or m.band.counted) for m in self.members)

    def add_member(self, state: dict, i: int, d: torch.Tensor, start: int) -> None:
        """Fold member ``i``'s task-vector chunk ``d`` (modified in place) into the running sums."""
        m, xp = self.members[i], self.xp
        tmp = state["tmp"]
        if m.sparse:
            drawn = m.drawn.pop(start, None)  # drawn only by the random methods, on torch
            if drawn is not None and drawn.size * 8 >= d.numel():  # the rescale pass's draws: 1.0/0.0
                mask = state["m1"][: d.numel()].copy_(torch.from_numpy(np.unpackbits(drawn, count=d.numel())))
            else:
                mask = self.keep_mask(i, xp.abs_into(state["abs"], d), start, self._merge_counters[i],
                                      out=(state["m1"], state["m2"]))
            if mask is not None:
                xp.mul_mask_(d, mask)
            if m.scale != 1.0:
                xp.mul_(d, m.scale)
        if m.weight != 1.0:
            xp.mul_(d, m.weight)
        xp.add_(state["S"], d)
        if self.spec.consensus:
            xp.clamp_into(tmp, d, min=0)
            xp.add_(state["P"], tmp)
            xp.clamp_into(tmp, d, max=0)
            xp.add_(state["Q"], tmp)
            xp.add_masked_(state["Dp"], xp.cmp_into(tmp, d, "gt", 0), m.weight)
            xp.add_masked_(state["Dn"], xp.cmp_into(tmp, d, "lt", 0), m.weight)

    def finish_chunk(self, state: dict, base: torch.Tensor) -> torch.Tensor:
        """``base + lambda * merged`` for this chunk (in the compute dtype), written into ``state["S"]`` and
        returned."""
        xp = self.xp
        if self.spec.consensus:
            up = xp.neg_(xp.cmp_into(state["up"], state["S"], "ge", 0))  # all bits set where the elected sign is +
            mixed = _where_bits(up, state["P"], state["Q"], out=state["S"])
            if self.normalize:
                div = _where_bits(up, state["Dp"], state["Dn"], out=state["tmp"])
                xp.add_(div, xp.cmp_into(state["m1"], div, "eq", 0))  # 0 -> 1 (as masked_fill), others + 0.0
                xp.div_(mixed, div)
        else:
            mixed = state["S"]
            if self.normalize and abs(self._weight_sum) >= 1e-8:
                xp.div_(mixed, self._weight_sum)
        if self.lam != 1.0:
            xp.mul_(mixed, self.lam)
        xp.add_(mixed, base)
        return mixed


def _where_bits(up: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``torch.where(up, a, b)`` into ``out``, bit for bit, with ``up`` an integer mask of all ones or zeros.

    Selects through the bit patterns (``b ^ ((a ^ b) & up)``): on the CPU several times faster than
    ``torch.where`` on a bool mask. ``out`` may be ``a`` itself, never ``b``. Torch tensors or numpy arrays.
    """
    xp = arrays_of(a)
    ai, bi, oi = xp.bits(a), xp.bits(b), xp.bits(out)
    xp.xor_into(oi, ai, bi)
    return xp.xor_(xp.and_(oi, up), bi).view(a.dtype)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block: sums then round the same whatever the thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


SUM_GRAIN = 1 << 17  # elements per thread, at least, in the rescale pass's unit sums


def _unit_sums(a: torch.Tensor, unit: int) -> list[float]:
    """The float64 sum of each run of ``unit`` elements of ``a`` (the last run may be shorter), on one thread.

    The whole runs are summed as the rows of one ``(runs, unit)`` view: torch reduces each row of a contiguous
    inner reduction on its own, exactly as it sums the row as a 1-D tensor (``vectorized_inner_sum``: the same
    cascade per row), so the floats are those of one ``sum`` call per run, without a call per run (DELLA's runs
    are rows: hundreds of thousands per tensor).
    """
    n = a.numel()
    whole = n - n % unit
    runs = whole // unit
    if a.device.type == "cpu" and runs > 1:
        # the runs cut over the pool's threads (each row's sum is the same on any thread, and torch is held to
        # one thread in each: a sum's rounding must not depend on how many threads split it)
        out = torch.empty(runs, dtype=torch.float64)

        def part(lo: int, hi: int) -> None:
            with one_thread():
                torch.sum(a[lo * unit: hi * unit].view(-1, unit), dim=1, dtype=torch.float64, out=out[lo:hi])

        spread(part, runs, grain=max(1, SUM_GRAIN // unit))
        sums = out.tolist()
    else:
        with one_thread():
            sums = a[:whole].view(-1, unit).sum(dim=1, dtype=torch.float64).tolist() if whole else []
    if whole < n:
        with one_thread():
            sums.append(float(a[whole:].sum(dtype=torch.float64)))
    return sums


_HIGH = 1 if sys.byteorder == "little" else 0  # the int32 half of an int64 that holds its high bits


RADIX_MIN_ROW = 1024  # rows at least this long are ranked by two 16-bit radix passes instead of one int64 sort


def _della_rank_order(v: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[rank]`` for each element of non-negative float32 ``v`` (rows, row, rest), flattened in ``v``'s order,
    with ``rank`` its stable rank along dim 1 (as ``argsort(argsort(v, stable=True))``).

    Each row's positions in rank order come from its magnitudes' int32 bits (which order non-negative floats as
    the floats): below :data:`RADIX_MIN_ROW`, one int64 key per element, the bits (high half) and the position
    (low half), so the keys are distinct and any sort orders them as a stable sort orders the magnitudes; from
    it, two stable passes of numpy's 16-bit radix sort (the low halves, then the signed high halves), whose
    stability keeps equal magnitudes in position order (measured on this 2-core box: 11-15 ns an element against
    19-31 for the key sort on rows of 2048-11008; 4-11 against 12-15 below 1024). The positions then take the
    table in rank order: ``out[row, pos[j]] = table[j]``, one scatter instead of ranks, their float conversion
    and the arithmetic per element.
    """
    rows, width, rest = v.shape
    bits = v.view(np.int32)
    if rest > 1:
        bits = bits.transpose(0, 2, 1)
    n = rows * rest
    if width >= RADIX_MIN_ROW:
        b = bits.reshape(n, width)
        offsets = np.arange(0, n * width, width, dtype=np.intp)[:, None]
        where = np.argsort((b & 0xFFFF).astype(np.uint16), axis=1, kind="stable")
        where += offsets
        high = (b >> 16).astype(np.int16).reshape(-1)[where]
        second = np.argsort(high, axis=1, kind="stable")
        del high
        second += offsets
        where = where.reshape(-1)[second]
        del second
    else:
        keys = np.empty((n, width), dtype=np.int64)
        halves = keys.view(np.int32).reshape(n, width, 2)
        halves[..., _HIGH] = bits.reshape(n, width)
        halves[..., 1 - _HIGH] = np.arange(width, dtype=np.int32)
        keys.sort(axis=1)
        where = halves[..., 1 - _HIGH] + np.arange(0, n * width, width, dtype=np.int64)[:, None]
        del keys, halves
    out = np.empty(n * width, dtype=table.dtype)
    out[where.reshape(-1)] = np.broadcast_to(table, (n, width)).reshape(-1)
    if rest > 1:
        out = out.reshape(rows, rest, width).transpose(0, 2, 1).reshape(-1)
    return out


def _task_params(spec: TaskSpec) -> tuple[Param, ...]:
    params = [
        weight_param(help="scale of each member's task vector"),
        Param("density", 1.0, float, per_member=True, low=0.0, high=1.0, help="fraction of each task vector kept"),
        Param("normalize", spec.normalize, bool, help="divide by the sum of the (agreeing) weights"),
        Param("rescale", spec.rescale, bool, help="L1-rescale the kept part to the task vector's L1 norm"),
        Param("lambda", 1.0, float, help="scale of the merged task vector"),
        Param("int8_mask", False, bool, help="mergekit's memory option for the sign mask; no effect on the result"),
    ]
    if spec.sparsify == "magnitude_outliers":
        params.append(Param("gamma", 0.01, float, per_member=True, low=0.0, high=1.0,
                            help="fraction of the largest magnitudes dropped"))
    if spec.sparsify == "della_magprune":
        params.append(Param("epsilon", 0.15, float, per_member=True, low=0.0, high=1.0,
                            help="spread of keep probabilities around density"))
    return tuple(params)


_TIES_DIFF = ("exact streaming selection instead of argsort; ties at the threshold kept by position "
              "(torch's unstable sort leaves them unspecified); computes in float32 (or float64) whatever "
              "the input dtype")
_RANDOM_DIFF = ("masks drawn from a generator keyed by (seed, tensor, member, position) instead of torch's "
                "global one: same distribution, different draws; computes in float32 (or float64)")

for _name, _spec, _cite, _summary, _diff in [
    ("task_arithmetic", TaskSpec(False, None, False, False),
     "Ilharco et al. 2023, Editing models with task arithmetic (ICLR); mergekit task_arithmetic",
     "base + lambda * sum_i w_i (x_i - base)", "computes in float32 (or float64) whatever the input dtype"),
    ("ties", TaskSpec(True, "magnitude", True, False),
     "Yadav et al. 2023, TIES-Merging: resolving interference when merging models (NeurIPS); mergekit ties",
     "trim each task vector to its largest magnitudes, elect signs, average the agreeing", _TIES_DIFF),
    ("dare_ties", TaskSpec(True, "random", False, True),
     "Yu et al. 2024, Language models are super Mario (DARE, ICML); mergekit dare_ties",
     "drop task-vector elements at random and rescale, then TIES sign election", _RANDOM_DIFF),
    ("dare_linear", TaskSpec(False, "random", False, True),
     "Yu et al. 2024, Language models are super Mario (DARE, ICML); mergekit dare_linear",
     "drop task-vector elements at random and rescale, then sum", _RANDOM_DIFF),
    ("breadcrumbs", TaskSpec(False, "magnitude_outliers", False, False),
     "Davari & Belilovsky 2024, Model breadcrumbs (ECCV); mergekit breadcrumbs",
     "drop the largest (gamma) and smallest magnitudes of each task vector, then sum", _TIES_DIFF),
    ("breadcrumbs_ties", TaskSpec(True, "magnitude_outliers", False, False),
     "Davari & Belilovsky 2024, Model breadcrumbs (ECCV), with TIES sign election; mergekit breadcrumbs_ties",
     "breadcrumbs masks, then TIES sign election", _TIES_DIFF),
    ("della", TaskSpec(True, "della_magprune", True, True),
     "Deep et al. 2024, DELLA-Merging: magnitude-based sampling (arXiv 2406.11617); mergekit della",
     "drop with probabilities ranked by magnitude within rows, rescale, TIES sign election", _RANDOM_DIFF),
    ("della_linear", TaskSpec(False, "della_magprune", False, True),
     "Deep et al. 2024, DELLA-Merging (arXiv 2406.11617); mergekit della_linear",
     "DELLA masks and rescale, then sum", _RANDOM_DIFF),
]:
    register(Operator(_name, _cite, _summary, "task", base="required", params=_task_params(_spec),
                      random=_spec.sparsify in ("random", "della_magprune"), task=_spec, differences=_diff))
