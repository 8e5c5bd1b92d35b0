"""LoRA inputs: ``base+adapter`` as a member, the adapter's delta added per tensor while the merge streams.

A reference ``base+adapter`` (mergekit's ``model+lora``, ``mergekit/common.py``: ``ModelReference.parse``) names a
checkpoint and a PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``). :class:`LoraSource`
presents the base's tensors with, for each weight the adapter targets, PEFT's merged weight
(``peft/tuners/lora/layer.py``: ``Linear.get_delta_weight``)::

    W' = W + s * B @ A        s = lora_alpha / r     (rsLoRA, ``use_rslora``: lora_alpha / sqrt(r))

with ``fan_in_fan_out`` transposing ``B @ A``; ``r`` is each module's own rank (the rows of its ``lora_A``), so a
``rank_pattern`` needs nothing more. PEFT names the factors of base tensor ``<name>.weight``
``base_model.model.<name>.lora_A.weight`` and ``...lora_B.weight``.

Nothing merged is kept: a read of bytes ``[offset, offset + n)`` of a targeted weight reads the base rows that
cover them, adds ``s * B[rows] @ A`` and returns the requested bytes, so a chunk costs a chunk-sized block (plus
at most two rows) and the adapter's two small factors. mergekit instead writes a fully merged copy of the model
to a cache first.

Rounding (a deliberate difference from PEFT): the sum is formed in float32 (``W`` and the delta both
float32) and cast to the stored dtype once. PEFT casts the delta to the weight's dtype and adds there, rounding
twice; for float32 weights the two agree to float32 rounding, for bfloat16/float16 they may differ by one ulp.

Refused by name (``adapter_config.json`` key): ``use_dora`` (DoRA rescales each column by the norm of the whole
merged weight, which a chunk cannot see), ``alpha_pattern``, ``modules_to_save``, ``lora_bias``,
``layer_replication``, ``target_parameters``, LoRA on embeddings (``lora_embedding_A``), and any ``peft_type``
other than ``LORA``.

The adapter may be on the Hub: ``base+hf://org/adapter[@revision][/sub-folder]`` fetches its
``adapter_config.json`` and ``adapter_model.safetensors`` only (:func:`merge.hub.resolve_adapter`, through
huggingface_hub's cache), and the recipe records it as ``hf://org/adapter@sha``.

Example:
    >>> split_reference("base/+adapter/")
    ('base/', 'adapter/')
    >>> split_reference("model.safetensors") is None
    True
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


from merge.errors import CheckpointFormatError, CheckpointNotFoundError, MismatchError
from merge.io.schemes import HF_PREFIX, describe
from merge.io.sources import Source, open_checkpoint, read_row_blocks
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["LoraSource", "open_member", "split_reference", "is_lora_reference", "adapter_folder", "ADAPTER_CONFIG"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_BLOCK_ELEMS = 1 << 15  # rows per block of a targeted tensor: about this many elements
# adapter_config.json keys whose non-empty value changes the merged weight in a way not applied here.
_REFUSED_KEYS = {
    "use_dora": "DoRA rescales each column by the norm of the whole merged weight",
    "alpha_pattern": "per-module alphas are not applied",
    "modules_to_save": "whole replaced modules are not applied",
    "lora_bias": "LoRA biases are not applied",
    "layer_replication": "replicated layers are not applied",
    "target_parameters": "LoRA on bare parameters is not applied",
}


def split_reference(reference: str | os.PathLike) -> tuple[str, str] | None:
    """``(base, adapter)`` for ``"base+adapter"``; ``None`` for a plain reference (or an existing path with a ``+``)."""
    text = os.fspath(reference)
    if not isinstance(text, str) or "+" not in text or Path(text).exists():
        return None
    base, adapter = text.rsplit("+", 1)
    return (base, adapter) if base and adapter else None


def is_lora_reference(reference: object) -> bool:
    return isinstance(reference, (str, os.PathLike)) and split_reference(reference) is not None


def open_member(reference: str | os.PathLike, *, key: str | None = None) -> Source:
    """:func:`merge.io.sources.open_checkpoint`, or a :class:`LoraSource` for ``base+adapter``."""
    parts = split_reference(reference)
    if parts is None:
        return open_checkpoint(reference, key=key)
    return LoraSource(parts[0], parts[1], key=key)


def adapter_folder(adapter: str | os.PathLike) -> Path:
    """The local folder of an adapter reference: a path as it is; ``hf://org/adapter[@rev]`` fetched (its two files
    only) into huggingface_hub's cache by :func:`merge.hub.resolve_adapter`."""
    text = os.fspath(adapter)
    if isinstance(text, str) and text.startswith(HF_PREFIX):
        from merge.hub import resolve_adapter  # the network code stays in the hub layer

        return resolve_adapter(text)
    return Path(text)


