"""Random numbers keyed by (seed, tensor name, member, element position).

DARE and DELLA drop each element of a task vector with some probability. The draw for element ``j``
of member ``i``'s tensor ``name`` depends only on ``(seed, name, i, j)``: the flattened tensor is cut
into blocks of :data:`BLOCK` elements, block ``b`` gets its own PCG64 generator seeded with
``(seed, hash(name), i, b)``, and element ``j`` takes the ``j % BLOCK``-th float of block
``j // BLOCK``. So a chunked merge draws exactly what a whole-tensor merge draws, whatever the chunk
size and the device, and a rerun draws the same again. (mergekit draws with ``torch.bernoulli`` from
torch's global generator, whose stream depends on the order tensors are processed; no other tool
can reproduce it, so papa-merge matches its statistics, not its bits.)

Two implementations produce the same bits. On the CPU the floats come from numpy
(``Generator(PCG64(SeedSequence([*key, b]))).random(dtype=float32)``). On any other device they are
computed there with torch integer ops (:func:`_torch_uniforms`), reproducing numpy's stream: numpy's
PCG64 is PCG's XSL-RR 128/64 generator (``state = state * MULT + inc`` mod 2**128, then output
``rotr64(hi ^ lo, state >> 122)``); a float32 is ``(next_uint32 >> 8) * 2**-24``, and ``next_uint32``
takes the low 32 bits of a 64-bit output, then its high 32 bits. So element ``j`` of a block is half
``j % 2`` of 64-bit output ``k = j // 2``, produced by the state after ``k + 1`` steps, which is reached
by jump-ahead: ``A[k] * state0 + G[k] * inc`` mod 2**128 with ``A[k] = MULT**(k+1)`` and
``G[k] = sum(MULT**i for i <= k)``. The tables are python ints computed once; the 128-bit products run
on 16-bit limbs in int64 tensors (every partial product is below 2**32), so they are exact on every
device. Only each block's seeded ``(state0, inc)`` is computed on the CPU.

On the CPU the words come straight from each block's bit generator (``PCG64.random_raw``: two floats per
64-bit output, the low half first, as ``Generator.random`` takes them; ``PCG64.advance`` skips a block's
prefix), on up to ``torch.get_num_threads()`` threads over runs of blocks (numpy releases the GIL while it
draws). A draw compared with a fixed bound (DARE's density) is a comparison of the words themselves
(:func:`below`), without the floats.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["BLOCK", "below", "numpy_draws", "numpy_uniforms", "rng_key", "spread", "torch_on_one_thread", "uniforms",
           "word_limits", "words_within"]

BLOCK = 1 << 16

#: Where the draws are computed: ``"auto"`` (numpy on the CPU, torch on any other device), ``"numpy"``
#: or ``"torch"`` everywhere. Both give the same bits; the setting exists for tests and measurements.
BACKEND = "auto"

_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG_DEFAULT_MULTIPLIER_128, numpy/random/src/pcg64/pcg64.h
_MASK = (1 << 128) - 1
_LIMBS = 8  # 16-bit limbs of a 128-bit number, least significant first


def rng_key(seed: int, name: str, member: int) -> tuple[int, ...]:
    """The words that key member ``member``'s draws for tensor ``name``."""
    digest = hashlib.blake2b(f"{name}".encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i: i + 4], "little") for i in range(0, 16, 4)]
    return (int(seed) & 0xFFFFFFFFFFFFFFFF, *words, int(member))


