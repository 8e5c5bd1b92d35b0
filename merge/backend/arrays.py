"""Array backends: the few array operations the shared merge kernels need, on numpy or on torch.

The streaming engine's ``linear``, ``copy`` and task-vector kernels, :func:`merge.ops.apply.fold_combination`,
the task-vector combination and magnitude selection (:class:`merge.ops.task.TaskTensor`, :mod:`merge.ops.select`),
the chunk reader and the safetensors sources and writer are written once, against the primitives below. Two
implementations carry them out:

- :data:`TORCH`: the torch calls the engine has always made (CPU or CUDA), so its bytes are unchanged;
- :data:`NUMPY`: numpy on the CPU, for merges of safetensors members that need no torch (importing torch
  costs about a second and 500 MB of resident memory). Every primitive produces the bits torch produces
  on the CPU (``tests/test_numpy_lane.py`` and ``tests/test_numpy_lane_task.py`` check them against torch):

  - torch's ``acc.add_(x, alpha=c)`` on float32 is a fused multiply-add (one rounding): numpy computes
    ``acc + x * c`` exactly in float64 (a float32 product is exact there), then rounds to float32; the sum
    in float64 can itself be rounded onto a float32 rounding midpoint (double rounding), so those elements
    are moved one float64 step towards the exact sum (its TwoSum error) before the final rounding. With a
    power-of-two coefficient the product is exact in float32 unless it underflows or overflows, which the
    floating-point flags tell: then one float32 multiply and add are the fused result;
  - bfloat16 is held as its uint16 bit pattern: widening is a shift; narrowing rounds to nearest even as
    torch does, NaN becoming torch's ``0x7FC0``;
  - where both operands of ``x - y`` or ``x * y`` are NaN, torch's CPU kernels return the second one's (numpy
    the first's): the numpy primitives put it back;
  - a float32 sum of several weights (``weight_sum``) is torch's only where the additions cannot round before
    the last (:func:`sum_is_exact`); the numpy backend refuses the others, and planning keeps them on torch.

Dtypes of the numpy backend are :class:`ArrayDType` tokens named as safetensors names them, with the
attributes the engine reads of a torch dtype (``itemsize``, ``is_floating_point``); planning, headers and
the writer take either kind.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass

__all__ = ["ArrayDType", "HostDevice", "HOST", "NUMPY", "TORCH", "arrays_for", "arrays_of", "ST_DTYPES",
           "NeedsTorch", "sum_is_exact"]


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
        self.int16, self.int32, self.int64 = ST_DTYPES["I16"], ST_DTYPES["I32"], ST_DTYPES["I64"]
        # work arrays, reused: one set per thread (a task kernel splits a chunk's elements across threads)
        self._local = threading.local()
        self._threads = _cores()

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
        """How many threads the numpy lane's task kernels may split a chunk across (the usable cores at first)."""
        return self._threads

    def set_threads(self, n: int) -> None:
        self._threads = max(1, int(n))

    # -- arithmetic (``dst`` and the operands are 1-D arrays of equal length)
    @property
    def _bufs(self) -> dict[object, object]:
        """This thread's work arrays (see :meth:`_scratch`)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        return bufs

    def _scratch(self, key: str, n: int, dtype: str):
        """A reused work array of ``n`` elements: fresh 2 MiB temporaries per chunk cost page faults (measured: most
        of a bfloat16 soup's time went to the kernel), so each kind is allocated once and grown when needed. Each
        thread has its own: two threads working on halves of a chunk never share one."""
        bufs = self._bufs
        buf = bufs.get(key)
        if buf is None or buf.size < n:
            buf = bufs[key] = self.np.empty(n, dtype=dtype)
        return buf[:n]

    def _has_nan(self, f32) -> bool:
        """Whether a float array holds a NaN (its maximum is NaN if one is: a third of the time of a sum)."""
        np = self.np
        return f32.size > 0 and bool(np.isnan(np.max(f32)))

    def convert_into(self, dst, src) -> None:
        """``dst[:] = src`` converted to dst's dtype bit for bit as torch converts on the CPU (bfloat16 held as its
        uint16 bit pattern; float16 <-> bfloat16 through float32, exactly as torch goes)."""
        np = self.np
        if dst.dtype == src.dtype:
            np.copyto(dst, src)
        elif src.dtype == np.uint16:  # bfloat16 -> float32: exact, the bits shifted into the high half
            wide = dst if dst.dtype == np.float32 else self._scratch("wide", src.size, "float32")
            bits = wide.view(np.uint32)
            np.copyto(bits, src)  # widened, then shifted in place: 1.4x faster than one shift that casts
            np.left_shift(bits, 16, out=bits)
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

    def add_(self, acc, x):
        with self.np.errstate(all="ignore"):
            return self.np.add(x, acc, out=acc)  # x first: a NaN in both gives x's, as torch's CPU kernel does

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


    # -- task-vector kernels (merge.ops.task, merge.ops.select): elementwise, comparisons, bits, exact selection
    def bits_dtype(self, dtype: ArrayDType) -> ArrayDType:
        """The signed integer dtype of a float dtype's width (its bit pattern)."""
        return self.int64 if dtype.itemsize == 8 else self.int32

    def bits(self, x):
        """``x``'s elements viewed as signed integers of their width."""
        return x.view(self.np.int64 if x.itemsize == 8 else self.np.int32)

    def zeros(self, n: int, dtype: ArrayDType, device: object = None):
        return self.np.zeros(n, dtype=dtype.numpy)

    def zeros_bool(self, like):
        return self.np.zeros(like.size, dtype=bool)

    def empty_bool(self, like):
        return self.np.empty(like.size, dtype=bool)

    def is_cuda(self, x) -> bool:
        return False

    def cpu(self, x):
        return x

    def to_int64(self, x):
        return x.astype(self.np.int64, copy=False)

    def abs(self, x):
        return self.np.abs(x)

    def abs_into(self, dst, x):
        return self.np.abs(x, out=dst)

    def _second_nan(self, dst, y) -> None:
        """Where ``y`` is NaN, its NaN (quieted): torch's CPU kernels of ``x - y`` and ``x * y`` give the second
        operand's NaN where both are NaN, numpy the first's."""
        np = self.np
        if dst.dtype.kind != "f" or not isinstance(y, np.ndarray) or not self._has_nan(dst):
            return
        ny = np.isnan(y)
        if ny.any():
            quiet = 1 << (dst.dtype.itemsize * 8 - 10)  # the top mantissa bit
            u = dst.view(np.uint32 if dst.itemsize == 4 else np.uint64)
            u[ny] = y.view(u.dtype)[ny] | quiet

    def _operand(self, x, y):
        """A scalar operand as torch takes it: converted to ``x``'s dtype."""
        return y if isinstance(y, self.np.ndarray) else self.np.asarray(y, dtype=x.dtype)

    def sub_(self, x, y):
        """``x.sub_(y)``, bit for bit with torch on the CPU (NaNs included)."""
        with self.np.errstate(all="ignore"):
            self.np.subtract(x, self._operand(x, y), out=x)
        self._second_nan(x, y)
        return x

    def mul_(self, x, y):
        """``x.mul_(y)``: ``y`` an array or a scalar (converted to x's dtype, as torch does)."""
        with self.np.errstate(all="ignore"):
            self.np.multiply(x, self._operand(x, y), out=x)
        self._second_nan(x, y)
        return x

    def mul_mask_(self, x, mask):
        """``x.mul_(mask)`` with ``mask`` holding 0.0/1.0 (never NaN: nothing to put back)."""
        with self.np.errstate(all="ignore"):
            return self.np.multiply(x, mask, out=x)

    def div_(self, x, y):
        with self.np.errstate(all="ignore"):
            self.np.divide(x, self._operand(x, y), out=x)
        return x

    def neg_(self, x):
        return self.np.negative(x, out=x)

    def clamp_into(self, dst, x, *, min: float | None = None, max: float | None = None):
        """``torch.clamp(x, min=min, out=dst)`` or with ``max`` (one bound): NaN kept, ``-0.0`` kept as torch does."""
        np = self.np
        v = min if min is not None else max
        key = ("full", x.dtype.str, float(v))
        bound = self._bufs.get(key)  # the bound as an array: numpy's maximum is 3x faster than with a scalar
        if bound is None or bound.size < x.size:
            bound = self._bufs[key] = np.full(x.size, v, dtype=x.dtype)
        bound = bound[: x.size]
        with np.errstate(all="ignore"):
            return (np.maximum if min is not None else np.minimum)(bound, x, out=dst)

    _CMP = {"gt": "greater", "ge": "greater_equal", "lt": "less", "le": "less_equal", "eq": "equal"}

    def cmp(self, x, op: str, v):
        """``torch.<op>(x, v)`` (op one of gt, ge, lt, le, eq): a bool array."""
        return getattr(self.np, self._CMP[op])(x, self._operand(x, v))

    def cmp_into(self, dst, x, op: str, v):
        """``torch.<op>(x, v, out=dst)``: 1/0 in dst's dtype (float or integer) or True/False."""
        return getattr(self.np, self._CMP[op])(x, self._operand(x, v), out=dst)

    def add_masked_(self, acc, mask, c: float):
        """``acc.add_(mask, alpha=c)`` with ``mask`` holding 0.0/1.0: the product is exact (``c`` or 0), so one
        rounded sum is torch's fused result."""
        np = self.np
        cc = np.asarray(c, dtype=acc.dtype)
        if cc == 1:  # the product is the mask itself (the default weight): one pass fewer
            p = mask
        else:
            p = self._scratch("product", mask.size, "float32" if acc.dtype == np.float32 else "float64")
            np.multiply(mask, cc, out=p)
        with np.errstate(all="ignore"):
            np.add(p, acc, out=acc)
        return acc

    def xor_into(self, dst, a, b):
        return self.np.bitwise_xor(a, b, out=dst)

    def and_(self, x, y):
        return self.np.bitwise_and(x, y, out=x)

    def xor_(self, x, y):
        return self.np.bitwise_xor(x, y, out=x)

    def bitand(self, x, y):
        return self.np.bitwise_and(x, y)

    def shr(self, x, k: int):
        return self.np.right_shift(x, k)

    def bincount(self, x, minlength: int):
        return self.np.bincount(x, minlength=minlength).astype(self.np.int64, copy=False)

    def cumsum(self, x, *, int64: bool = False):
        return self.np.cumsum(x, dtype=self.np.int64 if int64 else None)

    def searchsorted(self, sorted_, v, *, right: bool = False) -> int:
        """Where ``v`` (a number, or a one-element array) goes in ascending ``sorted_``."""
        v = v[0] if isinstance(v, self.np.ndarray) else v
        return int(self.np.searchsorted(sorted_, v, side="right" if right else "left"))

    def nonzero(self, mask):
        return self.np.flatnonzero(mask)

    def cat(self, arrays):
        return self.np.concatenate(arrays)

    def sort_stable(self, x):
        """``(values, indices)`` of a stable ascending sort (equal values keep their order)."""
        order = self.np.argsort(x, kind="stable")
        return x[order], order

    def weight_sum(self, weights, dtype: ArrayDType) -> float:
        """``torch.tensor(weights, dtype=dtype).sum().item()`` where only the last addition rounds
        (:func:`sum_is_exact`): then any order of additions, torch's too, gives the same (planning checks it)."""
        np = self.np
        ws = [np.asarray(w, dtype=dtype.numpy) for w in weights]
        if not sum_is_exact([float(w) for w in ws], dtype.itemsize):
            raise NotImplementedError("the numpy backend sums weights only where one addition rounds")
        total = np.asarray(0, dtype=dtype.numpy)
        for w in ws:
            total = total + w
        return float(total)

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

    def _bytes_of_bool(self, t):
        """A bool tensor as its uint8 bytes (0/1): torch converts uint8 to a float 6-9x faster than bool, to the
        same 0.0/1.0."""
        return t.view(self.torch.uint8) if t.dtype == self.torch.bool else t

    def copy_into(self, dst, src) -> None:
        dst.copy_(src if dst.dtype == self.torch.bool else self._bytes_of_bool(src))

    def zero_(self, acc) -> None:
        acc.zero_()

    def sub_into(self, dst, x, y) -> None:
        self.torch.sub(x, y, out=dst)

    def mul_into(self, dst, x, c: float) -> None:
        self.torch.mul(x, c, out=dst)

    def add_(self, acc, x):
        return acc.add_(x)

    def add_scaled_(self, acc, x, c: float) -> None:
        acc.add_(x, alpha=c)

    # -- task-vector kernels: the calls merge.ops.task and merge.ops.select have always made
    @property
    def int16(self):
        return self.torch.int16

    @property
    def int32(self):
        return self.torch.int32

    @property
    def int64(self):
        return self.torch.int64

    def bits_dtype(self, dtype):
        return self.torch.int64 if dtype == self.torch.float64 else self.torch.int32

    def bits(self, x):
        return x.view(self.bits_dtype(x.dtype))

    def zeros(self, n: int, dtype, device=None):
        return self.torch.zeros(n, dtype=dtype) if device is None else self.torch.zeros(n, dtype=dtype, device=device)

    def zeros_bool(self, like):
        return self.torch.zeros_like(like, dtype=self.torch.bool)

    def empty_bool(self, like):
        return self.torch.empty_like(like, dtype=self.torch.bool)

    def is_cuda(self, x) -> bool:
        return x.device.type == "cuda"

    def cpu(self, x):
        return x.cpu()

    def to_int64(self, x):
        return x.to(self.torch.int64)

    def abs(self, x):
        return x.abs()

    def abs_into(self, dst, x):
        return self.torch.abs(x, out=dst)

    def sub_(self, x, y):
        return x.sub_(y)

    def mul_(self, x, y):
        return x.mul_(y)

    def mul_mask_(self, x, mask):
        return x.mul_(self._bytes_of_bool(mask))

    def div_(self, x, y):
        return x.div_(y)

    def neg_(self, x):
        return x.neg_()

    def clamp_into(self, dst, x, *, min: float | None = None, max: float | None = None):
        if min is not None:
            return self.torch.clamp(x, min=min, out=dst)
        return self.torch.clamp(x, max=max, out=dst)

    def cmp(self, x, op: str, v):
        return getattr(self.torch, op)(x, v)

    def cmp_into(self, dst, x, op: str, v):
        return getattr(self.torch, op)(x, v, out=dst)

    def add_masked_(self, acc, mask, c: float):
        return acc.add_(mask, alpha=c)

    def xor_into(self, dst, a, b):
        return self.torch.bitwise_xor(a, b, out=dst)

    def and_(self, x, y):
        return x.bitwise_and_(y)

    def xor_(self, x, y):
        return x.bitwise_xor_(y)

    def bitand(self, x, y):
        return self.torch.bitwise_and(x, y)

    def shr(self, x, k: int):
        return self.torch.bitwise_right_shift(x, k)

    def bincount(self, x, minlength: int):
        return self.torch.bincount(x, minlength=minlength)

    def cumsum(self, x, *, int64: bool = False):
        return self.torch.cumsum(x, 0, dtype=self.torch.int64) if int64 else self.torch.cumsum(x, 0)

    def searchsorted(self, sorted_, v, *, right: bool = False) -> int:
        if isinstance(v, int):
            return int(self.torch.searchsorted(sorted_, self.torch.tensor([v]), right=right)[0])
        return int(self.torch.searchsorted(sorted_, v, right=right))

    def nonzero(self, mask):
        return self.torch.nonzero(mask).reshape(-1)

    def cat(self, arrays):
        return self.torch.cat(arrays)

    def sort_stable(self, x):
        return self.torch.sort(x, stable=True)

    def weight_sum(self, weights, dtype) -> float:
        return self.torch.tensor(weights, dtype=dtype).sum().item()

    def sum_is_finite(self, t) -> bool:
        return math.isfinite(float(t.sum()))

    def all_finite(self, t) -> bool:
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:  # float8: torch has no isfinite of them
            t = t.float()
        return bool(self.torch.isfinite(t).all())

    def abs_max(self, t) -> float:
        return float(t.abs().max())