def _read_config(folder: Path) -> dict:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        what = "no such folder" if not folder.exists() else f"has no {ADAPTER_CONFIG}"
        raise CheckpointNotFoundError(f"{folder}: {what}; a LoRA adapter is a PEFT folder with {ADAPTER_CONFIG} and "
                                      f"{ADAPTER_WEIGHTS[0]}", path=cfg_path)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{cfg_path}: not readable JSON ({e})", path=cfg_path) from None
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{cfg_path}: holds {type(cfg).__name__}, not a JSON object", path=cfg_path)
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CheckpointFormatError(f"{cfg_path}: peft_type {kind!r} is not supported; only LORA adapters are",
                                    path=cfg_path)
    for k, why in _REFUSED_KEYS.items():
        if cfg.get(k):
            raise CheckpointFormatError(f"{cfg_path}: {k!r} is not supported ({why}); merge this adapter with peft's "
                                        "merge_and_unload and pass the merged model", path=cfg_path)
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or isinstance(cfg.get("lora_alpha"), bool):
        raise CheckpointFormatError(f"{cfg_path}: 'lora_alpha' must be a number, got {cfg.get('lora_alpha')!r}",
                                    path=cfg_path)
    return cfg


class LoraSource(Source):
    """A base checkpoint with a PEFT LoRA adapter applied per tensor, lazily.

    Args:
        base: the base checkpoint (any reference :func:`open_checkpoint` opens).
        adapter: the PEFT adapter folder, or ``hf://org/adapter[@revision]`` (fetched by :func:`adapter_folder`).
        key: passed to :func:`open_checkpoint` for the base.

    Raises:
        CheckpointNotFoundError: the base, the adapter folder or its ``adapter_config.json`` is missing.
        CheckpointFormatError: an adapter key this module does not apply (see the module docstring), or factors
            without their pair.
        MismatchError: a factor targets a tensor the base lacks, or its shape does not fit the base tensor.

    Example:
        >>> with LoraSource("base/", "adapter/") as src:  # doctest: +SKIP
        ...     w = src.read("model.layers.0.self_attn.q_proj.weight")   # W + alpha/r * B @ A
    """

    kind = "lora"

    def __init__(self, base: str | os.PathLike, adapter: str | os.PathLike, *, key: str | None = None):
        self.adapter_path = adapter_folder(adapter)
        cfg = _read_config(self.adapter_path)
        self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self._rslora = bool(cfg.get("use_rslora", False))
        self._alpha = float(cfg["lora_alpha"])
        weights = next((self.adapter_path / w for w in ADAPTER_WEIGHTS if (self.adapter_path / w).is_file()), None)
        if weights is None:
            raise CheckpointNotFoundError(f"{self.adapter_path}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]}",
                                          path=self.adapter_path / ADAPTER_WEIGHTS[0])
        self._base = open_checkpoint(base, key=key)
        try:
            self._adapter = open_checkpoint(weights, normalise=False)
            self._targets = self._pair_factors()
        except BaseException:
            self.close()
            raise
        self.path = self._base.path
        self.metadata = dict(self._base.metadata)
        self.infos = dict(self._base.infos)
        self._cached: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def _pair_factors(self) -> dict[str, tuple[str, str]]:
        """``base tensor name -> (lora_A key, lora_B key)``, every pair checked against the base's shapes."""
        where = self._adapter.path
        pairs: dict[str, dict[str, str]] = {}
        for k in self._adapter.names:
            if "lora_embedding_" in k:
                raise CheckpointFormatError(f"{where}: {k!r} is LoRA on an embedding, which is not supported; merge "
                                            "this adapter with peft's merge_and_unload first", path=where, tensor=k)
            name = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k
            for part in ("A", "B"):
                suffix = f".lora_{part}.weight"
                if name.endswith(suffix):
                    pairs.setdefault(name[:-len(suffix)] + ".weight", {})[part] = k
                    break
            else:
                raise CheckpointFormatError(f"{where}: tensor {k!r} is not a LoRA factor (<name>.lora_A.weight or "
                                            "<name>.lora_B.weight); only plain LoRA adapters are supported",
                                            path=where, tensor=k)
        out = {}
        for target, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                lone = next(iter(ab.values()))
                raise CheckpointFormatError(f"{where}: {lone!r} has no lora_{'B' if 'A' in ab else 'A'} partner",
                                            path=where, tensor=lone)
            if target not in self._base.infos:
                raise MismatchError(f"{where}: targets {target!r}, which the base {self._base.path} lacks; pass the "
                                    "base model this adapter was trained on", path=where, tensor=target)
            a, b = self._adapter.infos[ab["A"]].shape, self._adapter.infos[ab["B"]].shape
            w = self._base.infos[target].shape
            want = (b[0], a[1]) if len(a) == 2 and len(b) == 2 and a[0] == b[1] else None
            if want is not None and self._fan_in_fan_out:
                want = want[::-1]
            if want is None or tuple(w) != want or not self._base.infos[target].dtype.is_floating_point:
                raise MismatchError(f"{where}: factors of {target!r} (lora_A {tuple(a)}, lora_B {tuple(b)}) do not fit "
                                    f"the base tensor {tuple(w)} ({self._base.infos[target].dtype}); pass the base "
                                    "model this adapter was trained on", path=where, tensor=target)
            out[target] = (ab["A"], ab["B"])
        return out

    @property
    def targets(self) -> list[str]:
        """The base tensors the adapter changes."""
        return list(self._targets)

    def scaling(self, name: str) -> float:
        """PEFT's ``scaling`` of the module owning ``name``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        r = self._adapter.infos[self._targets[name][0]].shape[0]
        return self._alpha / (math.sqrt(r) if self._rslora else r)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # One pair kept at a time: the engine reads a tensor's chunks one after another.
        if self._cached is None or self._cached[0] != name:
            a_key, b_key = self._targets[name]
            a = self._adapter.read(a_key).to(torch.float32)
            b = self._adapter.read(b_key).to(torch.float32) * self.scaling(name)
            if self._fan_in_fan_out:  # the stored weight is (in, out): its rows are columns of B @ A
                a, b = b.T.contiguous(), a.T.contiguous()
            self._cached = (name, a, b)
        return self._cached[1], self._cached[2]

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        if name not in self._targets:
            self._base.read_into(name, byte_offset, out)
            return
        info = self.infos[name]
        cols = info.shape[1]
        row_bytes = cols * info.dtype.itemsize
        a, b = self._factors(name)
        acc = torch.float64 if info.dtype == torch.float64 else torch.float32
        a = a.to(acc)

        def rows(r: int, r1: int) -> memoryview:
            base = torch.empty((r1 - r) * row_bytes, dtype=torch.uint8)
            self._base.read_into(name, r * row_bytes, memoryview(base.numpy()))
            # B @ A as r rank-one updates, not a matmul: each element then sums in the same order whatever rows a
            # block holds (a BLAS matmul's blocking depends on the row count), so chunking does not change a bit.
            bb = b[r:r1].to(acc)
            delta = torch.zeros(r1 - r, cols, dtype=acc)
            for k in range(a.shape[0]):
                delta.addcmul_(bb[:, k:k + 1], a[k:k + 1])
            # Summed in float32 and rounded once to the stored dtype (PEFT rounds the delta first; module docstring).
            merged = base.view(info.dtype).reshape(r1 - r, cols).to(acc).add_(delta).to(info.dtype)
            return memoryview(merged.reshape(-1).view(torch.uint8).numpy())

        # Rows in small blocks: the temporaries stay a few hundred kB whatever the engine's chunk size.
        read_row_blocks(out, byte_offset, row_bytes, max(1, _BLOCK_ELEMS // cols), rows)

    def fingerprint(self) -> dict[str, object]:
        return {**self._base.fingerprint(), "format": "lora", "base_format": self._base.fingerprint().get("format"),
                "adapter": describe(self.adapter_path) or str(self.adapter_path),
                "adapter_weights": self._adapter.fingerprint()}

    @property
    def files(self) -> list[Path]:
        return [*self._base.files, self.adapter_path / ADAPTER_CONFIG, *self._adapter.files]

    def close(self) -> None:
        for src in (getattr(self, "_adapter", None), getattr(self, "_base", None)):
            if src is not None:
                src.close()
        self._cached = None

    def __repr__(self) -> str:
        return f"LoraSource({str(self.path)!r} + {str(self.adapter_path)!r}, {len(self._targets)} adapted tensors)"