def uniforms(key: tuple[int, ...], start: int, count: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``count`` float32 uniforms in [0, 1) for flattened positions ``start .. start + count - 1``."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if not numpy_draws(dev):
        return _torch_uniforms(key, start, count, dev)
    t = torch.from_numpy(_numpy_uniforms(key, start, count))
    return t if dev.type == "cpu" else t.to(dev, non_blocking=False)


def numpy_draws(device: torch.device | str | None) -> bool:
    """Whether the draws for tensors on ``device`` are computed with numpy (see :data:`BACKEND`)."""
    if BACKEND != "auto":
        return BACKEND == "numpy"
    return device is None or torch.device(device).type == "cpu"


def numpy_uniforms(key: tuple[int, ...], start: int, count: int) -> np.ndarray:
    """:func:`uniforms` on the CPU as a numpy float32 array (numpy's draws, whatever :data:`BACKEND` says)."""
    return _numpy_uniforms(key, start, count)


def below(key: tuple[int, ...], start: int, count: int, bound: float) -> np.ndarray:
    """``uniforms(key, start, count) < bound`` as a numpy bool array, compared as torch compares: in float32."""
    limit = word_limits(np.array([bound], dtype=np.float32))
    out = np.empty(count, dtype=bool)
    if limit is None:  # a bound of 0 or below (or NaN): no float is below it
        out.fill(False)
        return out

    def part(lo: int, hi: int) -> None:
        for at, words in _word_runs(key, start + lo, hi - lo):
            np.less_equal(words, limit[0], out=out[lo + at: lo + at + words.size])

    spread(part, count, grain=BLOCK)
    return out


def word_limits(bounds: np.ndarray) -> np.ndarray | None:
    """The largest word below each float32 bound: a draw's float is below ``b`` exactly when its word is at most
    ``word_limits(b)``. None when a bound is 0 or below, or NaN (no word is below it).

    A float ``(w >> 8) * 2**-24`` is below ``b`` exactly when the integer ``w >> 8 < ceil(b * 2**24)`` (``b * 2**24``
    is exact), i.e. when ``w <= ceil(b * 2**24) * 256 - 1``, which is at most ``2**32 - 1`` for any ``b <= 1``.
    """
    scaled = np.ceil(np.minimum(bounds.astype(np.float64), 1.0) * float(1 << 24))
    if not bool((scaled >= 1).all()):
        return None
    return (scaled.astype(np.uint64) * 256 - 1).astype(np.uint32)


def words_within(key: tuple[int, ...], start: int, limits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[j] = word(start + j) <= limits[j]`` (see :func:`word_limits`), on the calling thread."""
    for at, words in _word_runs(key, start, limits.size):
        np.less_equal(words, limits[at: at + words.size], out=out[at: at + words.size])
    return out


def _numpy_uniforms(key: tuple[int, ...], start: int, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.float32)

    def part(lo: int, hi: int) -> None:
        pos, end = start + lo, start + hi
        while pos < end:
            b = pos // BLOCK
            first, last = pos - b * BLOCK, min(end - b * BLOCK, BLOCK)  # the block's floats [first, last)
            gen = np.random.PCG64(np.random.SeedSequence([*key, b]))
            if first > 1:
                gen.advance(first // 2)  # whole 64-bit outputs skipped: two floats each
            dst = out[pos - start: pos - start + last - first]
            if first % 2:  # the run starts on the high half of an output: draw its low half too, then drop it
                dst[:] = np.random.Generator(gen).random(last - first + 1, dtype=np.float32)[1:]
            else:
                np.random.Generator(gen).random(last - first, dtype=np.float32, out=dst)
            pos += last - first

    spread(part, count, grain=BLOCK)
    return out


_LOW_FIRST = sys.byteorder == "little"  # a 64-bit output viewed as two uint32: its low half first


def _word_runs(key: tuple[int, ...], start: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """The uint32 words behind positions ``start .. start + count - 1``, a block at a time, as ``(offset, words)``:
    the float of a position is ``(word >> 8) * 2**-24``.

    numpy's ``Generator.random(dtype=float32)`` takes ``next_uint32`` from PCG64: the low 32 bits of a 64-bit
    output, then its high 32 bits; a fresh block's generator has no half-output buffered, so its words are
    its raw outputs seen as uint32 pairs.
    """
    pos, end = start, start + count
    while pos < end:
        b = pos // BLOCK
        first, last = pos - b * BLOCK, min(end - b * BLOCK, BLOCK)  # the block's floats [first, last)
        k0, k1 = first // 2, (last + 1) // 2  # its 64-bit outputs [k0, k1)
        gen = np.random.PCG64(np.random.SeedSequence([*key, b]))
        if k0:
            gen.advance(k0)
        raw = gen.random_raw(k1 - k0)
        words = raw.view(np.uint32) if _LOW_FIRST else raw.view(np.uint32).reshape(-1, 2)[:, ::-1].reshape(-1)
        skip = first - 2 * k0
        yield pos - start, words[skip: skip + last - first]
        pos += last - first


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_INSIDE = threading.local()  # set while a thread runs a part: parts never spread again (no pool deadlock)
_POOL_THREADS: int | None = None  # while torch_on_one_thread runs: the threads torch had, for the pool


@contextlib.contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """torch on one thread inside the block, :func:`spread` on the threads torch had.

    DARE's and DELLA's CPU time goes to numpy (draws, row sorts) on the pool's threads, between short torch
    ops; torch's OpenMP workers spin for a while after each op and take the second core from the pool and
    from the chunk reader. Elementwise results do not depend on the thread count (and the sums already run
    on one thread), so only the time changes.
    """
    global _POOL_THREADS
    n = torch.get_num_threads()
    if n == 1 or _POOL_THREADS is not None:
        yield
        return
    _POOL_THREADS = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _POOL_THREADS = None


def spread(fn: Callable[[int, int], None], n: int, *, grain: int, threads: int | None = None) -> None:
    """``fn(lo, hi)`` over ``[0, n)`` cut into parts of at least ``grain`` items, on up to ``threads`` threads
    (default: ``torch.get_num_threads()``, or the count :func:`torch_on_one_thread` saved), the calling one included.
    Pass ``threads`` where torch is not imported (the numpy lane).

    Each part must write only its own slice of the results, so they do not depend on the cut: numpy's
    draws, sorts, fancy indexing and ufuncs release the GIL, which is what makes the threads pay.
    """
    threads = 1 if getattr(_INSIDE, "on", False) else (threads or _POOL_THREADS or torch.get_num_threads())
    parts = max(1, min(threads, n // max(1, grain)))
    if parts == 1:
        fn(0, n)
        return
    cuts = [n * k // parts for k in range(parts + 1)]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < parts - 1:
            _POOL = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="papa-merge-draws")
        pool = _POOL
    futures = [pool.submit(_part, fn, cuts[k], cuts[k + 1]) for k in range(1, parts)]
    try:
        _part(fn, cuts[0], cuts[1])
    finally:
        for f in futures:
            f.result()


def _part(fn: Callable[[int, int], None], lo: int, hi: int) -> None:
    before = getattr(_INSIDE, "on", False)
    _INSIDE.on = True
    try:
        fn(lo, hi)
    finally:
        _INSIDE.on = before


def _limbs(values: list[int]) -> np.ndarray:
    """128-bit python ints as an ``(n, 8)`` int64 array of 16-bit limbs, least significant first."""
    raw = b"".join(v.to_bytes(16, "little") for v in values)
    return np.frombuffer(raw, dtype="<u2").reshape(len(values), _LIMBS).astype(np.int64)


@functools.lru_cache(maxsize=1)
def _jump_tables() -> np.ndarray:
    """``(BLOCK // 2, 2, 8)`` limbs of ``A[k] = MULT**(k+1)`` and ``G[k] = sum(MULT**i, i <= k)``."""
    a, g, avals, gvals = 1, 0, [], []
    for _ in range(BLOCK // 2):
        g = (g + a) & _MASK
        a = (a * _MULT) & _MASK
        avals.append(a)
        gvals.append(g)
    return np.stack([_limbs(avals), _limbs(gvals)], axis=1)


_DEVICE_TABLES: dict[str, torch.Tensor] = {}


def _device_tables(device: torch.device) -> torch.Tensor:
    k = str(device)
    if k not in _DEVICE_TABLES:
        _DEVICE_TABLES[k] = torch.from_numpy(_jump_tables()).to(device)
    return _DEVICE_TABLES[k]


def _seeded(key: tuple[int, ...], block: int) -> tuple[int, int]:
    """Block ``block``'s PCG64 ``(state, inc)`` after numpy's seeding."""
    s = np.random.PCG64(np.random.SeedSequence([*key, block])).state["state"]
    return int(s["state"]), int(s["inc"])


def _torch_uniforms(key: tuple[int, ...], start: int, count: int, device: torch.device) -> torch.Tensor:
    """The same floats as :func:`_numpy_uniforms`, computed on ``device`` with integer tensor ops."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    if not count:
        return out
    half = BLOCK // 2  # 64-bit outputs per block: output k of block b gives floats 2k and 2k + 1
    p0, p1 = start // 2, (start + count - 1) // 2 + 1  # the outputs needed, [p0, p1)
    pos = start  # the next flattened position to fill
    b, last = p0 // half, (p1 - 1) // half
    group = _GROUP if device.type == "cpu" else _GROUP_DEVICE
    while b <= last:  # runs of at most `group` blocks that need the same outputs [k0, k1)
        k0, k1 = max(p0 - b * half, 0), min(p1 - b * half, half)
        n = 1
        while n < group and b + n <= last and (b + n) * half >= p0 and (b + n + 1) * half <= p1 and k1 - k0 == half:
            n += 1  # only whole blocks run together
        floats = _block_floats(key, range(b, b + n), k0, k1, device).reshape(-1)  # positions b*BLOCK + 2*k0 ...
        lo = pos - (b * BLOCK + 2 * k0)  # 1 where the run starts on the high half of an output
        take = min(floats.numel() - lo, start + count - pos)
        out[pos - start: pos - start + take] = floats[lo: lo + take]
        pos += take
        b += n
    return out


# Whole blocks computed together: the largest temporary is group * 32768 * 16 int64 (32 MiB on the CPU,
# 128 MiB on a device, where fewer, larger kernels pay), whatever the size of the request.
_GROUP, _GROUP_DEVICE = 8, 32


def _block_floats(key: tuple[int, ...], blocks: range, k0: int, k1: int, device: torch.device) -> torch.Tensor:
    """``(len(blocks), 2 * (k1 - k0))`` floats: outputs ``k0 .. k1 - 1`` of each block, low half first."""
    seeds = _limbs([v for b in blocks for v in _seeded(key, b)]).reshape(len(blocks), 1, 2, _LIMBS)
    seed = torch.from_numpy(seeds[..., ::-1].copy()).to(device)  # (n, 1, 2, 8): state0, inc, most significant first
    jump = _device_tables(device)[k0:k1].unsqueeze(0)  # (1, m, 2, 8): A[k], G[k]
    # state = A * state0 + G * inc mod 2**128, limb by limb; column r sums 2 * (r + 1) products < 2**32
    limbs, carry = [], None
    for r in range(_LIMBS):
        col = (jump[..., : r + 1] * seed[..., _LIMBS - 1 - r:]).sum(dim=(-2, -1))  # A[i] * s[r - i]
        if carry is not None:
            col += carry
        limbs.append(col & 0xFFFF)
        carry = col >> 16
    # XSL-RR: x = hi64 ^ lo64 (four 16-bit limbs), rotated right by the top 6 bits of the state
    x = torch.stack([limbs[i] ^ limbs[i + 4] for i in range(4)], dim=-1)
    rot = limbs[7] >> 10
    q, s = (rot >> 4).unsqueeze(-1), (rot & 15).unsqueeze(-1)
    idx = torch.arange(4, device=device)
    x = x.gather(-1, (idx + q) % 4)  # rotated right by 16 * q
    nxt = x.gather(-1, ((idx + 1) % 4).expand_as(x))
    x = ((x >> s) | (nxt << (16 - s))) & 0xFFFF  # then by s < 16
    # float32 = (uint32 >> 8) * 2**-24 (exact): the low half of the output first, then the high half
    lo = (x[..., 0] >> 8) | (x[..., 1] << 8)
    hi = (x[..., 2] >> 8) | (x[..., 3] << 8)
    return torch.stack([lo, hi], dim=-1).reshape(len(blocks), -1).to(torch.float32) * (1.0 / 16777216.0)