def _cores() -> int:
    """The cores this process may run on (as torch counts its threads by default, without importing torch)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def sum_is_exact(values: list[float], itemsize: int) -> bool:
    """Whether every sum of a proper subset of ``values`` (floats of ``itemsize`` bytes) is exact in that float
    format: then any order of additions rounds once, the last addition, and gives the total correctly rounded.
    Checked for up to 12 values (4096 subsets); beyond, False."""
    from fractions import Fraction

    if len(values) > 12 or not all(math.isfinite(v) for v in values):
        return False
    bits, emin = (24, -126) if itemsize == 4 else (53, -1022)
    sums = [Fraction(0)]
    for v in values:
        sums += [s + Fraction(v) for s in sums]
    for s in sums[:-1]:  # the last is the whole set's: its one rounding is the same in any order
        if s == 0:
            continue
        if Fraction(float(s)) != s:  # not even exact in float64
            return False
        e = math.frexp(float(s))[1]
        q = s / Fraction(2) ** (max(e, emin + 1) - bits)  # s in units of its last place in the format
        if q.denominator != 1 or abs(float(s)) > (3.4028234663852886e38 if itemsize == 4 else sys.float_info.max):
            return False
    return True


NUMPY = _Numpy()
TORCH = _Torch()


def arrays_for(dtype: object) -> _Numpy | _Torch:
    """The backend whose dtypes ``dtype`` is one of: an :class:`ArrayDType` is numpy's, anything else torch's."""
    return NUMPY if isinstance(dtype, ArrayDType) else TORCH


def arrays_of(array: object) -> _Numpy | _Torch:
    """The backend an array belongs to (a numpy array, or a torch tensor), told without importing torch."""
    return NUMPY if type(array).__module__ == "numpy" else TORCH
