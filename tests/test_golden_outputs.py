"""Every operator's output, bit for bit, as it was before the speed work of issue 22 (golden hashes).

The members are built from numpy's PCG64 (stable across numpy and torch releases) on a coarse grid of
values, so that many task-vector magnitudes tie at the selection boundaries: the tie-breaking by
position, the keyed random draws and the chunking are all exercised. Each merge runs twice, with the
default chunk and with a 1 KiB chunk (several chunks per tensor, boundaries inside runs of ties), and
both must hash to the recorded value. A change of any output bit (a faster selection, another kernel
backend, a different draw) fails here; a deliberate change of results must update the table and say
why in its commit.

The hashes were recorded at commit b327224 (before issue 22's changes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merge

# (method, params, sha256 of the output's tensors: name, dtype, shape and bytes, in name order)
GOLDEN: list[tuple[str, dict, str]] = [
    ('uniform', {}, '344764c65504855ea54b36c50ea910f19f6098512065db1ed7fdefe151e1d67e'),
    ('weighted', {'weight': [0.5, 1.0, 2.0]}, '1e3a8d4f29617805a277a5aa16d634b5de9f0d6a61376e7a1c3147cc34d86184'),
    ('task_arithmetic', {'lambda': 0.7}, '33b02d6ec19ff6729e7ab9566ddd8c851934a642891bc34b67d79d8a551f4826'),
    ('ties', {'density': 0.5}, '09f8048ad5d1ba113c87b59cf783adb88184f32a135a6a76fda297bc6f69bc8d'),
    ('ties', {'density': 0.3, 'rescale': True}, '960ff78b717fe1db34e45bdd4e361d32cc1718dde0287ce8b8320e5d9e841905'),
    ('ties', {'density': 0.5, 'int8_mask': True}, '09f8048ad5d1ba113c87b59cf783adb88184f32a135a6a76fda297bc6f69bc8d'),
    ('dare_ties', {'density': 0.5}, 'b9d0b1d34342ef884410b6e310729856b1240b7458fbe1b7068933ba4bd62ae9'),
    ('dare_linear', {'density': 0.4}, '55a0ca6b26fd5ca391bf824b0018e850e166a1172c35c22b1865e094180d73f5'),
    ('breadcrumbs', {'density': 0.6, 'gamma': 0.1}, '0fc02054e907e2c462fbf64dd96fda68ff7b21435d9b80a67ac9114a9f346dfd'),
    ('breadcrumbs_ties', {'density': 0.6, 'gamma': 0.1}, '6c0d07f82ae1e5fd0252c8b234a6aafb77e7f2ad46f4f75fd9f8e17ee3496bd7'),
    ('della', {'density': 0.6, 'epsilon': 0.1}, '16830ed5803b76489f8b855a2d2590904d20d91e2591c09836fa46cce4baebe8'),
    ('della_linear', {'density': 0.5, 'epsilon': 0.2}, '8cc98d12c0649e930e92bbfbf8eb28f2eb44c058c46b9eb5454d7cb20c53d265'),
    ('slerp', {'t': 0.3}, 'fbc0df1f22332bd01ed59e780a85a9af9c496023d17e05756115d247b4e3b430'),
    ('multislerp', {}, 'f4eadd34abf2bf7869ba30697a8d40f57cba876d7abf6e6e02580f12a813d7f6'),
    ('karcher', {}, '4f434e922556e487deb83a4454c879332087b3fa613286de581f7e5d6730a87b'),
    ('model_stock', {}, '37d868092ca38880302ae78b3115a183bbe530513ec4a6cd8712aecbc70980c3'),
    ('ties', {'density': 0.5, '_accumulate': 'float64'}, '1f608dada2feb531af8b5b0cacc8e452fcc7868d7d891b3bb6acd4ab6df0ba5c'),
    ('breadcrumbs', {'density': 0.6, 'gamma': 0.1, '_accumulate': 'float64'},
     '18260e9565f0d4c2f748c261345dd3164ff25046584d199f35107a1e73fe08a5'),
    ('della', {'density': 0.6, '_accumulate': 'float64'}, 'd8ac6a27fe6e01ec5e28f5a915480b7fbc1083672f5d8040c45c4a3adc96165b'),
    ('dare_ties', {'density': 0.5, '_accumulate': 'float64'}, '654d8d11d651885ce191b7ae87bde0fa2dba4a9c0c3652c0f3fa0732eecc2d08'),
    ('ties', {'density': 0.3, 'rescale': True, '_big': True}, 'e7be8ef2e8c343c956de36068d99bd4d9b55691d5c3778bb6ad683bdb324696b'),
    ('dare_ties', {'density': 0.5, '_big': True}, '18d28bd3b4b0e8458ebabe0dda9ecd25fdea54290ef34c59532cce8adb16e487'),
    ('della', {'density': 0.6, '_big': True}, 'f2b08e269dc08822c6a45a88124eb28d610b81ed97af49873144a3354e9616e2'),
    ('breadcrumbs', {'density': 0.6, 'gamma': 0.1, 'rescale': True, '_big': True},
     '1fd0c65155c09ab3de224139f45fff7565715f29fa2c9d569450cfc0d013c15d'),
    ('ties', {'density': 0.3, 'rescale': True, '_big': True, '_accumulate': 'float64'},
     '7386321c402da4d3b1b9e5201df0a4977daae8639ca38a26e2535518691f5c77'),
    ('dare_linear', {'density': 0.5, '_big': True, '_accumulate': 'float64'},
     '717a517954b28f5ba1d82111ed17aaefb73428cfb2674ec03f32ef7472fd8ed9'),
]

MEMBERS = 3


def _grid(rng: np.random.Generator, shape: tuple[int, ...], step: float) -> np.ndarray:
    """Values on a coarse grid, so that many differences from the base share one magnitude."""
    return (rng.integers(-6, 7, size=shape) * step).astype(np.float32)


def _checkpoints(folder: Path, big: bool = False) -> tuple[list[Path], Path]:
    rng = np.random.Generator(np.random.PCG64(20261205))
    shapes = {"a.weight": (64, 48), "b.bias": (48,), "c.weight": (3, 5, 7), "d.weight": (130, 9)}
    if big:  # past torch's parallel grain (32768 elements): sums could split across threads
        shapes["e.weight"] = (260, 300)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}

    def write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
        tensors = {}
        for k, v in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            tensors[k] = t.to(torch.bfloat16) if k.endswith("weight") and k != "c.weight" else t
        save_file(tensors, str(path))
        return path

    base_path = write(folder / "base.safetensors", base)
    members = [write(folder / f"m{i}.safetensors", {k: v + _grid(rng, v.shape, 0.125) for k, v in base.items()})
               for i in range(MEMBERS)]
    return members, base_path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _merge(tmp: Path, method: str, params: dict, chunk_bytes: int | None) -> str:
    params = dict(params)
    accumulate = params.pop("_accumulate", "float32")  # the compute dtype, where a case sets it
    members, base = _checkpoints(tmp, big=bool(params.pop("_big", False)))
    op = merge.ops.get_operator(method)
    members = members[: op.max_members or len(members)]
    out = tmp / f"{method}-{chunk_bytes}.safetensors"
    merge.soup(members, out=out, method=method, base=base if op.base != "none" else None, params=params,
               seed=7, chunk_bytes=chunk_bytes, accumulate=accumulate)
    return _digest(out)


@pytest.mark.parametrize(("method", "params", "expected"), GOLDEN, ids=[f"{m}-{p}" for m, p, _ in GOLDEN])
def test_outputs_are_bit_identical_to_the_recorded_ones(method: str, params: dict, expected: str,
                                                        tmp_path: Path) -> None:
    assert _merge(tmp_path, method, params, None) == expected
    assert _merge(tmp_path, method, params, 1024) == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_task_merges_do_not_depend_on_the_thread_count(threads: int, tmp_path: Path) -> None:
    """The task path computes on torch's threads: its output is the recorded one on 1 thread and on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, (method, params, expected) in enumerate(GOLDEN):
            if params.get("_big"):
                (tmp_path / str(k)).mkdir()
                assert _merge(tmp_path / str(k), method, params, None) == expected, method
    finally:
        torch.set_num_threads(before)
