"""TSV-M, Iso-C and Iso-CTS against float64 references transcribed from the papers' code, with properties.

The references below follow ``AntoAndGar/task_singular_vectors`` (``compute_and_sum_svd_mem_reduction``:
each member's top components placed in its block of zero-padded U, s, V, then the SVD of the padded U and
V) and ``danielm1405/iso-merging`` (``iso_c``, ``iso_cts``), written here from that code in float64 numpy,
not from merge.ops.svd. Where papa-merge differs on purpose (documented in each operator's
``differences``), the reference takes a flag that applies the documented rule its own way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.ops import get_operator

RNG = np.random.default_rng(0)


def _polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def _is_zero(s: np.ndarray, shape) -> np.ndarray:
    """numpy's matrix_rank rule: singular values at or below s_max * max(shape) * eps are zero."""
    return s <= (s.max() if s.size else 0.0) * max(shape) * np.finfo(np.float64).eps


def ref_tsv(deltas: list[np.ndarray], *, k: int | None = None, drop_zero: bool = False) -> np.ndarray:
    """The merged task matrix of TSV-M: the reference's padded layout (``sum_u[:, i*k:(i+1)*k] = u[:, :k]``)."""
    m, n = deltas[0].shape
    r, t = min(m, n), len(deltas)
    k = r // t if k is None else k
    width = max(r, t * k)
    sum_u, sum_s, sum_v = np.zeros((m, width)), np.zeros(width), np.zeros((width, n))
    for i, d in enumerate(deltas):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k] = vt[:k]
        if drop_zero:  # papa-merge's documented rule: a zero component's arbitrary vectors are left out
            zero = np.arange(i * k, (i + 1) * k)[_is_zero(s[:k], d.shape) if s.size else []]
            sum_u[:, zero], sum_s[zero], sum_v[zero] = 0, 0, 0
    used = sum_s != 0
    if drop_zero:
        sum_u, sum_s, sum_v = sum_u[:, used], sum_s[used], sum_v[used]
    return _polar(sum_u) @ np.diag(sum_s) @ _polar(sum_v)


def ref_iso_c(deltas: list[np.ndarray], *, support_only: bool = False) -> np.ndarray:
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    if support_only:
        keep = ~_is_zero(s, deltas[0].shape)
        return u[:, keep] @ np.diag(np.full(keep.sum(), s[keep].mean())) @ vt[keep]
    return u @ np.diag(np.full(s.size, s.mean())) @ vt


def ref_iso_cts(deltas: list[np.ndarray], fraction: float = 0.8) -> np.ndarray:
    """The reference's iso_cts, its loop transcribed (full-rank inputs: no component is zero)."""
    shape, t = deltas[0].shape, len(deltas)
    common = int(min(shape) * fraction)
    total_specific = round((min(shape) - common) / t) * t
    common = min(shape) - total_specific
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vt[:common]
    per = int((min(shape) - common) / t)
    comb_u, comb_s, comb_v = np.zeros((shape[0], min(shape))), np.zeros(min(shape)), np.zeros((min(shape), shape[1]))
    for i, w in enumerate(deltas):
        w_ts = w - cu @ cu.T @ w
        ut, st, vtt = np.linalg.svd(w_ts, full_matrices=False)
        comb_u[:, i * per:(i + 1) * per] = ut[:, :per]
        comb_s[i * per:(i + 1) * per] = st[:per]
        comb_v[i * per:(i + 1) * per] = vtt[:per]
    comb_u[:, t * per:t * per + common] = cu
    comb_s[t * per:t * per + common] = cs
    comb_v[t * per:t * per + common] = cv
    return _polar(comb_u) @ np.diag(np.full(comb_s.size, comb_s.mean())) @ _polar(comb_v)


