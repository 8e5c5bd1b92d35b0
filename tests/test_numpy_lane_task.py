"""Issue 22 part 2, task vectors: CPU merges of safetensors members with task_arithmetic, ties, breadcrumbs and
breadcrumbs_ties run on numpy (merge.backend.arrays) without importing torch, with the torch path's bytes.

As in ``tests/test_numpy_lane.py``, every merge runs twice through the ``papa-merge`` command in a subprocess, as
the command picks and with ``PAPA_MERGE_TORCH_ONLY=1``: the outputs must be the same bytes, the messages the same,
and the first run must end without ``torch`` imported. The task vectors are quantised (multiples of 1/64), so many
magnitudes are equal and the densities put the selection's boundary inside runs of ties. The new numpy primitives
(and the selection built on them) are checked against torch directly.
"""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import torch
from test_numpy_lane import both, papa

import merge
from merge import engine
from merge.backend.arrays import NUMPY, TORCH, sum_is_exact
from merge.io.writer import write_state_dict
from merge.ops.select import Band, BandCounters, RadixSelect, keep_band, whole_band
from merge.soups import TORCH_ONLY_ENV

MEMBERS = 3


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    return {"emb.weight": torch.randn(1_000_003, generator=g), "fc.weight": torch.randn(37, 13, generator=g),
            "fc.bias": torch.randn(13, generator=g), "tiny": torch.randn(1, generator=g),
            "norm.num_batches_tracked": torch.tensor(7)}


