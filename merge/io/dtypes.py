"""Names of tensor dtypes in the safetensors format and their torch counterparts."""

from __future__ import annotations

import torch

from merge.errors import InvalidArgumentError

# safetensors spells dtypes in upper case (merge.io.safetensors_format.ST_DTYPE_BITS lists them all);
# these are the ones torch holds one element per item of, so a tensor's bytes are its torch storage.
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
# Newer dtypes, where this torch has them. F8_E8M0 is the OCP microscaling exponent (torch.float8_e8m0fnu).
_NEWER = (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
          ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"))
for _name, _attr in _NEWER:
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)

_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

# Names a user may type for --dtype / dtype=.
_USER_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}
OUTPUT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
ACCUMULATE_DTYPE_NAMES = ("float32", "float64")


def st_to_torch(name: str) -> torch.dtype:
    """Torch dtype for a safetensors dtype string; KeyError if torch cannot hold it."""
    return _ST_TO_TORCH[name]


def unsupported_reason(name: str) -> str:
    """Why a valid safetensors dtype has no torch dtype here: ``F4 (4-bit float), which ...``."""
    bits = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}.get(name)
    if bits is not None:
        # torch packs these (float4_e2m1fn_x2: two per byte) or lacks them: no dtype to read them one by one.
        return (f"{name} ({bits}-bit float), which papa-merge cannot merge: torch has no unpacked {bits}-bit "
                "dtype; dequantize the checkpoint first")
    attr = dict(_NEWER).get(name)
    if attr is not None:
        return f"{name} (torch.{attr}), which torch {torch.__version__} does not have; upgrade torch"
    return f"{name}, which papa-merge cannot read"


def can_store(dtype: torch.dtype) -> bool:
    """Whether safetensors has a name for this torch dtype."""
    return dtype in _TORCH_TO_ST


def torch_to_st(dtype: torch.dtype) -> str:
    """Safetensors dtype string for a torch dtype."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise InvalidArgumentError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_dtype(value: str | torch.dtype | None, *, allowed: tuple[str, ...] = OUTPUT_DTYPE_NAMES,
                what: str = "dtype") -> torch.dtype | None:
    """Turn a user-facing dtype name ("bf16", "float32", torch.float16, None) into a torch dtype.

    Raises:
        InvalidArgumentError: the name is unknown or not among ``allowed``.
    """
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and dtype_name(value) not in allowed:
            raise InvalidArgumentError(f"{what} {value} is not supported; choose one of {', '.join(allowed)}")
        return value
    dtype = _USER_NAMES.get(str(value).lower().removeprefix("torch."))
    if dtype is None or dtype_name(dtype) not in allowed:
        raise InvalidArgumentError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def is_float(dtype: torch.dtype) -> bool:
    """True for the dtypes that are averaged (floating point); others are copied."""
    return dtype.is_floating_point