def _members(shape, t: int, *, rank: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = np.asarray(rng.standard_normal(shape))
    deltas = []
    for _ in range(t):
        if rank is None:
            d = np.asarray(rng.standard_normal(shape))
        else:
            d = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
        deltas.append(0.1 * d)
    return base, deltas


def _run(method: str, base: np.ndarray, deltas: list[np.ndarray], name: str = "layer.weight", **params) -> np.ndarray:
    out = get_operator(method)([torch.from_numpy(np.asarray(base + d)) for d in deltas], base=torch.from_numpy(base),
                               name=name, **params)
    assert out.dtype == torch.float64
    return out.numpy()


def _close(got: np.ndarray, want: np.ndarray, scale: float = 1.0) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * max(1.0, scale * np.abs(want).max(initial=0)))


@pytest.mark.parametrize("shape,t", [((12, 9), 3), ((7, 16), 2), ((10, 10), 4), ((6, 30), 6)])
def test_tsv_matches_the_reference(shape, t) -> None:
    base, deltas = _members(shape, t)
    _close(_run("tsv", base, deltas) - base, ref_tsv(deltas))
    _close(_run("tsv", base, deltas, alpha=0.3) - base, 0.3 * ref_tsv(deltas))


@pytest.mark.parametrize("shape,t", [((12, 9), 3), ((7, 16), 2), ((5, 5), 1)])
def test_iso_c_matches_the_reference(shape, t) -> None:
    base, deltas = _members(shape, t, seed=1)
    _close(_run("iso_c", base, deltas) - base, ref_iso_c(deltas))
    _close(_run("iso_c", base, deltas, alpha=1.7) - base, 1.7 * ref_iso_c(deltas))


@pytest.mark.parametrize("shape,t,fraction", [((12, 9), 3, 0.8), ((20, 16), 4, 0.5), ((16, 40), 3, 0.8),
                                              ((10, 10), 2, 0.0), ((10, 10), 2, 1.0)])
def test_iso_cts_matches_the_reference(shape, t, fraction) -> None:
    base, deltas = _members(shape, t, seed=2)
    _close(_run("iso_cts", base, deltas, common_fraction=fraction) - base, ref_iso_cts(deltas, fraction))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape,name", [((7,), "fc.bias"), ((4, 3, 2, 2), "conv.weight"), ((), "scale"),
                                        ((6, 4), "text_projection"), ((0, 4), "empty.weight")])
def test_tensors_that_are_not_matrices_get_the_mean_task_vector_times_alpha(method, shape, name) -> None:
    """As the references merge them: ``torch.mean`` of the task vectors (text_projection included), then alpha."""
    base, deltas = _members(shape, 3, seed=3)
    _close(_run(method, base, deltas, name=name, alpha=0.7), base + 0.7 * sum(deltas) / 3)


def test_tsv_rank_budget_edges() -> None:
    # rank 1 (a row vector) with 3 members: rank // T = 0; papa-merge keeps one component each (the reference none)
    base, deltas = _members((1, 8), 3, seed=4)
    got = _run("tsv", base, deltas) - base
    _close(got, ref_tsv(deltas, k=1))
    assert np.abs(got).max() > 0.01, "members outnumbering the rank still merge"
    # members more than the rank: 5 members of a 3 x 8 matrix, one component each
    base, deltas = _members((3, 8), 5, seed=5)
    _close(_run("tsv", base, deltas) - base, ref_tsv(deltas, k=1))
    # members exactly the rank: one component each, and the reference's own budget
    base, deltas = _members((4, 9), 4, seed=6)
    _close(_run("tsv", base, deltas) - base, ref_tsv(deltas))
    # a budget that does not divide the rank: 7 // 3 = 2 components each, one direction unused
    base, deltas = _members((7, 7), 3, seed=7)
    _close(_run("tsv", base, deltas) - base, ref_tsv(deltas))


def test_one_member() -> None:
    base, (d,) = _members((9, 6), 1, seed=8)
    _close(_run("tsv", base, [d]) - base, d)  # all of its components, already orthogonal: the task matrix itself
    s = np.linalg.svd(d, compute_uv=False)
    _close(np.linalg.svd(_run("iso_c", base, [d]) - base, compute_uv=False), np.full(6, s.mean()))
    _close(_run("iso_cts", base, [d]), _run("iso_c", base, [d]))  # common + its own remaining directions: all