def _member(seed: int) -> dict[str, torch.Tensor]:
    """The base plus a task vector of multiples of 1/64 (most magnitudes shared by many elements)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.round(torch.randn(v.shape, generator=g) * 4) / 64 if v.is_floating_point() else v
            for k, v in _base().items()}


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def task_members(tmp_path_factory):
    """Base and members in float32, bfloat16 and float16; sharded folders; a NaN member; float64 and pickle ones."""
    d = tmp_path_factory.mktemp("lane_task")
    for kind, dt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
        write_state_dict(_cast(_base(), dt), d / f"{kind}-base.safetensors")
        for i in range(MEMBERS):
            write_state_dict(_cast(_member(i), dt), d / f"{kind}-{i}.safetensors")
    for i in range(2):
        folder = d / f"sharded-{i}"
        folder.mkdir()
        sd = _member(i)
        write_state_dict({"emb.weight": sd["emb.weight"]}, folder / "model-00001-of-00002.safetensors")
        write_state_dict({k: v for k, v in sd.items() if k != "emb.weight"}, folder / "model-00002-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if k == 'emb.weight' else 2}-of-00002.safetensors"
                                                for k in sd}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float32"}))
    nan = _member(1)
    nan["fc.weight"][3, 4] = float("nan")
    nan["fc.bias"][0] = float("inf")
    write_state_dict(nan, d / "nan-1.safetensors")
    write_state_dict({**_member(1), "fc.weight": _member(1)["fc.weight"].double()}, d / "f64-1.safetensors")
    write_state_dict({**_base(), "fc.weight": _base()["fc.weight"].double()}, d / "f64-base.safetensors")
    torch.save(_base(), d / "base.bin")
    return d


def _task(kind: str, method: str, *extra: str, base: str | None = None) -> list[str]:
    return ["soup", "--method", method, "--base", base or f"{kind}-base.safetensors",
            *(f"{kind}-{i}.safetensors" for i in range(MEMBERS)), *extra]


METHOD_ARGS = {
    "task_arithmetic": ["--weights", "0.7,0.2,1.1", "--lambda", "0.8"],
    "ties": ["--density", "0.5", "--weights", "0.7,0.2,0.1"],
    "breadcrumbs": ["--density", "0.4", "--gamma", "0.05"],
    "breadcrumbs_ties": ["--density", "0.4,0.6,0.3", "--gamma", "0.02,0.05,0.1", "--lambda", "1.3"],
}


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_task_merges_same_bytes_without_torch(task_members, method, kind):
    _, out, _ = both(_task(kind, method, *METHOD_ARGS[method]), f"{method}-{kind}.safetensors", task_members)
    assert out.startswith("wrote ")


@pytest.mark.parametrize("args", [
    ["ties", "--density", "0.3", "--no-normalize"],                      # the sum of the agreeing, undivided
    ["ties", "--density", "1"],                                         # nothing dropped: no selection
    ["ties", "--density", "0"],                                         # everything dropped
    ["task_arithmetic", "--normalize", "--weights", "0.5,0.25,1.5"],    # divided by the weights' sum (exact)
    ["task_arithmetic", "--normalize", "--weights", "0.3,0.7"],         # two weights: one rounding in any order
    ["breadcrumbs", "--density", "0.9", "--gamma", "0.1"],              # nothing dropped at the bottom
    ["breadcrumbs_ties", "--density", "0.5", "--gamma", "0", "--normalize", "--param", "int8_mask=true"],
])
def test_task_options_same_bytes(task_members, args):
    method, *extra = args
    n = 2 if "0.3,0.7" in extra else MEMBERS
    full = ["soup", "--method", method, "--base", "bf16-base.safetensors",
            *(f"bf16-{i}.safetensors" for i in range(n)), *extra]
    both(full, f"opt-{'-'.join(args).replace(',', '_')}.safetensors", task_members)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_task_dtype_casts(task_members, dtype):
    both(_task("f32", "ties", "--density", "0.5", "--dtype", dtype), f"cast-{dtype}.safetensors", task_members)
    both(["soup", "--method", "breadcrumbs", "--base", "f16-base.safetensors", "bf16-0.safetensors",
          "f32-1.safetensors", "--on-mismatch", "first", "--dtype", dtype], f"mixed-{dtype}.safetensors", task_members)


def test_task_sharded_folders(task_members):
    files, _, _ = both(["soup", "--method", "ties", "--base", "f32-base.safetensors", "sharded-0",
                        "sharded-1/model.safetensors.index.json", "--density", "0.2", "--shard-size", "1MB",
                        "--dtype", "bfloat16"], "folder", task_members)
    assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_task_dry_run_without_torch(task_members, method):
    args = _task("bf16", method, *METHOD_ARGS[method], "--dry-run", "-o", "dry.safetensors")
    rc, out, err, imported = papa(args, task_members)
    assert rc == 0 and not imported, err
    rc_t, out_t, err_t, _ = papa(args, task_members, torch_only=True)
    assert rc_t == 0 and (out, err) == (out_t, err_t)
    assert "peak memory" in out and not (task_members / "dry.safetensors").exists()


def test_task_nonfinite_members_warn_alike(task_members):
    args = ["soup", "--method", "ties", "--base", "f32-base.safetensors", "f32-0.safetensors", "nan-1.safetensors",
            "--density", "0.5", "--dtype", "float32"]
    _, _, err = both(args, "nan.safetensors", task_members)
    assert "holds NaN or infinite values in tensor 'fc.weight'" in err and "'fc.bias'" in err
    full = [*args[:-2], "--strict", "-o", "bad.safetensors"]
    rc, out, err, imported = papa(full, task_members)
    rc_t, out_t, err_t, _ = papa(full, task_members, torch_only=True)
    assert rc != 0 and rc == rc_t and not imported and (out, err) == (out_t, err_t) and "NaN" in err


@pytest.mark.parametrize("args", [
    _task("f32", "dare_ties", "--density", "0.5"),
    _task("f32", "della", "--density", "0.5"),
    _task("f32", "ties", "--density", "0.5", "--rescale"),
    _task("f32", "task_arithmetic", "--normalize", "--weights", "0.3,0.7,0.2"),  # the sum rounds twice
    _task("f32", "ties", "--density", "0.5", "--accumulate", "float64"),
    _task("f32", "ties", "--density", "0.5", "--dtype", "float64"),
    ["soup", "--method", "ties", "--base", "f64-base.safetensors", "f64-1.safetensors", "--density", "0.5"],
    ["soup", "--method", "ties", "--base", "base.bin", "f32-0.safetensors", "f32-1.safetensors"],
])
def test_ineligible_task_merges_run_on_torch(task_members, args, tmp_path):
    rc, _, err, imported = papa([*args, "-o", str(tmp_path / "o.safetensors")], task_members)
    assert rc == 0, err
    assert imported and (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_chunked_radix_selection_same_bytes(task_members, method, monkeypatch, tmp_path):
    """Tensors above engine.WHOLE_SELECT_BYTES are selected by the chunked radix passes, whose ties are split by a
    running count across chunks: forced here (and 64 KiB chunks) on both backends, in this process."""
    monkeypatch.setattr(engine, "WHOLE_SELECT_BYTES", 0)
    calls = []
    sub = type(NUMPY).sub_
    monkeypatch.setattr(type(NUMPY), "sub_", lambda self, x, y: calls.append(1) or sub(self, x, y))
    members = [task_members / f"bf16-{i}.safetensors" for i in range(MEMBERS)]
    opts = dict(method=method, base=task_members / "bf16-base.safetensors", chunk_bytes=64 << 10,
                params={"density": [0.5, 0.3, 0.7], **({"gamma": 0.05} if "bread" in method else {})})
    monkeypatch.delenv(TORCH_ONLY_ENV, raising=False)
    merge.soup(members, out=tmp_path / "np.safetensors", **opts)
    assert calls, "the numpy backend did not run"
    monkeypatch.setenv(TORCH_ONLY_ENV, "1")
    merge.soup(members, out=tmp_path / "torch.safetensors", **opts)
    assert (tmp_path / "np.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()


# ---- the numpy primitives against torch ---------------------------------------------------------------------

_SPECIAL = np.concatenate([np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3e38, 1e-45, 0.5],
                                    np.float32),
                           np.array([0x7FC00001, 0xFFC00002, 0x7F800003], np.uint32).view(np.float32)])


def _pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every pair of special values (NaN payloads and signs, a signalling NaN, infinities, -0.0), 5 times over, and
    random values: vector bodies and tails."""
    a, b = (np.tile(g.ravel(), 5) for g in np.meshgrid(_SPECIAL, _SPECIAL))
    rng = np.random.default_rng(5)
    r = rng.standard_normal((2, 1003)).astype(np.float32)
    return np.concatenate([a, r[0]]), np.concatenate([b, r[1]])


