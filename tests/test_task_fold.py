"""The task path's selection and fold: the whole-tensor band equals the chunked radix passes, bit for bit.

``merge.ops.select.whole_band`` (one tensor's magnitudes in memory) must give the band the chunked
:class:`RadixSelect` passes give, ties split at the same positions; a merge whose tensors are too big for
the whole-tensor selection (``WHOLE_SELECT_BYTES``) must produce the same bytes as one that is not.
The golden hashes (tests/test_golden_outputs.py) pin the whole-tensor path; this pins the other against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import merge
import merge.engine
from merge.ops.select import Band, BandCounters, RadixSelect, keep_band, radix_passes, whole_band


def _magnitudes(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Magnitudes on a coarse grid (many ties at any boundary), with a few zeros and large values."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = torch.from_numpy(rng.integers(0, 9, size=n) * 0.125).to(dtype)
    a[:: 17] = 0.0
    a[5:: 101] = 3.0e4
    return a


def _radix_band(a: torch.Tensor, r0: int, r1: int, chunk: int) -> Band:
    n = a.numel()
    if r0 <= 0 and r1 >= n or r1 <= r0:
        return Band(n, max(r0, 0), min(r1, n))
    ranks = sorted(({r0} if r0 > 0 else set()) | ({r1 - 1} if r1 < n else set()))
    sel = RadixSelect(tuple(ranks), a.dtype)
    for level in range(radix_passes(a.dtype)):
        sel.begin(level)
        for s in range(0, n, chunk):
            sel.add(a[s: s + chunk])
        sel.end()
    return Band.from_select(sel, n, r0, r1)


def _mask(a: torch.Tensor, band: Band, chunk: int, *, positional: bool) -> torch.Tensor:
    counters, parts = BandCounters(), []
    for s in range(0, a.numel(), chunk):
        part = a[s: s + chunk]
        out = (torch.empty_like(part), torch.empty_like(part))
        m = keep_band(part, band, counters, out, s if positional else None)
        parts.append(torch.ones_like(part) if m is None else m.clone())
    return torch.cat(parts)


def _stable_reference(a: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """1.0 where the element's stable ascending rank of magnitude is in [r0, r1)."""
    order = torch.sort(a, stable=True).indices
    keep = torch.zeros_like(a)
    keep[order[max(r0, 0): max(r1, 0)]] = 1.0
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "r0", "r1"), [(5000, 2500, 5000), (5000, 950, 4950), (5000, 0, 4000),
                                             (5000, 4999, 5000), (5000, 1, 2), (7, 3, 7), (5000, 0, 5000),
                                             (5000, 300, 300)])
def test_whole_band_equals_the_radix_passes_and_the_stable_sort(dtype, n, r0, r1) -> None:
    a = _magnitudes(n, dtype, seed=n + r0)
    whole = whole_band(a, r0, r1)
    radix = _radix_band(a, r0, r1, chunk=333)
    fields = ("n", "r0", "r1", "lo", "lo_skip", "hi", "hi_keep", "hi_eq")
    assert [getattr(whole, f) for f in fields] == [getattr(radix, f) for f in fields]
    reference = _stable_reference(a, r0, r1)
    for chunk in (64, 333, n):
        by_cut = _mask(a, whole, chunk, positional=True)
        by_count = _mask(a, radix, chunk, positional=False)
        assert torch.equal(by_cut.to(reference.dtype), reference)
        assert torch.equal(by_count.to(reference.dtype), reference)


def test_whole_band_cuts_split_the_ties_by_position() -> None:
    a = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 3.0, 1.0, 2.0])  # ascending stable ranks: 1s at 0,2,4,6; 2s at 1,3,7
    band = whole_band(a, 2, 6)  # keep ranks 2..5: the last two 1s (positions 4, 6) and the first two 2s (1, 3)
    assert (band.lo, band.lo_skip, band.lo_cut) == (1.0, 2, 3)
    assert (band.hi, band.hi_keep, band.hi_eq, band.hi_cut) == (2.0, 2, 3, 4)
    assert _mask(a, band, 3, positional=True).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def _checkpoints(folder: Path) -> tuple[list[Path], Path]:
    from safetensors.torch import save_file

    rng = np.random.Generator(np.random.PCG64(22))
    shapes = {"a.weight": (64, 48), "b.bias": (48,), "e.weight": (260, 300)}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    paths = []
    for i, arrays in enumerate([base] + [{k: v + rng.integers(-6, 7, size=v.shape) * 0.125 for k, v in base.items()}
                                         for _ in range(3)]):
        p = folder / f"m{i}.safetensors"
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch.bfloat16)
                   for k, v in arrays.items()}, str(p))
        paths.append(p)
    return paths[1:], paths[0]


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "rescale": True}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}),
])
@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_the_chunked_selection_equals_the_whole_tensor_one(method, params, accumulate, tmp_path, monkeypatch) -> None:
    members, base = _checkpoints(tmp_path)

    def run(tag: str) -> bytes:
        out = tmp_path / f"{tag}.safetensors"
        merge.soup(members, out=out, method=method, base=base, params=params, chunk_bytes=1024,
                   accumulate=accumulate)
        return out.read_bytes()

    whole = run("whole")
    monkeypatch.setattr(merge.engine, "WHOLE_SELECT_BYTES", 0)  # every tensor through the chunked radix passes
    assert run("chunked") == whole
