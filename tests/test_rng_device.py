"""Keyed draws computed with torch integer ops equal numpy's PCG64 draws bit for bit (issue 22, part 3).

``merge.ops.rng`` draws DARE/DELLA's uniforms with numpy on the CPU and with torch on other devices;
the torch path reproduces numpy's stream (PCG64 XSL-RR jumped ahead per output, 16-bit limbs). Here
the torch path runs on the CPU against numpy's own generator, a merge through it reproduces the
golden hashes, and, where CUDA is present, the GPU draws equal the CPU ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import merge.ops.rng as rng
from merge.ops.rng import BLOCK
from tests.test_golden_outputs import GOLDEN, _merge

CPU = torch.device("cpu")
KEYS = [rng.rng_key(7, "a.weight", 0), rng.rng_key(0, "model.layers.0.mlp.up_proj.weight", 3),
        rng.rng_key(2**64 - 1, "", 1)]

# (start, count): first and last elements of a block, starts inside blocks (even and odd), counts that
# cross one block boundary and several (more than the blocks computed together), an empty request
SPANS = [(0, 1), (1, 1), (0, 2), (0, BLOCK), (BLOCK - 1, 1), (BLOCK - 2, 2), (BLOCK, 1), (BLOCK - 1, 2),
         (3, 1000), (BLOCK - 7, 20), (5, 3 * BLOCK), (2 * BLOCK + 1, 9 * BLOCK + 3), (17, 0)]


def _reference(key: tuple[int, ...], start: int, count: int) -> np.ndarray:
    """numpy's floats for the span, drawn block by block from the whole block (no shortcut)."""
    blocks = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([*key, b]))).random(BLOCK, dtype=np.float32)
              for b in range(start // BLOCK, (start + count) // BLOCK + 1)]
    whole = np.concatenate(blocks)
    first = start - (start // BLOCK) * BLOCK
    return whole[first: first + count]


@pytest.mark.parametrize("key", KEYS, ids=["seed7", "seed0-member3", "seed-max-empty-name"])
@pytest.mark.parametrize(("start", "count"), SPANS, ids=[f"{s}+{c}" for s, c in SPANS])
def test_torch_draws_equal_numpys_bit_for_bit(key: tuple[int, ...], start: int, count: int) -> None:
    got = rng._torch_uniforms(key, start, count, CPU)
    assert got.dtype == torch.float32 and got.shape == (count,)
    assert np.array_equal(got.numpy().view(np.uint32), _reference(key, start, count).view(np.uint32))


@pytest.mark.parametrize("group", [1, 3, 32])
def test_the_draws_do_not_depend_on_how_many_blocks_run_together(group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rng, "_GROUP", group)  # the device's size (32) too, run on the CPU
    start, count = 2 * BLOCK + 1, 9 * BLOCK + 3
    got = rng._torch_uniforms(KEYS[1], start, count, CPU)
    assert np.array_equal(got.numpy().view(np.uint32), _reference(KEYS[1], start, count).view(np.uint32))


def test_the_entry_point_uses_the_backend_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_torch, real_numpy = rng._torch_uniforms, rng._numpy_uniforms
    monkeypatch.setattr(rng, "_torch_uniforms", lambda *a: calls.append("torch") or real_torch(*a))
    monkeypatch.setattr(rng, "_numpy_uniforms", lambda *a: calls.append("numpy") or real_numpy(*a))
    key = KEYS[0]
    auto = rng.uniforms(key, 10, 100, device=CPU)
    monkeypatch.setattr(rng, "BACKEND", "torch")
    forced = rng.uniforms(key, 10, 100, device=CPU)
    assert calls == ["numpy", "torch"]  # numpy on the CPU by default (about 50x faster there)
    assert torch.equal(auto, forced) and torch.equal(auto, torch.from_numpy(_reference(key, 10, 100)))


KEYED = [g for g in GOLDEN if g[0].startswith(("dare", "della"))]


@pytest.mark.parametrize(("method", "params", "expected"), KEYED, ids=[f"{m}-{p}" for m, p, _ in KEYED])
def test_keyed_merges_through_the_torch_draws_keep_the_golden_hashes(method: str, params: dict, expected: str,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = rng._torch_uniforms
    monkeypatch.setattr(rng, "BACKEND", "torch")
    monkeypatch.setattr(rng, "_torch_uniforms", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(rng, "_numpy_uniforms", lambda *a: pytest.fail("numpy drew while the torch path was forced"))
    assert _merge(tmp_path, method, params, None) == expected
    assert _merge(tmp_path, method, params, 1024) == expected
    assert calls  # the merge drew through the torch path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("start", "count"), SPANS, ids=[f"{s}+{c}" for s, c in SPANS])
def test_gpu_draws_equal_the_cpu_draws(start: int, count: int) -> None:
    for key in KEYS:
        got = rng.uniforms(key, start, count, device=torch.device("cuda"))
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu().view(torch.int32), rng.uniforms(key, start, count, device=CPU).view(torch.int32))