def _bits(x) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return x.view(np.uint8)


def _same(got, want) -> None:
    assert got.dtype == (want.numpy() if isinstance(want, torch.Tensor) else want).dtype
    assert (_bits(got) == _bits(want)).all()


@pytest.mark.parametrize("name", ["sub_", "mul_", "div_", "add_"])
def test_elementwise_primitives_match_torch(name):
    a, b = _pairs()
    for y in (b, 0.3, 2.0, -0.0):
        ta = torch.from_numpy(a.copy())
        getattr(TORCH, name)(ta, torch.from_numpy(b) if isinstance(y, np.ndarray) else y)
        na = a.copy()
        getattr(NUMPY, name)(na, y)
        if name == "add_" and isinstance(y, np.ndarray):  # torch's addend first; a signalling NaN never gets here
            keep = ~np.isin(y.view(np.uint32), [0x7F800003])
            na, ta = na[keep], ta[torch.from_numpy(keep)]
        if name != "add_" or isinstance(y, np.ndarray):
            _same(na, ta)


def test_abs_clamp_neg_match_torch():
    a, _ = _pairs()
    t = torch.from_numpy(a)
    _same(NUMPY.abs(a), TORCH.abs(t))
    _same(NUMPY.abs_into(np.empty_like(a), a), TORCH.abs_into(torch.empty_like(t), t))
    for bound in ({"min": 0}, {"max": 0}):
        _same(NUMPY.clamp_into(np.empty_like(a), a, **bound), TORCH.clamp_into(torch.empty_like(t), t, **bound))
    i = np.array([0, 1, -1, 2 ** 31 - 1, -2 ** 31], np.int32)
    _same(NUMPY.neg_(i.copy()), TORCH.neg_(torch.from_numpy(i.copy())))


