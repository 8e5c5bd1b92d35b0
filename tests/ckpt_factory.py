"""Tiny checkpoints for the engine tests, and float64 references computed without the engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def member_state(seed: int, *, dtype: torch.dtype = torch.float32, big: bool = False) -> dict[str, torch.Tensor]:
    """A BatchNorm-CNN-like state dict with floats, an integer buffer, a bool mask and a scalar."""
    g = torch.Generator().manual_seed(seed)
    n = 70_000 if big else 300
    sd = {
        "features.0.weight": torch.randn(16, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(16, generator=g) * 1e-3,
        "features.1.running_mean": torch.randn(16, generator=g),
        "features.1.running_var": torch.rand(16, generator=g) + 0.5,
        "classifier.weight": torch.randn(10, n // 10, generator=g) * 10,
        "classifier.bias": torch.randn(10, generator=g),
        "scale": torch.tensor(float(seed) + 0.25),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["features.1.num_batches_tracked"] = torch.tensor(100 + seed, dtype=torch.int64)
    sd["mask"] = torch.arange(12).reshape(3, 4) % (seed + 2) == 0
    return sd


def save_members(folder: Path, n: int, *, dtype: torch.dtype = torch.float32, prefix: str = "m",
                 big: bool = False) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, sds = [], []
    for i in range(n):
        sd = member_state(i, dtype=dtype, big=big)
        p = folder / f"{prefix}{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
        sds.append(sd)
    return paths, sds


def reference(sds: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, np.ndarray]:
    """The weighted mean of every floating tensor in float64 numpy; others from member 0."""
    w = np.asarray(weights if weights is not None else [1.0] * len(sds), dtype=np.float64)
    w = w / w.sum()
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = sum(wi * sd[k].double().numpy() for wi, sd in zip(w, sds))
        else:
            out[k] = v.numpy()
    return out


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of ``dtype`` at |x| (float64 numpy), including the subnormal floor."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    emin = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126, torch.float64: -1022}[dtype]
    a = np.abs(np.asarray(x, dtype=np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(e, emin)
    return np.ldexp(1.0, (e - mant).astype(int))


def accumulation_bound(sds: list[dict[str, torch.Tensor]], key: str, weights: list[float] | None,
                       eps: float) -> np.ndarray:
    """Forward error bound of summing n products in a precision with unit roundoff ``eps``."""
    n = len(sds)
    w = np.asarray(weights if weights is not None else [1.0] * n, dtype=np.float64)
    w = w / w.sum()
    mag = sum(abs(wi) * np.abs(sd[key].double().numpy()) for wi, sd in zip(w, sds))
    return (n + 2) * eps * mag + math.ulp(0.0)


def as_f64(a) -> torch.Tensor:
    """An array-like as a float64 tensor."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def whole_op(name: str, members, base=None, weights=None, **params) -> np.ndarray:
    """Operator ``name`` on whole float64 tensors (its definition, no engine), as a numpy array."""
    from merge.ops import get_operator

    op = get_operator(name)
    out = op([as_f64(m) for m in members], weights, base=None if base is None else as_f64(base), name="w", **params)
    assert out.dtype == torch.float64
    return out.numpy()
