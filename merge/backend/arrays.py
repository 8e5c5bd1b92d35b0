"""Array backends: the few array operations the shared merge kernels need, on numpy or on torch.

The streaming engine's ``linear`` and ``copy`` kernels, :func:`merge.ops.apply.fold_combination`, the chunk
reader and the safetensors sources and writer are written once, against the primitives below. Two
implementations carry them out:

- :data:`TORCH`: the torch calls the engine has always made (CPU or CUDA), so its bytes are unchanged;
- :data:`NUMPY`: numpy on the CPU, for merges of safetensors members that need no torch (importing torch
  costs about a second and 500 MB of resident memory). Every primitive produces the bits torch produces
  on the CPU (``tests/test_numpy_lane.py`` checks them against torch):

  - torch's ``acc.add_(x, alpha=c)`` on float32 is a fused multiply-add (one rounding): numpy computes
    ``acc + x * c`` exactly in float64 (a float32 product is exact there), then rounds to float32; the sum
    in float64 can itself be rounded onto a float32 rounding midpoint (double rounding), so those elements
    are moved one float64 step towards the exact sum (its TwoSum error) before the final rounding. With a
    power-of-two coefficient the product is exact in float32 unless it underflows or overflows, which the
    floating-point flags tell: then one float32 multiply and add are the fused result;
  - bfloat16 is held as its uint16 bit pattern: widening is a shift; narrowing rounds to nearest even as
    torch does, NaN becoming torch's ``0x7FC0``.

Dtypes of the numpy backend are :class:`ArrayDType` tokens named as safetensors names them, with the
attributes the engine reads of a torch dtype (``itemsize``, ``is_floating_point``); planning, headers and
the writer take either kind.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

__all__ = ["ArrayDType", "HostDevice", "HOST", "NUMPY", "TORCH", "arrays_for", "arrays_of", "ST_DTYPES",
           "NeedsTorch"]


class NeedsTorch(Exception):
    """Raised by the numpy backend for an input only torch can read (a pickle): the caller falls back to torch."""


@dataclass(frozen=True)
class ArrayDType:
    """A tensor dtype without torch: the safetensors name, the user-facing name, item size, and whether it is
    averaged (floating point) or copied."""

    st: str
    name: str
    itemsize: int
    is_floating_point: bool
    numpy: str  # how numpy holds one element (bfloat16 and float8 as their bit patterns)

    def __str__(self) -> str:
        return self.name


ST_DTYPES: dict[str, ArrayDType] = {d.st: d for d in (
    ArrayDType("F64", "float64", 8, True, "float64"),
    ArrayDType("F32", "float32", 4, True, "float32"),
    ArrayDType("F16", "float16", 2, True, "float16"),
    ArrayDType("BF16", "bfloat16", 2, True, "uint16"),
    ArrayDType("I64", "int64", 8, False, "int64"),
    ArrayDType("I32", "int32", 4, False, "int32"),
    ArrayDType("I16", "int16", 2, False, "int16"),
    ArrayDType("I8", "int8", 1, False, "int8"),
    ArrayDType("U8", "uint8", 1, False, "uint8"),
    ArrayDType("BOOL", "bool", 1, False, "bool"),
    ArrayDType("C64", "complex64", 8, False, "complex64"),
    ArrayDType("U16", "uint16", 2, False, "uint16"),
    ArrayDType("U32", "uint32", 4, False, "uint32"),
    ArrayDType("U64", "uint64", 8, False, "uint64"),
    ArrayDType("F8_E4M3", "float8_e4m3fn", 1, True, "uint8"),
    ArrayDType("F8_E5M2", "float8_e5m2", 1, True, "uint8"),
    ArrayDType("F8_E8M0", "float8_e8m0fnu", 1, True, "uint8"),
)}


@dataclass(frozen=True)
class HostDevice:
    """The CPU, for the numpy backend (``.type`` as a torch device has it)."""

    type: str = "cpu"
    index: None = None

    def __str__(self) -> str:
        return self.type


HOST = HostDevice()


class _Numpy:
    """The numpy implementation (CPU only)."""

    name = "numpy"

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self.float32, self.float64 = ST_DTYPES["F32"], ST_DTYPES["F64"]
        self.float16, self.bfloat16 = ST_DTYPES["F16"], ST_DTYPES["BF16"]
        self._bufs: dict[str, object] = {}  # work arrays, reused (the engine computes on one thread)

    # -- dtypes
    def dtype(self, st: str) -> ArrayDType:
        return ST_DTYPES[st]

    def named(self, name: str) -> ArrayDType:
        return next(d for d in ST_DTYPES.values() if d.name == name)

    def finfo_max(self, dtype: ArrayDType) -> float:
        return {"F64": sys.float_info.max, "F32": 3.4028234663852886e38, "F16": 65504.0,
                "BF16": 3.3895313892515355e38}[dtype.st]

    # -- buffers
    def empty(self, n: int, dtype: ArrayDType, device: object = None, *, pinned: bool = False):
        return self.np.empty(n, dtype=dtype.numpy)

    def numel(self, t) -> int:
        return t.size

    def convert(self, x, dtype: ArrayDType):
        """A new array of ``x`` converted to ``dtype`` (``x.to(dtype)``)."""
        y = self.np.empty(x.size, dtype=dtype.numpy)
        self.convert_into(y, x)
        return y

    def bytes_buffer(self, n: int, *, pinned: bool = False):
        return self.np.empty(n, dtype=self.np.uint8)

    def memoryview(self, buf) -> memoryview:
        """The bytes of a contiguous array, writable where it is."""
        return memoryview(buf.reshape(-1).view(self.np.uint8))

    def view(self, raw, dtype: ArrayDType):
        """Bytes viewed as elements of ``dtype``."""
        return raw.view(dtype.numpy)

    def threads(self) -> int:
        return 1

    def set_threads(self, n: int) -> None:
        pass

    # -- arithmetic (``dst`` and the operands are 1-D arrays of equal length)
    def _scratch(self, key: str, n: int, dtype: str):
        """A reused work array of ``n`` elements: fresh 2 MiB temporaries per chunk cost page faults (measured: most
        of a bfloat16 soup's time went to the kernel), so each kind is allocated once and grown when needed."""
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            buf = self._bufs[key] = self.np.empty(n, dtype=dtype)
        return buf[:n]

    def _has_nan(self, f32) -> bool:
        """Whether a float32 array holds a NaN (a sum first: the mask only when it is not finite)."""
        np = self.np
        with np.errstate(all="ignore"):
            if np.isfinite(f32.sum(dtype=np.float32)):
                return False
        return bool(np.isnan(f32).any())

    def convert_into(self, dst, src) -> None:
        """``dst[:] = src`` converted to dst's dtype bit for bit as torch converts on the CPU (bfloat16 held as its
        uint16 bit pattern; float16 <-> bfloat16 through float32, exactly as torch goes)."""
        np = self.np
        if dst.dtype == src.dtype:
            np.copyto(dst, src)
        elif src.dtype == np.uint16:  # bfloat16 -> float32: exact, the bits shifted into the high half
            wide = dst if dst.dtype == np.float32 else self._scratch("wide", src.size, "float32")
            np.left_shift(src, np.uint32(16), out=wide.view(np.uint32), dtype=np.uint32)
            if wide is not dst:
                self.convert_into(dst, wide)
        elif src.dtype == np.float16:  # -> float32: exact; torch (F16C) quiets signalling NaNs, numpy keeps them
            wide = dst if dst.dtype == np.float32 else self._scratch("wide", src.size, "float32")
            np.copyto(wide, src)
            nan = self._has_nan(wide)
            if nan:
                wide.view(np.uint32)[np.isnan(wide)] |= 0x400000
            if wide is not dst:
                self.convert_into(dst, wide)
                if dst.dtype == np.uint16 and nan:
                    dst[np.isnan(wide)] = 0x7FC0  # torch's scalar float16 -> bfloat16 (c10::BFloat16) gives 0x7FC0
        elif dst.dtype == np.uint16:
            self._to_bf16(dst, src)
        else:  # float32 -> float16: nearest even (inf beyond its range, as torch; checked after)
            with np.errstate(all="ignore"):
                np.copyto(dst, src, casting="unsafe")
            if self._has_nan(src):  # torch (F16C) quiets NaNs keeping the payload's top bits; numpy may not
                nan = np.isnan(src)
                u = src.view(np.uint32)[nan]
                dst.view(np.uint16)[nan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)

    def _to_bf16(self, dst, src) -> None:
        """Round float32 to bfloat16, nearest even, as torch's vectorised CPU conversion does (NaN: 0xFFFF)."""
        np = self.np
        u = src.view(np.uint32)
        r = self._scratch("bits", src.size, "uint32")
        np.right_shift(u, 16, out=r)
        np.bitwise_and(r, 1, out=r)
        r += 0x7FFF
        r += u  # wraps modulo 2**32 as uint32 does in C
        r >>= 16
        np.copyto(dst, r, casting="unsafe")
        if self._has_nan(src):
            dst[np.isnan(src)] = 0xFFFF

    def copy_into(self, dst, src) -> None:
        self.np.copyto(dst, src)

    def zero_(self, acc) -> None:
        acc.fill(0)

    def sub_into(self, dst, x, y) -> None:
        with self.np.errstate(all="ignore"):
            self.np.subtract(x, y, out=dst)

    def mul_into(self, dst, x, c: float) -> None:
        """``torch.mul(x, c, out=dst)``: c converted to x's dtype, the product correctly rounded."""
        with self.np.errstate(all="ignore"):
            self.np.multiply(x, self.np.asarray(c, dtype=x.dtype), out=dst)

    def add_(self, acc, x) -> None:
        with self.np.errstate(all="ignore"):
            self.np.add(x, acc, out=acc)  # x first: a NaN in both gives x's, as torch's CPU kernel does

    def add_scaled_(self, acc, x, c: float) -> None:
        """``acc.add_(x, alpha=c)`` as torch computes it on the CPU: ``acc + c * x`` rounded once (fused)."""
        np = self.np
        if acc.dtype != np.float32:
            raise NotImplementedError("the numpy backend folds into float32 accumulators only")  # planning refuses it
        c32 = np.float32(c)
        if c32 != 0 and math.frexp(float(c32))[0] in (0.5, -0.5):
            # A power of two: the float32 product is exact unless it underflows or overflows (the flags say so),
            # and then one rounding of the sum is the fused result.
            p = self._scratch("product", x.size, "float32")
            try:
                with np.errstate(over="raise", under="raise", invalid="ignore", divide="ignore"):
                    np.multiply(x, c32, out=p)
            except FloatingPointError:
                pass
            else:
                with np.errstate(all="ignore"):
                    np.add(p, acc, out=acc)  # the product first: a NaN in both gives x's, as torch's kernel does
                return
        self._fma(acc, x, float(c32))

    def _fma(self, acc, x, c: float) -> None:
        np = self.np
        with np.errstate(all="ignore"):
            p = self._scratch("f64a", x.size, "float64")
            a64 = self._scratch("f64b", x.size, "float64")
            np.copyto(p, x)
            p *= c  # exact: 24 x 24 bits
            np.copyto(a64, acc)
            r = np.add(p, a64, out=p)  # the product first, as above
            # Double rounding can only go wrong where the float64 sum sits exactly on a float32 rounding midpoint:
            # in the normal range, float64 mantissa bits 28..0 == 1 followed by zeros; below 2**-126, an odd
            # multiple of 2**-150. Those elements move one float64 step towards the exact sum.
            low = np.bitwise_and(r.view(np.uint64), 0x1FFFFFFF, out=a64.view(np.uint64))
            cand = np.equal(low, 0x10000000, out=self._scratch("mask", x.size, "bool"))
            # 0 < |r| < 2**-126 on the bits: |r| - 1 wraps around for zero (a zero sum is exact: nothing to move)
            mag = np.bitwise_and(r.view(np.uint64), 0x7FFFFFFFFFFFFFFF, out=a64.view(np.uint64))
            mag -= np.uint64(1)
            cand |= np.less(mag, np.uint64(0x3810000000000000 - 1), out=self._scratch("mask2", x.size, "bool"))
            idx = np.flatnonzero(cand)
            if idx.size:
                rs, a = r[idx], acc[idx].astype(np.float64)
                q = x[idx].astype(np.float64) * c
                tiny = np.abs(rs) < 2.0 ** -126
                t = rs * 2.0 ** 150
                mid = np.where(tiny, (np.floor(t) == t) & (np.abs(np.fmod(t, 2.0)) == 1.0), True)
                bb = rs - a
                err = (a - (rs - bb)) + (q - bb)  # TwoSum: the exact a + q is rs + err
                fix = mid & (err != 0) & np.isfinite(err)
                if fix.any():
                    r[idx[fix]] = np.nextafter(rs[fix], np.copysign(np.inf, err[fix]))
            np.copyto(acc, r, casting="unsafe")

    # -- checks
    def sum_is_finite(self, t) -> bool:
        np = self.np
        if t.dtype == np.uint16:  # bfloat16 bits: no sum to take
            return self.all_finite(t)
        with np.errstate(all="ignore"):
            return bool(np.isfinite(t.sum(dtype=np.float64 if t.dtype == np.float64 else np.float32)))

    def all_finite(self, t) -> bool:
        np = self.np
        if t.dtype == np.uint16:  # bfloat16: the exponent bits all set is infinity or NaN
            e = np.bitwise_and(t, 0x7F80, out=self._scratch("exp", t.size, "uint16"))
            return not bool(np.equal(e, 0x7F80, out=self._scratch("mask", t.size, "bool")).any())
        return bool(np.isfinite(t).all())

    def abs_max(self, t) -> float:
        np = self.np
        if t.dtype == np.uint16:
            t = (t.astype(np.uint32) << 16).view(np.float32)
        return float(np.abs(t).max())

    def is_bf16_bits(self, t) -> bool:
        return t.dtype == self.np.uint16


class _Torch:
    """The torch implementation: the calls the engine has always made (CPU or CUDA)."""

    name = "torch"

    @property
    def torch(self):
        import torch

        return torch

    @property
    def float32(self):
        return self.torch.float32

    @property
    def float64(self):
        return self.torch.float64

    def finfo_max(self, dtype) -> float:
        return self.torch.finfo(dtype).max

    def empty(self, n: int, dtype, device=None, *, pinned: bool = False):
        return self.torch.empty(n, dtype=dtype, device=device) if not pinned else \
            self.torch.empty(n, dtype=dtype, pin_memory=True)

    def numel(self, t) -> int:
        return t.numel()

    def convert(self, x, dtype):
        return x.to(dtype)

    def bytes_buffer(self, n: int, *, pinned: bool = False):
        return self.torch.empty(n, dtype=self.torch.uint8, pin_memory=pinned)

    def memoryview(self, buf) -> memoryview:
        return memoryview(buf.contiguous().view(self.torch.uint8).numpy())

    def view(self, raw, dtype):
        return raw.view(dtype)

    def threads(self) -> int:
        return self.torch.get_num_threads()

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def convert_into(self, dst, src) -> None:
        dst.copy_(src)

    def copy_into(self, dst, src) -> None:
        dst.copy_(src)

    def zero_(self, acc) -> None:
        acc.zero_()

    def sub_into(self, dst, x, y) -> None:
        self.torch.sub(x, y, out=dst)

    def mul_into(self, dst, x, c: float) -> None:
        self.torch.mul(x, c, out=dst)

    def add_(self, acc, x) -> None:
        acc.add_(x)

    def add_scaled_(self, acc, x, c: float) -> None:
        acc.add_(x, alpha=c)

    def sum_is_finite(self, t) -> bool:
        return math.isfinite(float(t.sum()))

    def all_finite(self, t) -> bool:
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:  # float8: torch has no isfinite of them
            t = t.float()
        return bool(self.torch.isfinite(t).all())

    def abs_max(self, t) -> float:
        return float(t.abs().max())


NUMPY = _Numpy()
TORCH = _Torch()


def arrays_for(dtype: object) -> _Numpy | _Torch:
    """The backend whose dtypes ``dtype`` is one of: an :class:`ArrayDType` is numpy's, anything else torch's."""
    return NUMPY if isinstance(dtype, ArrayDType) else TORCH


def arrays_of(array: object) -> _Numpy | _Torch:
    """The backend an array belongs to (a numpy array, or a torch tensor), told without importing torch."""
    return NUMPY if type(array).__module__ == "numpy" else TORCH