@pytest.mark.parametrize("op", ["gt", "ge", "lt", "le", "eq"])
@pytest.mark.parametrize("out", [None, "float32", "int32"])
def test_comparisons_match_torch(op, out):
    a, _ = _pairs()
    t = torch.from_numpy(a)
    for v in (0, 0.5, float(np.float32(0.3)), 1e-45):
        if out is None:
            _same(NUMPY.cmp(a, op, v), TORCH.cmp(t, op, v))
        else:
            _same(NUMPY.cmp_into(np.empty(a.size, out), a, op, v),
                  TORCH.cmp_into(torch.empty(a.size, dtype=getattr(torch, out)), t, op, v))


@pytest.mark.parametrize("c", [1.0, 0.3, -0.7, 1 / 3, 1e-30])
def test_masked_add_matches_torch(c):
    a, _ = _pairs()
    mask = (np.arange(a.size) % 3 == 0).astype(np.float32)
    want = TORCH.add_masked_(torch.from_numpy(a.copy()), torch.from_numpy(mask), c)
    _same(NUMPY.add_masked_(a.copy(), mask, c), want)


def test_bit_primitives_match_torch():
    a, b = _pairs()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    up = (np.arange(a.size) % 2 * -1).astype(np.int32)
    _same(NUMPY.bits(a), TORCH.bits(ta))
    got = NUMPY.xor_into(np.empty(a.size, np.int32), NUMPY.bits(a), NUMPY.bits(b))
    want = TORCH.xor_into(torch.empty(a.size, dtype=torch.int32), TORCH.bits(ta), TORCH.bits(tb))
    _same(got, want)
    _same(NUMPY.xor_(NUMPY.and_(got, up), NUMPY.bits(b)), TORCH.xor_(TORCH.and_(want, torch.from_numpy(up)), TORCH.bits(tb)))
    _same(got.view(np.float32), np.where(up != 0, a, b))  # the selection is torch.where's, bit for bit
    _same(NUMPY.shr(NUMPY.bits(np.abs(a)), 16), TORCH.shr(TORCH.bits(ta.abs()), 16))
    _same(NUMPY.bitand(NUMPY.bits(a), 0xFFFF), TORCH.bitand(TORCH.bits(ta), 0xFFFF))


def test_counting_and_sorting_primitives_match_torch():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 50, 10_001).astype(np.int16)
    t = torch.from_numpy(x)
    _same(NUMPY.bincount(x, 64), TORCH.bincount(t, 64))
    cum = NUMPY.cumsum(NUMPY.bincount(x, 64))
    _same(cum, TORCH.cumsum(TORCH.bincount(t, 64)))
    _same(NUMPY.cumsum(x == 3, int64=True), TORCH.cumsum(t == 3, int64=True))
    for r in (0, 1, 199, 5000, 10_000, 10_001):
        for right in (False, True):
            assert NUMPY.searchsorted(cum, r, right=right) == TORCH.searchsorted(torch.from_numpy(cum), r, right=right)
    _same(NUMPY.nonzero(x == 7), TORCH.nonzero(t == 7))
    vals, order = NUMPY.sort_stable(x.astype(np.int32))
    tv, to = TORCH.sort_stable(t.to(torch.int32))
    _same(vals, tv)
    _same(order, to)  # equal values in position order: the stable sorts agree on the permutation too
    for v in (vals[:1], vals[5000:5001], vals[-1:]):
        for right in (False, True):
            assert NUMPY.searchsorted(vals, v, right=right) == TORCH.searchsorted(tv, torch.from_numpy(v), right=right)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.25, 1.5, 2.0], [0.3, 0.7], [2.0 ** -20, 1.0, 3.0],
                                     [0.1, 0.2, 0.3], [1e38, 3e38, 3e38]])
