"""Model folders: the files beside the weights (config, tokenizer) that make a merged folder loadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from merge.io.dtypes import dtype_name
from merge.io.formats import CARD_FILE, INDEX_FILE, INDEX_SUFFIX, PICKLE_INDEX_FILE, WEIGHT_SUFFIXES
from merge.io.writer import AtomicOutput

__all__ = ["carry_folder_files", "set_config_dtype", "NOT_CARRIED", "CONFIG_DTYPE_KEYS"]

# Files of a model folder that are weights (not carried over) or are regenerated (README.md: the soup's own card).
NOT_CARRIED = {CARD_FILE, ".gitattributes", INDEX_FILE, PICKLE_INDEX_FILE}
# Where a transformers config.json says the weights' dtype: "dtype" since transformers 4.56 (5.x reads it
# first), "torch_dtype" before (5.x falls back to it only when "dtype" is absent).
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


def set_config_dtype(config: dict, dtype: torch.dtype) -> dict:
    """A transformers config with its dtype set to ``dtype``, so ``from_pretrained(dtype="auto")`` loads it so.

    ``dtype`` is always written (the key the installed transformers 5.x reads); an older ``torch_dtype``
    entry is updated too rather than left contradicting it. Configs of other libraries (timm's has no
    ``model_type``) are returned unchanged.

    Example:
        >>> set_config_dtype({"model_type": "bert", "torch_dtype": "float32"}, torch.bfloat16)
        {'model_type': 'bert', 'torch_dtype': 'bfloat16', 'dtype': 'bfloat16'}
    """
    if "model_type" not in config:
        return config
    out = dict(config)
    name = dtype_name(dtype)
    for key in CONFIG_DTYPE_KEYS[1:]:
        if key in out:
            out[key] = name
    out[CONFIG_DTYPE_KEYS[0]] = name
    return out


def carry_folder_files(folder: Path, atomic: AtomicOutput, *, dtype: torch.dtype | None = None) -> list[Path]:
    """Copy a model folder's config and tokenizer files so the soup loads with from_pretrained.

    Args:
        folder: the member's folder (nothing is carried from a single file).
        atomic: the output being written.
        dtype: the output's floating dtype; written into a transformers ``config.json``
            (:func:`set_config_dtype`) so a bfloat16 soup loads as bfloat16 with ``dtype="auto"``.

    Returns:
        The files written into the output.
    """
    if not folder.is_dir():
        return []
    copied = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name in NOT_CARRIED or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(INDEX_SUFFIX):
            continue
        dst = atomic.file(f.name)
        if f.name == "config.json" and dtype is not None:
            try:
                config = json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                config = None  # not ours to judge: copied as is
            if isinstance(config, dict) and "model_type" in config:
                dst.write_text(json.dumps(set_config_dtype(config, dtype), indent=2) + "\n")
                copied.append(dst)
                continue
        shutil.copyfile(f, dst)
        copied.append(dst)
    return copied
