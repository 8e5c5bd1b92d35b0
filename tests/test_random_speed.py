"""The CPU fast paths of DARE and DELLA's keyed draws equal the formulas they replace, bit for bit (issue 22).

- :func:`merge.ops.rng.below` and :func:`merge.ops.rng.words_within` compare the draws' uint32 words with
  integer limits instead of floats with bounds: checked against numpy's own ``Generator.random`` floats
  compared by torch (``torch.lt`` in float32), at starts inside blocks (even and odd), across blocks, on 1 and
  2 threads.
- DELLA's keep probabilities come from a table of ranks scattered in sorted order
  (``_della_rank_order``): checked against ``argsort(argsort(v, stable=True))`` with the old per-element
  formula, on rows with ties, rows of one element and 3-D tensors (rest > 1).
- The rescale pass's L1 sums per unit come from one ``(units, unit)`` reduction (``_unit_sums``): checked
  against one 1-D ``sum`` per unit, the calls they replace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import merge.ops.rng as rng
from merge.ops.registry import get_operator, resolve_params
from merge.ops.rng import BLOCK
from merge.ops.task import _della_rank_order, _unit_sums, one_thread

KEY = rng.rng_key(7, "model.layers.0.mlp.up_proj.weight", 2)
SPANS = [(0, 1), (1, 1), (3, 1000), (BLOCK - 1, 2), (BLOCK - 2, 5), (5, 3 * BLOCK), (2 * BLOCK + 1, 3 * BLOCK + 3),
         (17, 0)]


def _reference(key: tuple[int, ...], start: int, count: int) -> np.ndarray:
    """numpy's floats, each block drawn whole from its own generator (no shortcut)."""
    blocks = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, b]))).random(BLOCK, dtype=np.float32)
              for b in range(start // BLOCK, (start + count) // BLOCK + 1)]
    first = start - (start // BLOCK) * BLOCK
    return np.concatenate(blocks)[first: first + count]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(("start", "count"), SPANS, ids=[f"{s}+{c}" for s, c in SPANS])
def test_numpy_floats_equal_the_generators(start: int, count: int, threads: int) -> None:
    got = rng.numpy_uniforms(KEY, start, count)
    assert np.array_equal(got.view(np.uint32), _reference(KEY, start, count).view(np.uint32))


@pytest.mark.parametrize("bound", [0.5, 0.3, 0.1 + 1e-9, 0.5 + 1e-12, 0.99999999, 1.0, 1.5, 1e-9, 2.0**-24, 0.0, -1.0,
                                   float("nan")])
@pytest.mark.parametrize(("start", "count"), SPANS, ids=[f"{s}+{c}" for s, c in SPANS])
def test_below_is_torchs_float32_comparison(start: int, count: int, bound: float, threads: int) -> None:
    expected = torch.lt(torch.from_numpy(_reference(KEY, start, count)), bound).numpy()
    assert np.array_equal(rng.below(KEY, start, count, bound), expected)


@pytest.mark.parametrize(("start", "count"), SPANS, ids=[f"{s}+{c}" for s, c in SPANS])
def test_words_within_limits_is_the_float_comparison(start: int, count: int) -> None:
    u = _reference(KEY, start, count)
    gen = np.random.default_rng(start)
    bounds = gen.random(count, dtype=np.float32)
    bounds[: count // 3] = u[: count // 3]  # bounds equal to the draw: strictly below fails
    bounds[count // 3: count // 2] = np.nextafter(u[count // 3: count // 2], np.float32(1))
    limits = rng.word_limits(bounds)
    assert limits is not None
    assert np.array_equal(rng.words_within(KEY, start, limits, np.empty(count, dtype=bool)), u < bounds)
    assert rng.word_limits(np.array([0.5, 0.0], dtype=np.float32)) is None  # no word is below 0


def _old_ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(v.shape[1]).view(1, -1, 1).expand_as(order))
    return ranks


def _old_probs(ranks: torch.Tensor, width: int, density: float, epsilon: float) -> torch.Tensor:
    if width > 1:
        rank_norm = ranks.to(torch.float32) / (width - 1)
    else:
        rank_norm = torch.zeros(ranks.shape, dtype=torch.float32)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(-1)


@pytest.mark.parametrize("shape", [(7, 40, 1), (3, 5, 7), (9, 1, 1), (4, 1, 3), (2, 2048, 1), (1, 3, 1), (2, 1024, 3),
                                   (3, 1500, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_della_rank_order_is_the_stable_rank_formula(shape: tuple[int, int, int]) -> None:
    gen = np.random.default_rng(sum(shape))
    v = (np.abs(gen.integers(-3, 4, size=shape)) * 0.25).astype(np.float32)  # many ties, zeros
    v.reshape(-1)[::5] = np.abs(gen.normal(size=v.size)[::5]).astype(np.float32)
    width = shape[1]
    expected = _old_probs(_old_ranks(torch.from_numpy(v)), width, 0.5, 0.1).numpy()
    table = _old_probs(torch.arange(width), width, 0.5, 0.1).numpy()
    got = _della_rank_order(v, table)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("radix_min_row", [1, 10 ** 9], ids=["radix", "int64-keys"])
@pytest.mark.parametrize("shape", [(5, 7, 1), (3, 1100, 1), (2, 600, 3)], ids=lambda s: "x".join(map(str, s)))
def test_della_rank_order_both_sorts_rank_as_torchs_stable_argsort(shape: tuple[int, int, int], radix_min_row: int,
                                                                     monkeypatch) -> None:
    """Both ways of ordering a row (two 16-bit radix passes; one int64 key sort), forced on the same rows: the
    ranks of torch's stable argsort, with infinities, NaN (above infinity, as torch sorts it), zeros, magnitudes
    whose high or low 16 bits agree, and runs of ties."""
    import merge.ops.task as task_module

    monkeypatch.setattr(task_module, "RADIX_MIN_ROW", radix_min_row)
    gen = np.random.default_rng(sum(shape) + radix_min_row % 7)
    v = (np.abs(gen.integers(-3, 4, size=shape)) * 0.25).astype(np.float32)
    flat = v.reshape(-1)
    flat[::5] = np.abs(gen.normal(size=flat.size)[::5]).astype(np.float32)
    flat[1::11] = (flat[1::11].view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # equal low halves
    flat[2::13] = (flat[2::13].view(np.uint32) | np.uint32(0xFFFF)).view(np.float32)  # equal low halves, high differ
    flat[3::17] = np.inf
    flat[4::19] = np.nan
    width = shape[1]
    expected = _old_probs(_old_ranks(torch.from_numpy(v)), width, 0.5, 0.1).numpy()
    table = _old_probs(torch.arange(width), width, 0.5, 0.1).numpy()
    got = _della_rank_order(v, table)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("shape", [(40, 33), (3, 5, 7), (70000,), (300, 260)], ids=lambda s: "x".join(map(str, s)))
def test_numpy_masks_equal_the_torch_path_and_the_old_formula(method: str, shape: tuple[int, ...],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    op = get_operator(method)
    gen = np.random.default_rng(3)
    a = torch.from_numpy((np.abs(gen.integers(-4, 5, size=shape)) * 0.5).astype(np.float32)).reshape(-1)
    resolved = resolve_params(op, 2, {"density": 0.45, "epsilon": 0.2} if "della" in method else {"density": 0.45})
    task = op.task.tensor(resolved, shape, torch.float32, seed=11, name="w", method=method)
    unit = task.unit
    start = unit * 3 if len(shape) > 1 else 5  # a chunk that starts inside a block
    got = task.keep_mask(1, a, start, None)
    monkeypatch.setattr(rng, "BACKEND", "torch")
    forced = task.keep_mask(1, a, start, None)
    m = task.members[1]
    u = torch.from_numpy(_reference(m.key, start, a.numel()))
    if "della" in method:
        rows = a.numel() // unit
        bound = _old_probs(_old_ranks(a.reshape(rows, task.row_len, task.rest)), task.row_len, 0.45, 0.2)
    else:
        bound = 0.45
    assert torch.equal(got, torch.lt(u, bound)) and torch.equal(forced, got)


@pytest.mark.parametrize("unit", [1, 3, 7, 8, 16, 33, 100, 2048, 5632, 65536])
def test_unit_sums_equal_one_sum_per_unit(unit: int) -> None:
    gen = np.random.default_rng(unit)
    n = unit * 5 + (unit // 2 if unit > 1 else 0)  # a shorter last unit where there is room
    a = torch.from_numpy((np.abs(gen.normal(size=n)) * np.exp(gen.normal(scale=8, size=n))).astype(np.float32))
    with one_thread():  # as the rescale pass summed them: one call per unit, on one thread
        expected = [float(a[u: u + unit].sum(dtype=torch.float64)) for u in range(0, n, unit)]
    assert _unit_sums(a, unit) == expected


@pytest.mark.parametrize("unit", [3, 2048, 65536])
def test_unit_sums_cut_over_threads_equal_one_sum_per_unit(unit: int, monkeypatch) -> None:
    """Enough runs to cut over the pool: the parts (each torch held to one thread, whatever the worker's own
    count) give the floats of one 1-D ``sum`` per unit on one thread, with the caller's torch on 2 threads."""
    import merge.ops.task as task_module

    parts: list[tuple[int, int]] = []
    real = task_module.spread

    def spy(fn, n, *, grain, threads=None):
        def record(lo: int, hi: int) -> None:
            parts.append((lo, hi))
            fn(lo, hi)
        return real(record, n, grain=grain, threads=2)

    monkeypatch.setattr(task_module, "spread", spy)
    gen = np.random.default_rng(unit + 1)
    n = max(3 * task_module.SUM_GRAIN, 6 * unit) + unit // 2
    a = torch.from_numpy((np.abs(gen.normal(size=n)) * np.exp(gen.normal(scale=8, size=n))).astype(np.float32))
    with one_thread():
        expected = [float(a[u: u + unit].sum(dtype=torch.float64)) for u in range(0, n, unit)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _unit_sums(a, unit)
    finally:
        torch.set_num_threads(before)
    assert len(parts) == 2 and parts[0][0] == 0 and parts[0][1] == parts[1][0]
    assert got == expected


def test_bool_masks_multiply_and_copy_through_their_bytes_as_torch_does_with_bools() -> None:
    """``_Torch.mul_mask_`` and ``copy_into`` take a bool mask as its uint8 bytes (6-9x faster to convert): the
    floats are torch's own ``x * mask`` and ``dst.copy_(mask)``, with NaN, infinities and -0.0 in ``x``."""
    from merge.backend.arrays import TORCH

    gen = np.random.default_rng(3)
    for dtype in (torch.float32, torch.float64):
        x = torch.from_numpy(gen.normal(size=4099)).to(dtype)
        x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5], dtype=dtype)
        mask = torch.from_numpy(gen.random(4099) < 0.5)
        mask[:6] = torch.tensor([False, False, True, False, True, False])
        expected = x * mask
        got = TORCH.mul_mask_(x.clone(), mask)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # bytes: NaN and -0.0 included
        dst = torch.full((4099,), 7.0, dtype=dtype)
        TORCH.copy_into(dst, mask)
        assert torch.equal(dst, mask.to(dtype))
        back = torch.zeros(4099, dtype=torch.bool)
        TORCH.copy_into(back, mask)
        assert torch.equal(back, mask)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_task_merges_run_torch_on_one_thread_with_the_same_bits(method: str, monkeypatch) -> None:
    """On the CPU a DARE/DELLA tensor runs with torch on one thread and the draws spread over the threads torch had
    (merge.ops.rng.torch_on_one_thread): the merge equals one with the switch disabled, bit for bit, the pool
    sees torch's thread count inside, and torch's count is restored after."""
    import merge.engine as engine
    import merge.ops.task as task_module
    from merge.engine import MemorySink, plan_merge, run_merge
    from merge.io.sources import StateDictSource

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(300, 700, generator=g), "b": torch.randn(700, generator=g)}
    members = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]

    seen: list[tuple[int, int | None]] = []
    real_spread = rng.spread

    def spy(fn, n, *, grain):
        seen.append((torch.get_num_threads(), rng._POOL_THREADS))
        return real_spread(fn, n, grain=grain)

    monkeypatch.setattr(rng, "spread", spy)
    monkeypatch.setattr(task_module, "spread", spy)

    def merge_once() -> dict[str, torch.Tensor]:
        plan = plan_merge([StateDictSource(m) for m in members], get_operator(method), base=StateDictSource(base),
                          params={"density": 0.5}, seed=1)
        sink = MemorySink()
        run_merge(plan, sink)
        return sink.tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        switched = merge_once()
        assert torch.get_num_threads() == 2
        assert seen and all(t == 1 and pool == 2 for t, pool in seen), seen
        with monkeypatch.context() as m:
            m.setattr(engine, "torch_on_one_thread", lambda: __import__("contextlib").nullcontext())
            seen.clear()
            plain = merge_once()
            assert seen and all(t == 2 and pool is None for t, pool in seen), seen
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(switched[k], plain[k]) for k in plain)