def test_weight_sum(weights):
    w32 = [float(np.float32(w)) for w in weights]
    want = TORCH.weight_sum(weights, torch.float32)
    if sum_is_exact(w32, 4):
        assert NUMPY.weight_sum(weights, NUMPY.float32) == want
    else:
        assert weights in ([0.1, 0.2, 0.3], [1e38, 3e38, 3e38])  # sums that round before the last addition
        with pytest.raises(NotImplementedError):
            NUMPY.weight_sum(weights, NUMPY.float32)


def _tied_magnitudes(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.abs(np.round(g.standard_normal(n) * 4) / 64).astype(np.float32)


@pytest.mark.parametrize("ranks", [(0, 500), (300, 1001), (123, 777), (500, 501), (1, 1000)])
def test_selection_matches_torch(ranks):
    """whole_band, RadixSelect and keep_band (with cuts, and with running counts over chunks) give torch's bands and
    masks on magnitudes full of ties, the boundaries inside runs of equal values."""
    a = _tied_magnitudes(1001, 3)
    t = torch.from_numpy(a)
    r0, r1 = ranks
    band, tband = whole_band(a, r0, r1), whole_band(t, r0, r1)
    assert band == tband and band.lo_cut is not None
    sels = []
    for arr, dtype in ((a, NUMPY.float32), (t, torch.float32)):
        sel = RadixSelect(tuple(sorted({r for r in (r0, r1 - 1) if 0 <= r < 1001})), dtype)
        for level in range(sel.passes):
            sel.begin(level)
            for s in range(0, 1001, 128):
                sel.add(arr[s: s + 128])
            sel.end()
        sels.append(Band.from_select(sel, 1001, r0, r1))
    assert sels[0] == sels[1]
    order = np.argsort(a, kind="stable")
    want = np.zeros(1001, bool)
    want[order[r0:r1]] = True
    for b in (band, sels[0]):  # with cuts (start given), and with running counts of ties (the radix band)
        for out in (True, False):  # 1.0/0.0 into buffers, or a bool mask
            counters, tcounters = BandCounters(), BandCounters()
            for s in range(0, 1001, 128):
                chunk = a[s: s + 128]
                bufs = (np.empty(128, np.float32), np.empty(128, np.float32)) if out else None
                tbufs = (torch.empty(128), torch.empty(128)) if out else None
                got = keep_band(chunk, b, counters, bufs, s)
                ref = keep_band(torch.from_numpy(chunk), b, tcounters, tbufs, s)
                if got is None:
                    assert ref is None and want[s: s + 128].all()
                    continue
                _same(got, ref)
                assert (got.astype(bool) == want[s: s + 128]).all()


@pytest.mark.parametrize("shared", [True, False])
def test_base_hashed_for_the_start_check_without_torch(task_members, shared):
    """Members recording a start that is not the base's record make the start check hash the base's weights
    (merge.lineage.source_sha256, from the numpy-opened base): that read needs no torch either, whether the hash
    matches the members' record or not, and the messages are the torch path's."""
    from safetensors.numpy import save_file

    from merge.keys import TRAIN_KEY
    from merge.lineage import start_record, state_dict_sha256

    start = state_dict_sha256(_base()) if shared else "0" * 64
    meta = {TRAIN_KEY: json.dumps({"seed": 0, "start": start_record("warm-start", start)})}
    names = []
    for i in range(2):
        names.append(f"recorded-{shared}-{i}.safetensors")
        save_file({k: v.numpy() for k, v in _member(i).items()}, str(task_members / names[-1]), metadata=meta)
    _, out, _ = both(["soup", "--method", "ties", "--density", "0.5", "--base", "f32-base.safetensors", *names],
                     f"recorded-{shared}.safetensors", task_members)
    assert out.startswith("wrote ")


# ---- the lane's task kernels on both cores: a chunk's elements split across threads -------------------------------

SPLIT_N = 1 << 20  # one 4 MiB tensor: two default chunks of 2 MiB (float32), each cut into two parts of 1 MiB
HALF = engine.SPLIT_GRAIN  # the second part of chunk 0 starts here
TIED_DENSITY = 0.6  # TIES keeps the last 60% of the equal magnitudes: the cut falls inside chunk 0's second part


def _split_base() -> dict[str, torch.Tensor]:
    """Values on a 1/1024 grid: a base plus 1/64 is exact, so a task vector of +-1/64 has one magnitude throughout."""
    g = torch.Generator().manual_seed(7)
    return {"big.weight": torch.round(torch.randn(SPLIT_N, generator=g) * 64) / 1024,
            "small.weight": torch.round(torch.randn(40, 30, generator=g) * 64) / 1024}


def _split_member(i: int) -> dict[str, torch.Tensor]:
    """Member 0: task vector +-1/64 everywhere (every magnitude tied); the others: multiples of 1/64."""
    g = torch.Generator().manual_seed(20 + i)
    out = {}
    for k, v in _split_base().items():
        if i == 0:
            d = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0) / 64
        else:
            d = torch.round(torch.randn(v.shape, generator=g) * 4) / 64
        out[k] = v + d
    return out