def test_a_member_equal_to_the_base() -> None:
    base, (d1, d2) = _members((10, 8), 2, seed=9)
    zero = np.zeros_like(d1)
    # TSV-M: the zero member keeps no component (its singular vectors would be arbitrary); the budget is still 8 // 3
    _close(_run("tsv", base, [d1, zero, d2]) - base, ref_tsv([d1, zero, d2], drop_zero=True))
    _close(_run("tsv", base, [d1, zero, d2]) - base, ref_tsv([d1, d2], k=8 // 3))
    # Iso-C: the sum is unchanged
    _close(_run("iso_c", base, [d1, zero, d2]), _run("iso_c", base, [d1, d2]))
    _close(_run("iso_c", base, [d1, zero, d2]) - base, ref_iso_c([d1, d2]))
    # every member equal to the base: the base comes back
    for method in ("tsv", "iso_c", "iso_cts"):
        np.testing.assert_array_equal(_run(method, base, [zero, zero]), base)


def test_rank_deficient_task_matrices() -> None:
    base, deltas = _members((12, 10), 2, rank=2, seed=10)  # budget 5 each, only 2 non-zero components
    got = _run("tsv", base, deltas) - base
    _close(got, ref_tsv(deltas, drop_zero=True))
    assert np.linalg.matrix_rank(got) == 4
    iso = _run("iso_c", base, deltas) - base
    _close(iso, ref_iso_c(deltas, support_only=True))
    s = np.linalg.svd(iso, compute_uv=False)
    assert np.linalg.matrix_rank(iso) == 4 and np.allclose(s[:4], s[0], rtol=1e-12)
    cts = _run("iso_cts", base, deltas) - base
    assert np.isfinite(cts).all() and np.linalg.matrix_rank(cts) == 4  # no direction no member moved


@pytest.mark.parametrize("seed", range(4))
def test_iso_c_merged_task_matrix_has_one_singular_value_repeated_on_its_support(seed) -> None:
    rng = np.random.default_rng(100 + seed)
    m, n, t = rng.integers(3, 15, size=2).tolist() + [int(rng.integers(1, 5))]
    rank = int(rng.integers(1, min(m, n) + 1)) if seed % 2 else None
    base, deltas = _members((m, n), t, rank=rank, seed=seed)
    alpha = float(rng.uniform(0.2, 2.0))
    merged = _run("iso_c", base, deltas, alpha=alpha) - base
    s = np.linalg.svd(merged, compute_uv=False)
    support = s > s[0] * 1e-9
    assert support.sum() == np.linalg.matrix_rank(sum(deltas))
    np.testing.assert_allclose(s[support], s[0], rtol=1e-12)
    total = np.linalg.svd(sum(deltas), compute_uv=False)
    np.testing.assert_allclose(s[0], alpha * total[: support.sum()].mean(), rtol=1e-12)


def _write(folder: Path, t: int) -> tuple[list[Path], Path, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    base = {"fc.weight": torch.randn(24, 16, generator=g), "fc.bias": torch.randn(24, generator=g),
            "conv.weight": torch.randn(4, 2, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7)}
    save_file(base, str(folder / "base.safetensors"))
    members, paths = [], []
    for i in range(t):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        paths.append(folder / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
        members.append(sd)
    return paths, folder / "base.safetensors", members, base


@pytest.mark.parametrize("method", ["iso_c", "tsv", "iso_cts"])
def test_soup_streams_like_the_whole_tensor_call(tmp_path, method) -> None:
    paths, base_path, members, base = _write(tmp_path, 3)
    res = merge.soup(paths, base=base_path, method=method, params={"alpha": 0.8}, out=tmp_path / "out.safetensors",
                     chunk_bytes=512)
    got = load_file(str(res.path))
    for k, v in base.items():
        if not v.is_floating_point():
            assert torch.equal(got[k], v)
            continue
        whole = get_operator(method)([m[k] for m in members], base=v, name=k, alpha=0.8)
        assert torch.equal(got[k], whole), k
    recipe = json.loads(merge.read_safetensors_metadata(res.path)["papa_merge.recipe"])
    assert recipe["method"] == method


def test_cli_soup_with_tsv(tmp_path) -> None:
    paths, base_path, members, base = _write(tmp_path, 2)
    out = tmp_path / "tsv.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--method", "tsv", "--base", str(base_path), *map(str, paths), "-o", str(out),
                                   "--param", "alpha=0.5", "--no-progress"])
    assert res.exit_code == 0, res.output
    got = load_file(str(out))
    want = get_operator("tsv")([m["fc.weight"] for m in members], base=base["fc.weight"], name="fc.weight", alpha=0.5)
    assert torch.equal(got["fc.weight"], want)


def test_bad_inputs_are_one_line_errors(tmp_path) -> None:
    paths, base_path, members, base = _write(tmp_path, 2)
    runner = CliRunner()
    res = runner.invoke(cli, ["soup", "--method", "tsv", *map(str, paths), "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: method 'tsv' needs a base model (the checkpoint the members were fine-tuned from) (pass --base)"]
    odd = dict(members[1], **{"fc.weight": torch.zeros(16, 24)})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    res = runner.invoke(cli, ["soup", "--method", "iso_c", "--base", str(base_path), str(paths[0]),
                              str(tmp_path / "odd.safetensors"), "-o", str(tmp_path / "y.safetensors")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "fc.weight: [0] [24, 16] float32; [1] [16, 24] float32; [base] [24, 16] float32" in res.output
    # the whole-tensor call: one line naming the tensor and both shapes
    with pytest.raises(merge.MismatchError) as e:
        get_operator("iso_cts")([members[0]["fc.weight"], torch.zeros(16, 24)], base=base["fc.weight"], name="fc.weight")
    assert str(e.value) == ("tensor 'fc.weight': member 1 has shape [16, 24], member 0 [24, 16]; method 'iso_cts' "
                            "needs every copy of a tensor in one shape")
    with pytest.raises(merge.InvalidArgumentError, match=r"^method 'iso_c' needs a base model"):
        get_operator("iso_c")([members[0]["fc.weight"]])
    with pytest.raises(merge.InvalidArgumentError, match=r"common_fraction must be in \[0, 1\], got 1.5"):
        get_operator("iso_cts")([members[0]["fc.weight"]], base=base["fc.weight"], common_fraction=1.5)


# VmHWM, not ru_maxrss: a process started by subprocess (vfork + exec) counts its parent's memory in ru_maxrss.
# Writing 5 to clear_refs resets VmHWM to the current RSS, so the peak is measured from after the imports.
_TSV_RSS = """
import json, sys
import torch
import merge
def status(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field + ":"))
paths, base, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.linalg.svd(torch.randn(64, 64), full_matrices=False)  # LAPACK loaded before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
merge.soup(paths, base=base, method="tsv", out=out, force=True)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_tsv_peak_memory_for_8_members_is_that_of_2_plus_one_tensor_per_extra_member(tmp_path) -> None:
    """Measured in fresh processes (peak RSS over the baseline after imports), as test_engine measures TIES: four
    6 MB matrices per member; holding every member's whole model, as FusionBench does, would add 6 x 24 MB."""
    import subprocess
    import sys

    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}.weight" for i in range(4)]
    base = {k: torch.randn(1536, 1024, generator=g) for k in names}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[-1])
    tensor = 1536 * 1024 * 4
    grown = {}
    for n in (2, 8):
        res = subprocess.run([sys.executable, "-c", _TSV_RSS, json.dumps(paths[:n]), str(tmp_path / "base.safetensors"),
                              str(tmp_path / f"tsv{n}.safetensors")], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})  # live memory (test_lora)
        rss = json.loads(res.stdout.strip().splitlines()[-1])
        grown[n] = (rss["peak"] - rss["before"]) * 1024
    assert grown[8] <= 1.2 * grown[2] + 6 * tensor, (
        f"peak over the baseline: 2 members {grown[2] / 1e6:.0f} MB, 8 members {grown[8] / 1e6:.0f} MB, "
        f"allowed {(1.2 * grown[2] + 6 * tensor) / 1e6:.0f} MB")
    print(f"tsv peak over the baseline: 2 members {grown[2] / 1e6:.0f} MB, 8 members {grown[8] / 1e6:.0f} MB, "
          f"one tensor {tensor / 1e6:.1f} MB")
