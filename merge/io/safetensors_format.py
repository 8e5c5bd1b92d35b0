"""The safetensors format's header rules, checked exactly as the format's own reader checks them.

The reference is huggingface/safetensors (``safetensors/src/tensor.rs``: ``read_metadata`` and
``Metadata::validate``, deserialised with serde_json), i.e. what ``safetensors.safe_open`` accepts:

1. at least 8 bytes; a little-endian u64 header length ``N <= 100_000_000`` with ``8 + N <= size``;
2. the header is UTF-8 JSON (RFC 8259: no NaN/Infinity, no lone surrogates, only JSON whitespace
   around the value) and a JSON object;
3. ``__metadata__`` appears at most once and is null or an object of string values (a key given
   twice inside it: the last wins);
4. every other key is a tensor: an object whose ``dtype`` is a safetensors dtype name, ``shape`` a list
   of unsigned 64-bit integers and ``data_offsets`` two of them, each field once (other fields are
   ignored); a tensor named twice keeps its last entry, but every entry must be well formed;
5. sorted by offsets, the tensors tile the data exactly: the first begins at byte 0, each begins where
   the previous ends (no overlap, alias or hole) and does not end before it begins, each spans
   ``prod(shape) * bits / 8`` bytes (no 64-bit overflow, whole bytes), and the last ends at the end of
   the file (no trailing bytes).

Python's ``json`` is laxer than serde_json in a few places (NaN/Infinity, lone surrogates, ``-0`` read
as an integer, UTF-16/32 input, duplicate keys): each is closed here. Two serde leniencies are not
followed, on purpose: a tensor entry written as a JSON array and a dtype written as a one-key object
are refused (no safetensors writer produces either).

The cost is O(number of tensors) plus one sort by offset; tensor bytes are never read. No torch here:
:mod:`merge.io.sources` maps the dtype names to torch dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from merge.errors import CheckpointFormatError

__all__ = ["MAX_HEADER", "ST_DTYPE_BITS", "HeaderEntry", "CheckedHeader", "read_checked_header", "check_header"]

MAX_HEADER = 100_000_000  # the format's cap on the JSON header, in bytes
_U64 = 1 << 64
# Every dtype name the format defines, with its width in bits (tensor.rs, Dtype::bitsize).
ST_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "F64": 64, "I64": 64, "U64": 64,
}
_FIELDS = ("dtype", "shape", "data_offsets")
# serde_json stops at 128 nested arrays/objects: the header object and a tensor's entry leave 125 for a value.
_MAX_IGNORED_DEPTH = 125
_FIX = "the file is corrupt: re-download or re-save it"


class HeaderEntry(NamedTuple):
    """One tensor as a checked header describes it (name as stored, dtype as the format spells it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section, which starts at CheckedHeader.data_start
    end: int


@dataclass
class CheckedHeader:
    """A header that passed every rule: entries in storage order, metadata, and where the data starts."""

    entries: list[HeaderEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    raw: bytes


class _Bad(Exception):
    """A broken rule; ``tensor`` names the entry at fault, if one is."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


class _Dups(dict):
    """A JSON object in which some key appeared more than once; ``pairs`` keeps every occurrence."""

    __slots__ = ("pairs",)


class _MinusZero:
    """``-0`` in the JSON text: serde_json reads it as a float, so it is no unsigned integer."""

    def __repr__(self) -> str:
        return "-0"


_MINUS_ZERO = _MinusZero()


def _object(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        d = _Dups(d)
        d.pairs = pairs
    return d


def _constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _integer(text: str) -> object:
    return _MINUS_ZERO if text == "-0" else int(text)


def _number(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _check_strings(obj: object) -> None:
    """Refuse lone UTF-16 surrogates (``"\\ud800"``), which Python's json accepts and serde_json does not."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"string {x!r} holds a lone surrogate escape") from None
        elif isinstance(x, dict):
            pairs = x.pairs if isinstance(x, _Dups) else x.items()
            for k, v in pairs:
                stack.append(k)
                stack.append(v)
        elif isinstance(x, list):
            stack.extend(x)


def _kind(x: object) -> str:
    return {dict: "object", _Dups: "object", list: "list", str: "str", int: "int", float: "float",
            bool: "bool", type(None): "null"}.get(type(x), type(x).__name__)


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


_OFFSETS = attrgetter("begin", "end")


def _u64s(xs: object) -> bool:
    """A JSON list of unsigned 64-bit integers (bools, floats and ``-0`` are not). Runs twice per tensor: kept plain."""
    if type(xs) is not list:
        return False
    for d in xs:
        if type(d) is not int or d < 0 or d >= _U64:
            return False
    return True


def _depth(x: object) -> int:
    """How many arrays/objects are nested in ``x`` (0 for a scalar)."""
    depth, level = 0, [x]
    while True:
        level = [y for y in level if isinstance(y, (list, dict))]
        if not level:
            return depth
        depth += 1
        level = [c for y in level for c in (y.values() if isinstance(y, dict) else y)]


def _entry(name: str, entry: object) -> HeaderEntry:
    """Check one tensor's entry field by field (rule 4). This runs once per tensor: the common case is kept cheap."""
    if type(entry) is not dict:
        return _odd_entry(name, entry)
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError as e:
        raise _Bad(f"tensor {name!r} has no {e.args[0]!r}", name) from None
    if len(entry) > 3:
        _check_ignored_fields(name, entry)
    if type(dtype) is not str or dtype not in ST_DTYPE_BITS:
        raise _Bad(f"tensor {name!r} has dtype {_short(dtype)}, which is not a safetensors dtype "
                   f"({', '.join(ST_DTYPE_BITS)})", name)
    if not _u64s(shape):
        raise _Bad(f"tensor {name!r} has shape {_short(shape)}; a shape is a list of non-negative integers", name)
    if not _u64s(offsets) or len(offsets) != 2:
        raise _Bad(f"tensor {name!r} has data_offsets {_short(offsets)}; they are two non-negative integers "
                   "[begin, end]", name)
    return HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _odd_entry(name: str, entry: object) -> HeaderEntry:
    """An entry that is not a plain object: one in which a key repeats (checked, then read), or no object at all."""
    if not isinstance(entry, _Dups):
        raise _Bad(f"tensor {name!r} is a JSON {_kind(entry)}, not an object with dtype, shape and data_offsets",
                   name)
    twice = [f for f in _FIELDS if sum(k == f for k, _ in entry.pairs) > 1]
    if twice:
        raise _Bad(f"tensor {name!r} gives {twice[0]!r} twice", name)
    return _entry(name, dict(entry))  # the repeats were of ignored fields, which serde_json allows


def _check_ignored_fields(name: str, entry: dict) -> None:
    for key, value in entry.items():  # fields the format ignores, but serde_json still parses them
        if key not in _FIELDS and _depth(value) > _MAX_IGNORED_DEPTH:
            raise _Bad(f"tensor {name!r} has a field {key!r} nested deeper than JSON readers allow", name)


def _nbytes(e: HeaderEntry) -> int:
    """Bytes the tensor spans, with the reference's overflow rule: each running product must fit in 64 bits."""
    shape = e.shape
    # Up to the first zero the dimensions are >= 1, so the running products grow: checking their last is enough.
    head = shape[: shape.index(0)] if 0 in shape else shape
    n = prod(head)
    if n >= _U64:
        raise _Bad(f"tensor {e.name!r} has shape {list(shape)}, whose element count overflows 64 bits", e.name)
    if len(head) < len(shape):
        n = 0
    bits = n * ST_DTYPE_BITS[e.dtype]
    if bits >= _U64:
        raise _Bad(f"tensor {e.name!r} has shape {list(shape)}, whose size in bits overflows 64 bits", e.name)
    if bits % 8:
        raise _Bad(f"tensor {e.name!r} has {n} elements of {e.dtype} ({bits} bits), which do not fill whole bytes",
                   e.name)
    return bits // 8


def _parse(raw: bytes) -> object:
    """JSON as serde_json reads it (rule 2)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"corrupt safetensors header: not UTF-8 (byte {e.start})") from None
    options = {"parse_int": _integer} if "-0" in text else {}  # rare: skip the per-integer hook otherwise
    try:
        obj = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_number, **options)
        if "\\u" in text:
            _check_strings(obj)
    except ValueError as e:
        raise _Bad(f"corrupt safetensors header: {e}") from None
    except RecursionError:
        raise _Bad("corrupt safetensors header: nested too deeply") from None
    return obj


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"__metadata__ is a JSON {_kind(value)}, not an object of strings")
    for k, v in value.items():
        if type(v) is not str:
            raise _Bad(f"__metadata__ entry {k!r} is {_short(v)}, not a string")
    return dict(value)


def check_header(raw: bytes, data_len: int) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Apply rules 2-5 to a header's bytes, given the length of the data section that follows it.

    Returns:
        (entries in storage order, metadata).

    Raises:
        _Bad: the first rule broken (with the tensor at fault, if one is).
    """
    header = _parse(raw)
    if not isinstance(header, dict):
        raise _Bad(f"corrupt safetensors header: it is a JSON {_kind(header)}, not a JSON object")
    if isinstance(header, _Dups):
        if sum(k == "__metadata__" for k, _ in header.pairs) > 1:
            raise _Bad("corrupt safetensors header: it gives __metadata__ twice")
        for key, value in header.pairs:
            if key != "__metadata__":
                _entry(key, value)  # a shadowed duplicate must still be well formed; the last one is kept below
    metadata = _metadata(header.get("__metadata__"))
    entries = [_entry(name, value) for name, value in header.items() if name != "__metadata__"]
    entries.sort(key=_OFFSETS)  # the reference sorts by (begin, end), then checks the tiling
    pos, prev = 0, None
    for e in entries:
        if e.end < e.begin:
            raise _Bad(f"tensor {e.name!r} ends at data byte {e.end}, before it begins ({e.begin}); {_FIX}", e.name)
        if e.begin < pos:
            raise _Bad(f"tensor {e.name!r} begins at data byte {e.begin}, inside tensor {prev!r} (bytes {pos} and "
                       f"before); tensors may not overlap; {_FIX}", e.name)
        if e.begin > pos:
            raise _Bad(f"tensor {e.name!r} leaves {e.begin - pos} unused bytes before it (it begins at data byte "
                       f"{e.begin}, the previous tensor ends at {pos}); {_FIX}", e.name)
        need = _nbytes(e)
        if e.end - e.begin != need:
            raise _Bad(f"tensor {e.name!r} spans {e.end - e.begin} bytes but dtype {e.dtype} and shape "
                       f"{list(e.shape)} need {need}; {_FIX}", e.name)
        pos, prev = e.end, e.name
    if pos > data_len:
        raise _Bad(f"truncated: tensor {prev!r} ends at data byte {pos} but the file holds {data_len} bytes of "
                   "data; re-download or re-save it", prev)
    if pos < data_len:
        extra = data_len - pos
        raise _Bad(f"the file has {extra} byte{'s' if extra != 1 else ''} after the last tensor that no header "
                   f"entry describes; {_FIX}")
    return entries, metadata


def read_checked_header(path: str | os.PathLike, fd: int) -> CheckedHeader:
    """Read a safetensors file's header from ``fd`` and check every rule of the format (1-5).

    Raises:
        CheckpointFormatError: a rule is broken; one line naming the file (``path``) and, where one entry
            is at fault, the tensor (``tensor``).
    """
    path = Path(path)
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointFormatError(f"{path}: not a safetensors file (only {size} bytes); "
                                    "is it truncated or a different format?", path=path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointFormatError(f"{path}: not a safetensors file or truncated (header claims {n} bytes, "
                                    f"file has {size}); re-download or re-save it", path=path)
    raw = os.pread(fd, n, 8)
    try:
        entries, metadata = check_header(raw, size - 8 - n)
    except _Bad as e:
        message = str(e)
        if _FIX not in message and "re-download" not in message:
            message += "; " + _FIX
        raise CheckpointFormatError(f"{path}: {message}", path=path, tensor=e.tensor) from None
    return CheckedHeader(entries, metadata, 8 + n, size, raw)