@pytest.fixture(scope="module")
def split_members(tmp_path_factory):
    d = tmp_path_factory.mktemp("lane_split")
    for dt, kind in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        write_state_dict(_cast(_split_base(), dt), d / f"{kind}-base.safetensors")
        for i in range(MEMBERS):
            write_state_dict(_cast(_split_member(i), dt), d / f"{kind}-{i}.safetensors")
    nan = _split_member(1)
    nan["big.weight"][HALF + 1234] = float("nan")  # in the second part of chunk 0
    write_state_dict(nan, d / "nan-1.safetensors")
    huge = _split_member(1)
    huge["big.weight"][HALF + 4321] = 1e6  # finite in float32, beyond float16: the cast of that part overflows
    write_state_dict(huge, d / "huge-1.safetensors")
    return d


def _record_threads(monkeypatch) -> list[tuple[int, int, int]]:
    """(thread, chunk position, elements) of every TaskTensor.add_member call."""
    from merge.ops.task import TaskTensor

    seen: list[tuple[int, int, int]] = []
    add = TaskTensor.add_member
    monkeypatch.setattr(TaskTensor, "add_member", lambda self, state, i, d, start: (
        seen.append((threading.get_ident(), start, d.size if isinstance(d, np.ndarray) else d.numel())),
        add(self, state, i, d, start))[1])
    return seen


def _lane_and_torch(monkeypatch, tmp_path, members, out: str, **opts) -> tuple[bytes, list[str], bytes, list[str]]:
    """merge.soup on the numpy lane, then with PAPA_MERGE_TORCH_ONLY=1: each output's bytes and warnings."""
    results = []
    for env in (None, "1"):
        if env is None:
            monkeypatch.delenv(TORCH_ONLY_ENV, raising=False)
        else:
            monkeypatch.setenv(TORCH_ONLY_ENV, env)
        path = tmp_path / f"{out}-{'torch' if env else 'np'}.safetensors"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge.soup(members, out=path, **opts)
        results += [path.read_bytes(), [str(w.message).replace(str(path), "OUT") for w in caught]]
    monkeypatch.delenv(TORCH_ONLY_ENV, raising=False)
    return tuple(results)


