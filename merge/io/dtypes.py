"""Names of tensor dtypes in the safetensors format and their torch counterparts.

torch is imported on first use: the numpy backend (:mod:`merge.backend.arrays`) names its dtypes with
:class:`merge.backend.arrays.ArrayDType` tokens, which every function here takes as well as torch dtypes.
"""

from __future__ import annotations

from merge.errors import InvalidArgumentError
from merge.backend.arrays import ST_DTYPES, ArrayDType
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

# safetensors spells dtypes in upper case (merge.io.safetensors_format.ST_DTYPE_BITS lists them all);
# these are the ones torch holds one element per item of, so a tensor's bytes are its torch storage.
_ST_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                   "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64"}
# Newer dtypes, where this torch has them. F8_E8M0 is the OCP microscaling exponent (torch.float8_e8m0fnu).
_NEWER = (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
          ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"))
_TABLES: dict[str, dict] = {}


def _tables() -> dict[str, dict]:
    """The safetensors name <-> torch dtype tables, built once torch is wanted."""
    if not _TABLES:
        st_to_torch_ = {k: getattr(torch, v) for k, v in _ST_TORCH_NAMES.items()}
        for name, attr in _NEWER:
            if hasattr(torch, attr):
                st_to_torch_[name] = getattr(torch, attr)
        _TABLES["st"] = st_to_torch_
        _TABLES["torch"] = {v: k for k, v in st_to_torch_.items()}
    return _TABLES


def __getattr__(name: str) -> object:
    if name == "_ST_TO_TORCH":
        return _tables()["st"]
    if name == "_TORCH_TO_ST":
        return _tables()["torch"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Names a user may type for --dtype / dtype=.
USER_DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}
OUTPUT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
ACCUMULATE_DTYPE_NAMES = ("float32", "float64")


def st_to_torch(name: str) -> torch.dtype:
    """Torch dtype for a safetensors dtype string; KeyError if torch cannot hold it."""
    return _tables()["st"][name]


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
    """Whether safetensors has a name for this torch dtype (or numpy-backend dtype)."""
    return isinstance(dtype, ArrayDType) or dtype in _tables()["torch"]


def torch_to_st(dtype: torch.dtype) -> str:
    """Safetensors dtype string for a torch dtype (or numpy-backend dtype)."""
    if isinstance(dtype, ArrayDType):
        return dtype.st
    try:
        return _tables()["torch"][dtype]
    except KeyError:
        raise InvalidArgumentError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_dtype(value: str | torch.dtype | None, *, allowed: tuple[str, ...] = OUTPUT_DTYPE_NAMES,
                what: str = "dtype", numpy: bool = False) -> torch.dtype | ArrayDType | None:
    """Turn a user-facing dtype name ("bf16", "float32", torch.float16, None) into a torch dtype (``numpy``: the
    numpy backend's :class:`~merge.backend.arrays.ArrayDType`).

    Raises:
        InvalidArgumentError: the name is unknown or not among ``allowed``.
    """
    if value is None or not isinstance(value, str) and hasattr(value, "is_floating_point"):
        if value is not None and dtype_name(value) not in allowed:
            raise InvalidArgumentError(f"{what} {value} is not supported; choose one of {', '.join(allowed)}")
        return value
    name = USER_DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
    if name is None or name not in allowed:
        raise InvalidArgumentError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if numpy:
        return next(d for d in ST_DTYPES.values() if d.name == name)
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return dtype.name if isinstance(dtype, ArrayDType) else str(dtype).removeprefix("torch.")


def is_float(dtype: torch.dtype) -> bool:
    """True for the dtypes that are averaged (floating point); others are copied."""
    return dtype.is_floating_point
