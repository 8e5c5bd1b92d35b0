"""Each operator against a float64 reference written from its paper's formula (and mergekit's code).

The references below are independent of merge.ops: plain numpy on flattened vectors, with sorting
for the magnitude thresholds and the closed-form angles, as the papers and mergekit v0.1.5 define them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from merge.errors import InvalidArgumentError, UnknownNameError
from merge.ops import OPERATORS, get_operator

from ckpt_factory import as_f64 as _t
from ckpt_factory import whole_op as _run

RNG = np.random.default_rng(0)


def _vecs(n: int, size: int = 4000, scale: float = 0.1, seed: int = 0):
    r = np.random.default_rng(seed)
    base = r.normal(size=size)
    members = [base + scale * r.normal(size=size) for _ in range(n)]
    return base, members




# ---- references ---------------------------------------------------------------------------------------

def ref_topk(d: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep the max(1, int(density*n)) largest |d| (ascending stable order, last ranks)."""
    if density >= 1:
        return d.copy()
    n = d.size
    if density <= 0:
        return np.zeros_like(d)
    k = max(1, int(density * n))
    keep = np.zeros(n, bool)
    keep[np.argsort(np.abs(d), kind="stable")[n - k:]] = True
    return np.where(keep, d, 0.0)


def ref_band(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: drop int(gamma*n) largest and the smallest, keeping int(density*n)."""
    if density >= 1:
        return d.copy()
    n = d.size
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    keep = np.zeros(n, bool)
    keep[np.argsort(np.abs(d), kind="stable")[bot: bot + target]] = True
    return np.where(keep, d, 0.0)


def ref_elect(deltas: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    """TIES: sign of sum_i w_i d_i (zero counts as +), mean of the agreeing over their weights."""
    wd = np.stack([w * d for w, d in zip(weights, deltas)])
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    mixed = (wd * agree).sum(0)
    if normalize:
        div = (np.asarray(weights)[:, None] * agree).sum(0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return mixed


def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.clip(np.dot(a / na, b / nb), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * a + np.sin(t * th) / np.sin(th) * b


def ref_multislerp(xs: list[np.ndarray], w: list[float], base=None, eps=1e-8) -> np.ndarray:
    """mergekit's multislerp, step by step (tangent space at the normalised weighted mean)."""
    t = np.stack(xs) - (base if base is not None else 0)
    w = np.asarray(w) / np.sum(w)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    u = t / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    dots = (u * mean).sum(1, keepdims=True)
    tang = ((u - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tang) + eps
    res = (mean * np.cos(tn) + tang * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
    return res + (base if base is not None else 0)


def ref_karcher(xs: list[np.ndarray], max_iter=10, tol=1e-5) -> np.ndarray:
    """mergekit's karcher_merge_tensors on whole vectors, in float64."""
    alphas = [1 / len(xs)] * len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n if n else np.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    al = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(al, vu))
    mean = mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tang = np.zeros_like(mean)
        for a, u in zip(al, vu):
            dot = np.clip(np.dot(mean, u), -1, 1)
            th = np.arccos(dot)
            if th < tol:
                continue
            tang += a * th / np.sin(th) * (u - dot * mean)
        tn = np.linalg.norm(tang)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tang / tn
        mean = mean / np.linalg.norm(mean)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def ref_model_stock(base, xs) -> np.ndarray:
    offs = [x - base for x in xs]
    cos = [np.clip(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1)
           for i, a in enumerate(offs) for b in offs[i + 1:]]
    c, n = np.mean(cos), len(xs)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(xs, axis=0) + (1 - t) * base


# ---- tests ------------------------------------------------------------------------------------------------

TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize: bool) -> None:
    base, xs = _vecs(3)
    w = [0.5, -0.3, 1.2]
    got = _run("task_arithmetic", xs, base, w, normalize=normalize, **{"lambda": 0.7})
    mixed = sum(wi * (x - base) for wi, x in zip(w, xs))
    if normalize:
        mixed = mixed / sum(w)
    np.testing.assert_allclose(got, base + 0.7 * mixed, **TIGHT)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_ties_trims_elects_and_averages(density: float) -> None:
    base, xs = _vecs(3)
    w = [1.0, 0.5, 2.0]
    got = _run("ties", xs, base, w, density=density)
    ref = base + ref_elect([ref_topk(x - base, density) for x in xs], w, normalize=True)
    np.testing.assert_allclose(got, ref, **TIGHT)
    if density == 0:  # mergekit: density <= 0 keeps nothing, so the base comes back
        np.testing.assert_array_equal(got, base)


def test_ties_sign_election_with_opposite_signs() -> None:
    base = np.zeros(4)
    xs = [np.array([3.0, -1.0, 2.0, 1.0]), np.array([-1.0, -1.0, -3.0, -1.0])]
    got = _run("ties", xs, base, density=1.0)
    # element 0: +3 -1 = +2 -> only +3 agrees; 1: both -1; 2: 2-3 = -1 -> only -3; 3: 1-1 = 0 counts as + -> +1
    np.testing.assert_array_equal(got, [3.0, -1.0, -3.0, 1.0])
    got = _run("ties", xs, base, density=1.0, normalize=False, weights=[2.0, 1.0])
    np.testing.assert_array_equal(got, [6.0, -3.0, 4.0, 2.0])  # weighted: 2*2 - 3 = +1 keeps +4 at element 2


def test_ties_keeps_k_and_breaks_ties_by_position() -> None:
    base = np.zeros(10)
    d = np.array([1.0, 2, 2, 2, 5, 2, 0.5, 2, 3, 1])
    got = _run("ties", [d], base, density=0.4)  # k = 4: 5, 3 and two of the five 2s (the last two by position)
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 5, 2, 0, 2, 3, 0])
    np.testing.assert_array_equal(got, ref_topk(d, 0.4))