def test_tied_cut_falls_in_the_second_part():
    """The fixture's premise, computed with a stable argsort: member 0's kept ranks start inside chunk 0's second
    part, and whole_band puts the cut of the ties there."""
    a = np.abs(_split_member(0)["big.weight"].numpy() - _split_base()["big.weight"].numpy())
    assert (a == a[0]).all()
    r0 = SPLIT_N - int(TIED_DENSITY * SPLIT_N)
    keep = np.zeros(SPLIT_N, bool)
    keep[np.argsort(a, kind="stable")[r0:]] = True
    band = whole_band(a, r0, SPLIT_N)
    assert HALF < band.lo_cut < 2 * HALF and band.lo_cut == np.flatnonzero(keep)[0]


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": [TIED_DENSITY, 0.5, 0.3], "weight": [0.7, 0.2, 0.1]}),
    ("ties", {"density": [TIED_DENSITY, 1.0, 0.0]}),
    ("breadcrumbs", {"density": [0.1, 0.4, 0.4], "gamma": [0.55, 0.05, 0.1]}),
    ("breadcrumbs_ties", {"density": [0.1, 0.6, 0.3], "gamma": [0.55, 0.02, 0.1], "lambda": 1.3}),
    ("breadcrumbs", {"density": 1.0}),  # a plain sum of task vectors: merged whole (bound by the reads)
    ("task_arithmetic", {"weight": [0.7, 0.2, 1.1], "lambda": 0.8}),
])
@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_split_chunks_same_bytes_as_torch(split_members, monkeypatch, tmp_path, method, params, kind):
    """Chunks of 2 MiB with masks or a sign election are merged in two parts on two threads (member 0's tie cuts
    inside the second part), with the torch path's bytes; plain sums of task vectors in whole chunks."""
    monkeypatch.setattr(NUMPY, "_threads", 2)
    seen = _record_threads(monkeypatch)
    members = [split_members / f"{kind}-{i}.safetensors" for i in range(MEMBERS)]
    a, wa, b, wb = _lane_and_torch(monkeypatch, tmp_path, members, f"{method}-{kind}", method=method,
                                   base=split_members / f"{kind}-base.safetensors", params=params)
    assert a == b and wa == wb
    if params.get("density", 0) == 1.0 or method == "task_arithmetic":
        assert {n for _, start, n in seen if start < SPLIT_N} == {2 * HALF, 1200} and len({t for t, _, _ in seen}) == 1
        return
    lane = [(t, start) for t, start, n in seen if n == HALF]  # the torch run adds whole chunks
    assert {start for _, start in lane} == {0, HALF, 2 * HALF, 3 * HALF}
    # each chunk's first part on the calling thread, its second on a pool thread (which one of the pool's workers
    # takes it is the pool's choice: a pool grown by an earlier merge has several)
    firsts = {t for t, start in lane if start in (0, 2 * HALF)}
    seconds = {t for t, start in lane if start in (HALF, 3 * HALF)}
    assert firsts == {threading.get_ident()} and seconds and threading.get_ident() not in seconds


def test_split_chunks_nonfinite_alike(split_members, monkeypatch, tmp_path):
    """A NaN member and a float16 cast overflow inside a chunk's second part: the numpy lane's parts find them, and
    warn or fail with the torch path's words."""
    monkeypatch.setattr(NUMPY, "_threads", 2)
    seen = _record_threads(monkeypatch)
    base = split_members / "f32-base.safetensors"
    opts = dict(method="ties", base=base, params={"density": 0.5})
    a, wa, b, wb = _lane_and_torch(monkeypatch, tmp_path, [split_members / "f32-0.safetensors",
                                                          split_members / "nan-1.safetensors"], "nan", **opts)
    assert a == b and wa == wb and any("'big.weight'" in w and "NaN" in w for w in wa)
    parts = {t for t, _, n in seen if n == HALF}
    assert threading.get_ident() in parts and len(parts) >= 2  # the caller's thread and the pool's
    errors = []
    for env in (None, "1"):
        if env:
            monkeypatch.setenv(TORCH_ONLY_ENV, env)
        with pytest.raises(merge.MergeError) as e:
            merge.soup([split_members / "f32-0.safetensors", split_members / "huge-1.safetensors"],
                       out=tmp_path / f"huge-{env}.safetensors", dtype="float16", **opts)
        errors.append(str(e.value).replace(f"huge-{env}", "OUT"))
    assert errors[0] == errors[1] and "big.weight" in errors[0]


