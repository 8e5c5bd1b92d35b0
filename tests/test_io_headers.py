"""safetensors headers are validated exactly as the format specifies (issue 11, item 1).

The reference is the format's own reader: ``safetensors.safe_open`` (Rust, serde_json). Every case in
the table is run against both it and papa-merge's reader, and they must agree on accept or refuse.
Where papa-merge refuses, the error is one line that names the file (``path=``) and, where the fault
is in one tensor's entry, the tensor (``tensor=``). The rules, from the format's reader
(huggingface/safetensors, ``safetensors/src/tensor.rs``: ``read_metadata`` and ``Metadata::validate``):

- at least 8 bytes; a little-endian u64 header length N <= 100,000,000 with 8 + N <= file size;
- the header is UTF-8 JSON (RFC 8259: no NaN/Infinity, no lone surrogates, no trailing characters),
  a JSON object;
- ``__metadata__`` (at most once) is null or an object of string values (duplicate keys: last wins);
- every other key is a tensor: an object with ``dtype`` (a safetensors dtype name), ``shape`` (a list
  of unsigned 64-bit integers) and ``data_offsets`` (two of them), each at most once; other fields
  are ignored; a tensor name given twice keeps its last entry, but every entry must be well formed;
- sorted by offsets, tensors tile the data exactly from byte 0 (no overlap, no alias, no hole, begin
  <= end), each spans shape x dtype bytes (no 64-bit overflow, whole bytes), and the last one ends
  where the file ends (no trailing bytes).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.errors import CheckpointFormatError
from merge.io.sources import open_checkpoint

F32_2 = b"\x00\x00\x80\x3f\x00\x00\x00\x40"  # [1.0, 2.0]


def _blob(header: dict | None = None, data: bytes = b"", *, raw: bytes | None = None, pad: bool = True) -> bytes:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _t(dtype: object, shape: object, begin: object, end: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _raw(text: str, data: bytes = F32_2) -> bytes:
    return _blob(raw=text.encode(), data=data)


A = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'
# (case id, file bytes, None if valid else (regex the message must match, tensor the error names))
CASES: list[tuple[str, bytes, tuple[str, str | None] | None]] = [
    ("valid", _blob({"a": _t("F32", [2], 0, 8)}, F32_2), None),
    ("valid-metadata", _blob({"__metadata__": {"format": "pt"}, "a": _t("F32", [2], 0, 8)}, F32_2), None),
    ("metadata-null", _blob({"__metadata__": None, "a": _t("F32", [2], 0, 8)}, F32_2), None),
    ("no-padding", _blob({"a": _t("F32", [2], 0, 8)}, F32_2, pad=False), None),
    ("json-whitespace", _raw("\t {" + f'"a":{{{A}}}' + "}\r\n "), None),
    ("no-tensors", _blob({}), None),
    ("only-metadata", _blob({"__metadata__": {"k": "v"}}), None),
    ("scalar", _blob({"a": _t("F32", [], 0, 4)}, F32_2[:4]), None),
    ("empty-tensor", _blob({"a": _t("F32", [0], 0, 0)}), None),
    ("empty-tensors-share-offset", _blob({"a": _t("F32", [0], 0, 0), "b": _t("I64", [0, 3], 0, 0)}), None),
    ("empty-tensor-between", _blob({"a": _t("F32", [1], 0, 4), "b": _t("F32", [0], 4, 4),
                                    "c": _t("F32", [1], 4, 8)}, F32_2), None),
    ("zero-dim-before-overflowing-dims", _blob({"a": _t("F32", [0, 2**62, 4], 0, 0)}), None),
    ("offsets-in-any-order", _blob({"b": _t("F32", [1], 4, 8), "a": _t("F32", [1], 0, 4)}, F32_2), None),
    ("unknown-field-ignored", _blob({"a": {**_t("F32", [2], 0, 8), "note": [1.5, None]}}, F32_2), None),
    ("unicode-and-empty-names", _blob({"": _t("F32", [1], 0, 4), "\u00e9\U0001F600": _t("F32", [1], 4, 8)},
                                      F32_2), None),
    ("escaped-surrogate-pair", _raw('{"a\\ud83d\\ude00":{' + A + "}}"), None),
    ("escaped-field-names", _raw('{"\\u0061":{"\\u0064type":"F\\u0033\\u0032","shape":[2],"data_offsets":[0,8]}}'),
     None),
    ("duplicate-tensor-last-wins", _raw('{"a":{"dtype":"I32","shape":[9],"data_offsets":[8,44]},"a":{' + A + "}}"),
     None),
    ("duplicate-metadata-key-last-wins", _raw('{"__metadata__":{"k":"1","k":"2"},"a":{' + A + "}}"), None),
    ("dtype-F8_E8M0", _blob({"a": _t("F8_E8M0", [8], 0, 8)}, bytes(range(120, 128))), None),
    ("dtype-U16", _blob({"a": _t("U16", [4], 0, 8)}, F32_2), None),
    ("dtype-C64", _blob({"a": _t("C64", [1], 0, 8)}, F32_2), None),
    ("dtype-BOOL", _blob({"a": _t("BOOL", [2], 0, 2)}, b"\x00\x01"), None),
    # the file as a whole
    ("empty-file", b"", (r"not a safetensors file \(only 0 bytes\)", None)),
    ("7-bytes", b"\x08\x00\x00\x00\x00\x00\x00", (r"only 7 bytes", None)),
    ("header-over-100MB", struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6, (r"header claims 100000001 bytes", None)),
    ("header-length-2^64-1", struct.pack("<Q", 2**64 - 1) + b"{}" + b" " * 6, (r"header claims", None)),
    ("header-longer-than-file", struct.pack("<Q", 64) + b"{}" + b" " * 6, (r"header claims 64 bytes", None)),
    ("not-utf8", _blob(raw=b'{"a\xff":{' + A.encode() + b"}}", data=F32_2), (r"not UTF-8", None)),
    ("utf16", _blob(raw=('{"a":{' + A + "}}").encode("utf-16"), data=F32_2), (r"not UTF-8", None)),
    ("utf8-bom", _blob(raw=b"\xef\xbb\xbf{\"a\":{" + A.encode() + b"}}", data=F32_2), (r"corrupt", None)),
    ("not-json", _raw("not json at all!"), (r"corrupt safetensors header", None)),
    ("top-level-list", _raw("[]", b""), (r"not a JSON object", None)),
    ("nul-padding", _blob(raw=('{"a":{' + A + "}}").encode() + b"\x00\x00", data=F32_2), (r"corrupt", None)),
    ("form-feed-padding", _blob(raw=('{"a":{' + A + "}}").encode() + b"\x0c", data=F32_2), (r"corrupt", None)),
    ("trailing-json", _raw('{"a":{' + A + "}} {}"), (r"corrupt", None)),
    ("control-char-in-name", _raw('{"a\x01":{' + A + "}}"), (r"corrupt", None)),
    ("lone-surrogate-in-name", _raw('{"a\\ud800":{' + A + "}}"), (r"lone surrogate", None)),
    ("lone-surrogate-in-ignored-field", _raw('{"a":{' + A + ',"x":"\\udc00"}}'), (r"lone surrogate", None)),
    ("nan-in-ignored-field", _raw('{"a":{' + A + ',"x":NaN}}'), (r"NaN", None)),
    ("ignored-field-125-deep", _raw('{"a":{' + A + ',"x":' + "[" * 125 + "]" * 125 + "}}"), None),
    ("ignored-field-126-deep", _raw('{"a":{' + A + ',"x":' + "[" * 126 + "]" * 126 + "}}"), (r"nested deeper", "a")),
    ("1e400-in-ignored-field", _raw('{"a":{' + A + ',"x":1e400}}'), (r"out of range", None)),
    # __metadata__
    ("metadata-list", _blob({"__metadata__": [1], "a": _t("F32", [2], 0, 8)}, F32_2), (r"__metadata__ is a JSON list", None)),
    ("metadata-string", _blob({"__metadata__": "x", "a": _t("F32", [2], 0, 8)}, F32_2), (r"__metadata__ is a JSON str", None)),
    ("metadata-int-value", _blob({"__metadata__": {"k": 1}, "a": _t("F32", [2], 0, 8)}, F32_2),
     (r"__metadata__ entry 'k' is 1, not a string", None)),
    ("metadata-null-value", _blob({"__metadata__": {"k": None}, "a": _t("F32", [2], 0, 8)}, F32_2),
     (r"__metadata__ entry 'k' is None", None)),
    ("metadata-twice", _raw('{"__metadata__":{},"__metadata__":{},"a":{' + A + "}}"), (r"__metadata__ twice", None)),
    # one tensor's entry
    ("entry-not-object", _blob({"a": 5}), (r"is a JSON int, not an object", "a")),
    ("entry-null", _blob({"a": _t("F32", [2], 0, 8), "b": None}, F32_2), (r"is a JSON null", "b")),
    ("missing-offsets", _blob({"a": {"dtype": "F32", "shape": [2]}}, F32_2), (r"has no 'data_offsets'", "a")),
    ("field-twice", _raw('{"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}'), (r"'shape' twice", "a")),
    ("duplicate-tensor-bad-first", _raw('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]},"a":{' + A + "}}"),
     (r"shape \[-1\]", "a")),
    ("unknown-dtype", _blob({"a": _t("F31", [2], 0, 8)}, F32_2), (r"dtype 'F31', which is not a safetensors dtype", "a")),
    ("lowercase-dtype", _blob({"a": _t("f32", [2], 0, 8)}, F32_2), (r"dtype 'f32'", "a")),
    ("dtype-null", _blob({"a": _t(None, [2], 0, 8)}, F32_2), (r"dtype None", "a")),
    ("negative-shape", _blob({"a": _t("F32", [-2, -2], 0, 16)}, F32_2 * 2), (r"shape \[-2, -2\]", "a")),
    ("fractional-shape", _blob({"a": _t("F32", [2.0], 0, 8)}, F32_2), (r"shape \[2.0\]", "a")),
    ("string-shape", _blob({"a": _t("F32", ["2"], 0, 8)}, F32_2), (r"shape \['2'\]", "a")),
    ("bool-shape", _blob({"a": _t("F32", [True, 2], 0, 8)}, F32_2), (r"shape \[True, 2\]", "a")),
    ("shape-null", _blob({"a": _t("F32", None, 0, 8)}, F32_2), (r"shape None", "a")),
    ("shape-minus-zero", _raw('{"a":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}', b""), (r"shape \[-0, 2\]", "a")),
    ("shape-exponent", _raw('{"a":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}'), (r"shape \[2.0\]", "a")),
    ("shape-infinity", _raw('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}'), (r"Infinity", None)),
    ("shape-2^64", _blob({"a": _t("F32", [2**64], 0, 8)}, F32_2), (r"shape \[18446744073709551616\]", "a")),
    ("shape-overflows", _blob({"a": _t("F32", [2**62, 4, 0], 0, 0)}), (r"overflows", "a")),
    ("bytes-overflow", _blob({"a": _t("F32", [2**61], 0, 0)}), (r"overflows", "a")),
    ("offset-1e400", _raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e400]}}'), (r"out of range", None)),
    ("offset-float", _raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}'), (r"data_offsets \[0, 8.0\]", "a")),
    ("offset-negative", _blob({"a": _t("F32", [2], -8, 0)}, F32_2), (r"data_offsets \[-8, 0\]", "a")),
    ("offset-2^64", _blob({"a": _t("F32", [2], 0, 2**64)}, F32_2), (r"data_offsets \[0, 18446744073709551616\]", "a")),
    ("three-offsets", _blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, F32_2),
     (r"data_offsets \[0, 8, 9\]", "a")),
    # offsets against each other and the file
    ("size-mismatch", _blob({"a": _t("F32", [3], 0, 8)}, F32_2), (r"spans 8 bytes but dtype F32 and shape \[3\] need 12", "a")),
    ("end-before-begin", _blob({"a": _t("F32", [0], 8, 0)}, F32_2), (r"ends at data byte 0, before it begins", "a")),
    ("overlap", _blob({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, F32_2 + F32_2[:4]),
     (r"begins at data byte 4, inside tensor 'a'", "b")),
    ("aliased", _blob({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 0, 8)}, F32_2), (r"inside tensor 'a'", "b")),
    ("hole", _blob({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, F32_2 + F32_2[:4]),
     (r"4 unused bytes before it", "b")),
    ("empty-tensor-past-the-end", _blob({"a": _t("F32", [1], 0, 4), "b": _t("F32", [0], 8, 8)}, F32_2[:4]),
     (r"4 unused bytes before it", "b")),
    ("not-starting-at-0", _blob({"a": _t("F32", [1], 4, 8)}, F32_2), (r"4 unused bytes before it", "a")),
    ("trailing-bytes", _blob({"a": _t("F32", [2], 0, 8)}, F32_2 + b"\x00"), (r"1 byte after the last tensor", None)),
    ("truncated", _blob({"a": _t("F32", [2], 0, 8)}, F32_2[:7]), (r"truncated: tensor 'a' ends at data byte 8 but the file holds 7", "a")),
    ("F4-odd-bits", _blob({"a": _t("F4", [3], 0, 2)}, b"\x00\x00"), (r"whole bytes", "a")),
]

# Valid files papa-merge refuses on purpose, each with a message that says why.
STRICTER: list[tuple[str, bytes, str]] = [
    # 4-bit floats are packed two to a byte; torch has no unpacked 4-bit dtype to average in.
    ("dtype-F4", _blob({"a": _t("F4", [4], 0, 2)}, b"\x00\x00"), r"dtype F4 \(4-bit float\), which papa-merge cannot"),
    # serde also reads a struct from a JSON array and an enum from a one-key object; the format never writes either.
    ("entry-as-array", _raw('{"a":["F32",[2],[0,8]]}'), r"is a JSON list, not an object"),
    ("dtype-as-object", _raw('{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}'), r"dtype \{'F32': None\}"),
]


def _safe_open_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """What the format's own reader makes of the file: its tensors, or None if it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, TypeError, ...
        return None


