"""The streaming engine: chunked equals whole-tensor for every operator, memory flat in the member count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import merge
from merge.engine import GRAM_TILE, MemorySink, plan_merge, run_merge
from merge.io.sources import StateDictSource
from merge.ops import OPERATORS, get_operator
from merge.reader import ChunkReader, Read

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(300, 700, generator=g) * scale,      # 210k elements: several units and chunks
        "conv": torch.randn(8, 5, 3, 3, generator=g) * scale,    # DELLA ranks along dim 1 of a 4-d tensor
        "norm": torch.randn(700, generator=g) * scale,
        "scalar": torch.tensor(0.5 + seed) * scale,
        "steps": torch.tensor(10 + seed),
    }


# parameters an operator needs (or whose interesting branch the generated tests should take)
_EXAMPLE = {"slerp": {"t": 0.4}, "nearswap": {"t": 0.04}, "sce": {"select_topk": 0.5}}


def _takes(op, name: str) -> bool:
    return any(p.name == name for p in op.params)


def _inputs(op, n: int = 3):
    n = min(n, op.max_members or n)
    base = _state(100)
    members = [{k: (v + 0.05 * _state(i)[k] if v.is_floating_point() else v) for k, v in base.items()}
               for i in range(n)]
    params = dict(_EXAMPLE.get(op.name, {})) or ({"density": [0.3, 0.7, 0.5][:n]} if _takes(op, "density") else {})
    if op.name in ("breadcrumbs", "breadcrumbs_ties"):
        params["gamma"] = 0.05
    weights = [1.0, 0.5, 2.0][:n] if any(p.name == "weight" for p in op.params) else None
    return members, (base if op.base != "none" else None), weights, params


def _merge(op, members, base, weights, params, *, chunk_bytes=None, seed=0, accumulate=torch.float32):
    plan = plan_merge([StateDictSource(m) for m in members], op, weights=weights, params=params,
                      base=StateDictSource(base) if base is not None else None, seed=seed, chunk_bytes=chunk_bytes,
                      accumulate=accumulate)
    sink = MemorySink()
    run_merge(plan, sink)
    return sink.tensors, plan


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_chunked_equals_whole_tensor_and_reruns_are_bit_identical(name: str) -> None:
    op = get_operator(name)
    members, base, weights, params = _inputs(op)
    outs = [_merge(op, members, base, weights, params, chunk_bytes=cb, seed=3)[0] for cb in (4096, 300_000, None)]
    for k in members[0]:
        if not members[0][k].is_floating_point():
            src = base if base is not None else members[0]
            assert all(torch.equal(o[k], src[k]) for o in outs), k
            continue
        whole = op([m[k] for m in members], weights, base=None if base is None else base[k], seed=3, name=k, **params)
        for o in outs:
            assert torch.equal(o[k], whole), f"{name}: {k} chunked differs from whole-tensor"
    again = _merge(op, members, base, weights, params, chunk_bytes=4096, seed=3)[0]
    assert all(torch.equal(again[k], outs[0][k]) for k in again)
    if op.random:
        other = _merge(op, members, base, weights, params, seed=4)[0]
        assert not torch.equal(other["emb"], outs[0]["emb"]), "the seed must change the random masks"


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.path != "tensor"))  # tensor: grows
def test_working_memory_is_the_same_for_2_and_8_members(name: str) -> None:
    op = get_operator(name)
    if op.max_members is not None and op.max_members < 8:
        pytest.skip("takes one member")
    plans = []
    for n in (2, 8):
        members = [_state(i) for i in range(n)]
        params = dict(_EXAMPLE.get(op.name, {})) or ({"density": 0.5} if _takes(op, "density") else {})
        base = StateDictSource(_state(100)) if op.base == "required" else None
        plans.append(plan_merge([StateDictSource(m) for m in members], op, params=params, base=base))
    assert plans[0].buffer_bytes == plans[1].buffer_bytes
    assert plans[1].read_bytes > plans[0].read_bytes


@pytest.mark.parametrize("units", [3, 8])
@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.path == "gram"))
def test_cpu_gram_pass_reads_several_units_at_once(name: str, units: int, monkeypatch) -> None:
    """The CPU Gram pass reads CPU_GRAM_UNITS units per chunk and dots each unit on views: the same float64
    dot products, added in the same order, as the whole-tensor reference (a tensor of several such chunks and a
    ragged last unit)."""
    import merge.engine as engine

    monkeypatch.setattr(engine, "CPU_GRAM_UNITS", units)
    op = get_operator(name)
    members, base, weights, params = _inputs(op)
    g = torch.Generator().manual_seed(7)
    big = torch.randn(1201, 700, generator=g)  # 840,700 elements: 12.8 units
    for i, m in enumerate(members):
        m["big"] = big + 0.05 * torch.randn(1201, 700, generator=g) * (i + 1)
    if base is not None:
        base["big"] = big
    out, plan = _merge(op, members, base, weights, params)
    k = "big"
    whole = op([m[k] for m in members], weights, base=None if base is None else base[k], name=k, **params)
    assert torch.equal(out[k], whole), f"{name}: chunked Gram pass differs from whole-tensor"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_gram_units_on_threads_add_the_one_thread_dots_in_order(threads: int) -> None:
    """The CPU Gram pass dots a chunk's units on ``threads`` threads, each holding torch to one thread, and adds
    them in unit order as Python floats: the sums equal the old one-thread loop's (a float64 tensor entry per
    pair, ``+=`` unit by unit), bit for bit, while the caller's torch runs on 2 threads, where a ``ddot`` of a
    unit rounds otherwise (checked on this data where the machine has 2 cores)."""
    import os

    from merge.engine import _add_units
    from merge.ops.apply import UNIT, GramSums, gram_pairs

    g = torch.Generator().manual_seed(3)
    count = 5 * UNIT + 1234  # five whole units and a ragged one
    vectors = [torch.randn(count, dtype=torch.float64, generator=g) * 10.0 ** (3 * k) for k in range(3)]
    vectors.append(torch.randn(count, dtype=torch.float64, generator=g))  # a vector read against the tile
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = torch.zeros(4, 4, dtype=torch.float64)
        for u in range(0, count, UNIT):
            part = [v[u: u + UNIT] for v in vectors]
            for a in range(3):
                for b in range(a, 3):
                    d = float(torch.dot(part[a], part[b]))
                    ref[a, b] += d
                    if a != b:
                        ref[b, a] += d
                for_j = float(torch.dot(part[a], part[3]))
                ref[a, 3] += for_j
                ref[3, a] += for_j
        one = [float(torch.dot(vectors[0][u: u + UNIT], vectors[1][u: u + UNIT])) for u in range(0, count, UNIT)]
        if (os.cpu_count() or 1) >= 2:
            torch.set_num_threads(2)
            two = [float(torch.dot(vectors[0][u: u + UNIT], vectors[1][u: u + UNIT])) for u in range(0, count, UNIT)]
            assert one != two, "a ddot split over 2 threads rounds as on 1 here: this data would not catch a split"
        torch.set_num_threads(2)
        sums = GramSums(4)
        _add_units(sums, vectors[:3], count, gram_pairs([0, 1, 2]), threads)
        _add_units(sums, vectors, count, gram_pairs([0, 1, 2], [3]), threads)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    got = sums.tensor()
    assert got.dtype == torch.float64
    assert got.view(torch.int64).tolist() == ref.view(torch.int64).tolist()


def test_gram_tiles_beyond_the_tile_size() -> None:
    """More members than the Gram tile holds: taken in tiles, same result as the whole-tensor reference."""
    op = get_operator("karcher")
    members = [{k: v + 0.1 * i for k, v in _state(i).items() if v.is_floating_point()} for i in range(GRAM_TILE + 3)]
    out, _ = _merge(op, members, None, None, {}, chunk_bytes=8192)
    for k in members[0]:
        assert torch.equal(out[k], op([m[k] for m in members], name=k)), k


def test_reader_refuses_a_consumer_out_of_step() -> None:
    src = StateDictSource({"a": torch.arange(10.0)})
    reads = [Read(0, "a", 0, 5, torch.float32), Read(0, "a", 5, 5, torch.float32)]
    with ChunkReader([src], iter(reads), buffer_bytes=20) as reader:
        c = reader.take(0, "a", 0, 5)
        assert c.tensor.tolist() == [0, 1, 2, 3, 4]
        c.release()
        with pytest.raises(RuntimeError, match="out of step"):
            reader.take(0, "a", 0, 5)


def test_engine_errors_carry_fields(tmp_path: Path) -> None:
    op = get_operator("della")
    members, base, weights, _ = _inputs(op)
    with pytest.raises(merge.InvalidArgumentError) as e:
        _merge(op, members, base, weights, {"density": 0.5, "epsilon": 0.5})
    assert e.value.member == 0 and e.value.option == "epsilon" and e.value.tensor is not None
    with pytest.raises(merge.InvalidArgumentError) as e:
        plan_merge([StateDictSource(m) for m in members], get_operator("slerp"), params={"t": 0.5},
                   base=StateDictSource(base))
    assert e.value.option == "members" and "at most 1 member" in str(e.value)


_TIES_RSS = """
import json, resource, sys
import merge
from merge.io.sources import open_checkpoint
paths, base, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge.soup(paths, base=base, method="ties", params={"density": 0.3}, out=out, force=True)
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_ties_peak_memory_for_8_members_equals_2_within_20_percent(tmp_path: Path) -> None:
    """Measured in fresh processes (peak RSS): 32 MB members; stacking them, as mergekit does, would add 200 MB."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4096, 2048, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(8):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"w": base["w"] + 0.01 * torch.randn(4096, 2048, generator=g)}, str(p))
        paths.append(str(p))
    peaks = {}
    for n in (2, 8):
        res = subprocess.run([sys.executable, "-c", _TIES_RSS, json.dumps(paths[:n]), str(tmp_path / "base.safetensors"),
                              str(tmp_path / f"ties{n}.safetensors")], capture_output=True, text=True, cwd=ROOT,
                             check=True)
        peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])["peak"] * 1024
    assert peaks[8] <= 1.2 * peaks[2], f"peak RSS 2 members {peaks[2] / 1e6:.0f} MB, 8 members {peaks[8] / 1e6:.0f} MB"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATORS.items() if op.path == "gram"))
def test_the_device_gram_pass_equals_the_unit_by_unit_one(name: str, monkeypatch) -> None:
    """The GPU's Gram pass (large chunks, tile matrix products, cross-tile products), run here on the CPU."""
    import merge.engine as engine

    op = get_operator(name)
    members, base, weights, params = _inputs(op, n=5)
    if weights is not None:
        weights = [1.0, 0.5, 2.0, 1.5, 0.25][:len(members)]
    reference, _ = _merge(op, members, base, weights, params)
    monkeypatch.setattr(engine, "GRAM_TILE", 2)  # 5 vectors: tiles of 2, 2, 1 and their cross products
    monkeypatch.setattr(engine, "GPU_GRAM_CHUNK", 1000)  # several chunks per tensor, a ragged last one
    monkeypatch.setattr(engine._GramKernel, "device_gram", staticmethod(lambda plan: True))
    device, _ = _merge(op, members, base, weights, params)
    for k, v in reference.items():
        assert torch.allclose(device[k], v, rtol=1e-6, atol=1e-7), (name, k)  # float64 Gram: rounding only



@cuda
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_gpu_path_matches_the_cpu(name: str) -> None:
    op = get_operator(name)
    members, base, weights, params = _inputs(op)
    cpu, _ = _merge(op, members, base, weights, params, seed=5)
    plan = plan_merge([StateDictSource(m) for m in members], op, weights=weights, params=params,
                      base=StateDictSource(base) if base is not None else None, seed=5, device=torch.device("cuda"))
    sink = MemorySink()
    run_merge(plan, sink)
    for k, v in cpu.items():
        if v.is_floating_point():
            # the same keyed masks and thresholds; only float rounding (and DELLA ties) may differ
            assert torch.allclose(sink.tensors[k], v, rtol=1e-4, atol=1e-5), (name, k)
        else:
            assert torch.equal(sink.tensors[k], v)
