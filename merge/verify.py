"""Verify a published merge: every tensor's bytes against what the writer sent, and a model folder's key set.

While a merge writes, :class:`DigestSink` hashes each output tensor's bytes (sha256) as they pass to the
file, so the digests describe exactly what was written, not what was meant. Once the output is published,
:func:`verify_output` reopens it from disk, hashes every tensor again (in bounded chunks), and compares; a
model folder with a transformers ``config.json`` is also checked against the key set that ``from_pretrained``
expects (the model built from its config on the meta device: no weights allocated).

Example:
    >>> result = merge.soup(["a/", "b/"], out="soup/", verify=True)  # doctest: +SKIP
    >>> result.verified["tensors"]  # doctest: +SKIP
    291
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from merge.backend.arrays import NeedsTorch
from merge.errors import CheckpointFormatError, MismatchError
from merge.io.sources import TensorInfo, open_checkpoint
from merge.io.writer import Sink

__all__ = ["DigestSink", "tensor_digests", "verify_output", "expected_model_keys", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # the re-read is chunked: verifying never holds a whole large tensor


class DigestSink(Sink):
    """A :class:`~merge.io.writer.Sink` that hashes each tensor's bytes on their way to ``inner``.

    Args:
        inner: the sink that writes (a file, a shard set, a torch file).
        digests: filled with ``name -> sha256 hex`` as tensors are written (an empty tensor hashes ``b""``).
    """

    def __init__(self, inner: Sink, digests: dict[str, str]):
        self.inner, self.digests = inner, digests
        self._hashes: dict[str, object] = {}

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        self._hashes = {t.name: hashlib.sha256() for t in tensors}
        self.inner.begin(tensors)

    def write(self, name: str, data: memoryview) -> None:
        self.inner.write(name, data)  # first written, then hashed: a refused write is never counted
        h = self._hashes.get(name)
        if h is None:
            h = self._hashes[name] = hashlib.sha256()
        h.update(data)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.inner.finish()
        self.digests.update({n: h.hexdigest() for n, h in self._hashes.items()})  # type: ignore[attr-defined]

    def abort(self) -> None:
        abort = getattr(self.inner, "abort", None)
        if abort is not None:
            abort()


def tensor_digests(path: str | os.PathLike, *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, str]:
    """``name -> sha256`` of every tensor's bytes in a checkpoint on disk, read back in chunks of ``chunk_bytes``.

    A safetensors output is read back without importing torch (a CPU soup on the numpy backend verifies without
    it); a torch pickle through torch.
    """
    out: dict[str, str] = {}
    with ExitStack() as stack:
        try:
            src = stack.enter_context(open_checkpoint(path, normalise=False, numpy=True))
        except NeedsTorch:
            src = stack.enter_context(open_checkpoint(path, normalise=False))
        view = memoryview(bytearray(max(1, min(chunk_bytes, max((i.nbytes for i in src.infos.values()), default=1)))))
        for name, info in src.infos.items():
            h = hashlib.sha256()
            at = 0
            while at < info.nbytes:
                n = min(len(view), info.nbytes - at)
                src.read_into(name, at, view[:n])
                h.update(view[:n])
                at += n
            out[name] = h.hexdigest()
    return out


def expected_model_keys(folder: str | os.PathLike) -> tuple[str, set[str], set[str]] | None:
    """What ``from_pretrained`` expects of a model folder: ``(architecture, keys, keys it may lack)``.

    The model is built from ``config.json`` on the meta device (no weights allocated). Keys it may lack are
    the tied copies (``lm_head.weight`` tied to the embeddings), which transformers does not save. None when the
    folder has no transformers config (no ``model_type`` or ``architectures`` transformers knows).
    """
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not config.get("model_type") or not archs:
        return None
    import torch
    import transformers

    cls = getattr(transformers, str(archs[0]), None)
    if cls is None:
        return None
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)
    except Exception:  # noqa: BLE001  (a config transformers cannot build, e.g. remote code: no key check)
        return None
    keys = set(model.state_dict())
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    for name in getattr(model, "_tied_weights_keys", None) or ():
        if isinstance(name, str) and name in keys:
            tied.add(name)
    return str(archs[0]), keys, tied


def verify_output(path: str | os.PathLike, digests: Mapping[str, str] | None, *,
                  check_keys: bool = True) -> dict[str, object]:
    """Reopen a published output and check every tensor's sha256 against ``digests`` (what was written); for a
    model folder, check its keys against the ones ``from_pretrained`` expects.

    Args:
        path: the published output (a file or a model folder).
        digests: ``name -> sha256`` recorded as the bytes were written (:class:`DigestSink`); None: only the
            key set and the readability of every tensor are checked.
        check_keys: compare a model folder's keys with transformers' (when its config names an architecture).

    Returns:
        What was checked: ``{"tensors": N, "checksums": "sha256" | None, "architecture": ..., "keys": "match"}``.

    Raises:
        CheckpointFormatError: a tensor's bytes differ from what was written, or a tensor is missing or extra.
        MismatchError: the folder's keys are not the ones its architecture expects.
    """
    path = Path(path)
    found = tensor_digests(path)
    if digests is not None:
        missing = sorted(set(digests) - set(found))
        extra = sorted(set(found) - set(digests))
        if missing or extra:
            name = (missing or extra)[0]
            what = "was written but is missing from" if missing else "was never written but is in"
            raise CheckpointFormatError(f"{path}: verify: tensor {name!r} {what} the published output; delete it "
                                        "and rerun the merge", path=path, tensor=name)
        for name, want in digests.items():
            if found[name] != want:
                raise CheckpointFormatError(f"{path}: verify: tensor {name!r} reads back with sha256 "
                                            f"{found[name][:12]}... but {want[:12]}... was written; the storage "
                                            "changed it, delete the output and rerun the merge", path=path,
                                            tensor=name)
    report: dict[str, object] = {"tensors": len(found), "checksums": "sha256" if digests is not None else None}
    if check_keys and path.is_dir():
        expected = expected_model_keys(path)
        if expected is not None:
            arch, keys, tied = expected
            present = set(found)
            missing = sorted(keys - present - tied)
            unexpected = sorted(present - keys)
            if missing or unexpected:
                shown = "; ".join(part for part in (
                    f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "") if part)
                raise MismatchError(f"{path}: verify: the tensors are not the keys {arch} loads: {shown}; "
                                    "from_pretrained would drop or re-initialise them", path=path,
                                    tensor=(missing or unexpected)[0])
            report.update(architecture=arch, keys="match")
    return report