def test_all_equal_members_and_zero_task_vectors() -> None:
    base, xs = _vecs(1)
    same = [xs[0]] * 3
    for name, kw in [("ties", dict(density=0.5)), ("task_arithmetic", {}), ("breadcrumbs", dict(density=0.5)),
                     ("dare_ties", dict(density=0.5)), ("della", dict(density=0.5)), ("model_stock", {}),
                     ("multislerp", {}), ("karcher", {}), ("uniform", {}), ("weighted", {})]:
        op = OPERATORS[name]
        b = base if op.base != "none" else None
        got = _run(name, same if name != "model_stock" else same, b, **kw)
        assert np.isfinite(got).all(), name
        if name in ("multislerp", "karcher", "uniform", "weighted"):
            np.testing.assert_allclose(got, xs[0], rtol=1e-9, atol=1e-9, err_msg=name)
    # zero task vectors: every task method returns the base exactly
    for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "task_arithmetic"):
        np.testing.assert_array_equal(_run(name, [base, base], base, density=0.5 if name != "task_arithmetic" else 1),
                                      base, err_msg=name)


@pytest.mark.parametrize("consensus", [False, True])
def test_breadcrumbs_band(consensus: bool) -> None:
    base, xs = _vecs(3, size=2000)
    name = "breadcrumbs_ties" if consensus else "breadcrumbs"
    got = _run(name, xs, base, [1, 1, 1], density=0.6, gamma=0.05)
    deltas = [ref_band(x - base, 0.6, 0.05) for x in xs]
    ref = base + (ref_elect(deltas, [1, 1, 1], normalize=False) if consensus else sum(deltas))
    np.testing.assert_allclose(got, ref, **TIGHT)
    d0 = xs[0] - base
    one = _run("breadcrumbs", [xs[0]], base, density=0.6, gamma=0.05) - base
    kept = np.abs(d0)[one != 0]
    assert len(kept) == int(0.6 * d0.size) and kept.max() < np.sort(np.abs(d0))[-int(0.05 * d0.size)]


def test_dare_statistics_and_rescale() -> None:
    base, xs = _vecs(1, size=200_000)
    d = xs[0] - base
    got = _run("dare_linear", xs, base, density=0.3) - base
    kept = got != 0
    p = kept.mean()
    assert abs(p - 0.3) < 4 * math.sqrt(0.3 * 0.7 / d.size)  # Bernoulli(density), 4 sigma
    scale = np.abs(d).sum() / np.abs(d[kept]).sum()  # mergekit's L1 rescale
    np.testing.assert_allclose(got[kept], d[kept] * scale, rtol=1e-12, atol=1e-15)  # (base + x) - base rounds
    plain = _run("dare_linear", xs, base, density=0.3, rescale=False) - base
    np.testing.assert_array_equal(plain[kept], d[kept])  # same keyed draws, no rescale
    assert not np.array_equal(_run("dare_linear", xs, base, density=0.3) - base,
                              get_operator("dare_linear")([_t(xs[0])], base=_t(base), name="other", density=0.3).numpy()
                              - base), "a different tensor name must draw a different mask"


def test_dare_ties_density_one_is_ties_without_trimming() -> None:
    base, xs = _vecs(3)
    got = _run("dare_ties", xs, base, [1, 2, 1], density=1.0)
    np.testing.assert_allclose(got, base + ref_elect([x - base for x in xs], [1, 2, 1], normalize=False), **TIGHT)