def test_counted_ties_stay_on_one_thread(split_members, monkeypatch, tmp_path):
    """Bands from the chunked radix passes split their ties with running counts across chunks: such a tensor's
    chunks are merged whole, on one thread, and give the torch path's bytes."""
    monkeypatch.setattr(engine, "WHOLE_SELECT_BYTES", 0)
    monkeypatch.setattr(NUMPY, "_threads", 2)
    seen = _record_threads(monkeypatch)
    members = [split_members / f"f32-{i}.safetensors" for i in range(MEMBERS)]
    a, wa, b, wb = _lane_and_torch(monkeypatch, tmp_path, members, "counted", method="ties",
                                   base=split_members / "f32-base.safetensors", params={"density": TIED_DENSITY})
    assert a == b and wa == wb
    assert {n for _, start, n in seen if start < SPLIT_N} == {2 * HALF, 1200}  # whole chunks (and the small tensor)
    assert len({t for t, _, _ in seen}) == 1


def test_band_counted():
    """Band.counted: running counts only without cuts and with a boundary inside a run of ties."""
    assert not Band(10, 0, 10).counted and not Band(10, 5, 5).counted
    assert not Band(10, 3, 10, lo=1.0, lo_skip=0).counted
    assert Band(10, 3, 10, lo=1.0, lo_skip=2).counted
    assert not Band(10, 3, 10, lo=1.0, lo_skip=2, lo_cut=4, hi_cut=10).counted
    assert not Band(10, 0, 7, hi=1.0, hi_keep=2, hi_eq=2).counted
    assert Band(10, 0, 7, hi=1.0, hi_keep=1, hi_eq=2).counted


def test_scratch_is_per_thread():
    """Two threads working on parts of a chunk never share a work array."""
    mine = NUMPY._scratch("product", 100, "float32")
    assert NUMPY._scratch("product", 50, "float32").base is mine.base  # reused on this thread
    other = []
    t = threading.Thread(target=lambda: other.append(NUMPY._scratch("product", 100, "float32")))
    t.start()
    t.join()
    assert not np.shares_memory(mine, other[0])


def test_whole_band_on_threads_matches_torch(monkeypatch):
    """whole_band's histogram and bucket gathering run over pieces on the lane's threads: the band and its cuts are
    torch's (pieces of 1 Mi elements: four of them)."""
    monkeypatch.setattr(NUMPY, "_threads", 2)
    threads = set()
    bincount = type(NUMPY).bincount
    monkeypatch.setattr(type(NUMPY), "bincount",
                        lambda self, x, minlength: threads.add(threading.get_ident()) or bincount(self, x, minlength))
    a = _tied_magnitudes(4 << 20, 11)
    order = np.argsort(a, kind="stable")
    for r0, r1 in ((3_000_000, 4 << 20), (100, 3_500_000), (1_000_000, 1_000_001)):
        band = whole_band(a, r0, r1)
        assert band == whole_band(torch.from_numpy(a), r0, r1)
        want = np.zeros(a.size, bool)
        want[order[r0:r1]] = True  # the ranks kept, ties by position
        assert (keep_band(a, band, BandCounters(), None, 0) == want).all()
    assert threading.get_ident() in threads and len(threads) >= 2  # the caller's thread and the pool's