def _papa_reads(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, normalise=False) as src:
        return src.state_dict()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("case, blob, refusal", CASES, ids=[c[0] for c in CASES])
def test_header_rule_agrees_with_safe_open(tmp_path: Path, case: str, blob: bytes,
                                           refusal: tuple[str, str | None] | None) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(blob)
    reference = _safe_open_reads(path)
    assert (reference is not None) == (refusal is None), f"the table is wrong about safe_open for {case}"
    if refusal is None:
        got = _papa_reads(path)
        assert set(got) == set(reference)
        for k in got:
            assert _same_bits(got[k], reference[k]), k
        return
    pattern, tensor = refusal
    with pytest.raises(CheckpointFormatError) as e:
        _papa_reads(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert e.value.path == str(path) and e.value.tensor == tensor
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("case, blob, pattern", STRICTER, ids=[c[0] for c in STRICTER])
def test_valid_files_papa_merge_refuses_say_why(tmp_path: Path, case: str, blob: bytes, pattern: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(blob)
    if case != "dtype-F4":  # safe_open's torch binding reads F4 into float4_e2m1fn_x2
        assert _safe_open_reads(path) is not None
    with pytest.raises(CheckpointFormatError, match=pattern) as e:
        _papa_reads(path)
    assert "\n" not in str(e.value) and e.value.tensor == "a" and e.value.path == str(path)


def test_every_safetensors_dtype_torch_holds_round_trips(tmp_path: Path) -> None:
    """Each dtype torch and safetensors share is read bit-exactly and written back under the same name."""
    from merge.io.dtypes import _ST_TO_TORCH

    tensors = {}
    for name, dtype in _ST_TO_TORCH.items():
        raw = (torch.arange(4 * dtype.itemsize) % (2 if dtype == torch.bool else 256)).to(torch.uint8)
        tensors[name] = raw.view(dtype).clone()
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    out = merge.write_state_dict(_papa_reads(path), tmp_path / "back.safetensors")
    back = _safe_open_reads(out)
    assert back is not None and set(back) == set(tensors)
    for k in tensors:
        assert _same_bits(back[k], tensors[k]), k
    header = json.loads(out.read_bytes()[8:8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == {k: k for k in tensors}


def test_soup_refuses_a_bad_header_in_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2, 2)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_blob({"a": _t("F32", [-2, -2], 0, 16)}, bytes(16)))
    res = CliRunner().invoke(cli, ["soup", str(good), str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1
    assert res.output == (f"error: {bad}: tensor 'a' has shape [-2, -2]; a shape is a list of non-negative "
                          "integers; the file is corrupt: re-download or re-save it\n")
    assert not (tmp_path / "o.safetensors").exists()


def test_validation_reads_only_the_header(tmp_path: Path, monkeypatch) -> None:
    """Opening a file validates its header without reading tensor bytes (O(tensors), not O(file))."""
    import os

    from merge.io import sources

    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.zeros(1000) for i in range(50)}, str(path))
    reads: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(sources.os, "pread", counting)
    with open_checkpoint(path) as src:
        assert len(src.infos) == 50
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert sum(reads) == 8 + header_len