def test_della_keep_probability_follows_magnitude_rank() -> None:
    r = np.random.default_rng(3)
    rows, cols = 4000, 11
    base = np.zeros((rows, cols))
    d = r.normal(size=(rows, cols))
    out = get_operator("della_linear")([_t(d)], base=_t(base), name="w", density=0.5, epsilon=0.4,
                                       rescale=False).numpy()
    ranks = np.argsort(np.argsort(np.abs(d), axis=1, kind="stable"), axis=1, kind="stable")
    p = (0.5 - 0.4) + ranks / (cols - 1) * 0.8
    for rank in (0, 5, 10):
        kept = (out != 0)[ranks == rank].mean()
        expect = p[ranks == rank][0]
        assert abs(kept - expect) < 4 * math.sqrt(expect * (1 - expect) / rows), (rank, kept, expect)
    with pytest.raises(InvalidArgumentError, match="epsilon 0.6 must keep density"):
        get_operator("della")([_t(d)], base=_t(base), density=0.5, epsilon=0.6)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp(t: float) -> None:
    base, xs = _vecs(1, scale=2.0)
    got = _run("slerp", xs, base, t=t)
    np.testing.assert_allclose(got, ref_slerp(base, xs[0], t), rtol=1e-10, atol=1e-12)
    if t == 0:
        np.testing.assert_allclose(got, base, rtol=1e-12)
    if t == 1:
        np.testing.assert_allclose(got, xs[0], rtol=1e-12)


def test_slerp_colinear_falls_back_to_linear() -> None:
    a = np.linspace(1, 2, 100)
    got = _run("slerp", [3 * a], a, t=0.25)
    np.testing.assert_allclose(got, 0.75 * a + 0.25 * 3 * a, **TIGHT)
    got = _run("slerp", [-2 * a], a, t=0.5)  # antipodal
    np.testing.assert_allclose(got, 0.5 * a - a, **TIGHT)


def test_multislerp_with_and_without_base() -> None:
    base, xs = _vecs(3, scale=1.0)
    w = [0.2, 0.5, 0.3]
    np.testing.assert_allclose(_run("multislerp", xs, None, w), ref_multislerp(xs, w), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_run("multislerp", xs, base, w), ref_multislerp(xs, w, base), rtol=1e-9, atol=1e-12)


def test_karcher_matches_mergekits_iteration() -> None:
    _, xs = _vecs(4, scale=0.5)
    np.testing.assert_allclose(_run("karcher", xs), ref_karcher(xs), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_run("karcher", xs, max_iter=3), ref_karcher(xs, max_iter=3), rtol=1e-9, atol=1e-12)


def test_model_stock() -> None:
    base, xs = _vecs(3, scale=0.3)
    xs = [x + 0.2 for x in xs]  # correlated offsets: a ratio away from 0 and 1
    np.testing.assert_allclose(_run("model_stock", xs, base), ref_model_stock(base, xs), rtol=1e-10, atol=1e-12)
    # filter_wise (one ratio per row): tests/test_ops_mergekit_methods.py


def test_linear_is_weighted_and_weights_are_normalised() -> None:
    _, xs = _vecs(3)
    w = [3.0, 1.0, 0.0]
    got = _run("linear", xs, None, w)
    np.testing.assert_allclose(got, (3 * xs[0] + xs[1]) / 4, **TIGHT)
    assert get_operator("linear") is get_operator("weighted")
    np.testing.assert_allclose(_run("weighted", xs, None, w, normalize=False), 3 * xs[0] + xs[1], **TIGHT)


def test_parameter_errors_name_the_parameter() -> None:
    base, xs = _vecs(2)
    with pytest.raises(InvalidArgumentError, match=r"method 'ties' has no parameter 'densty'; its parameters: "
                                                   r"density, int8_mask, lambda, normalize, rescale, weight"):
        _run("ties", xs, base, densty=0.5)
    with pytest.raises(InvalidArgumentError, match=r"parameter density of member 1 must be in \[0, 1\], got 1.5"):
        _run("ties", xs, base, density=[0.5, 1.5])
    with pytest.raises(InvalidArgumentError, match="got 3 values of density for 2 members"):
        _run("ties", xs, base, density=[0.5, 0.5, 0.5])
    with pytest.raises(InvalidArgumentError, match="method 'slerp' needs parameter t"):
        _run("slerp", xs[:1], base)
    with pytest.raises(InvalidArgumentError, match="method 'ties' needs a base model"):
        _run("ties", xs)
    with pytest.raises(UnknownNameError, match="valid methods: .*breadcrumbs"):
        get_operator("dare")


def test_every_operator_is_cited_and_documented() -> None:
    for name, op in OPERATORS.items():
        assert op.citation and op.summary and op.path in ("linear", "gram", "task", "tensor"), name
        assert all(p.help for p in op.params), name
