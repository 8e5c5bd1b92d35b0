"""Model folders: the files beside the weights (config, tokenizer) that make a merged folder loadable."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path, PurePosixPath


from merge.errors import MergeWarning
from merge.io.dtypes import dtype_name
from merge.io.formats import CARD_FILE, INDEX_FILE, INDEX_SUFFIX, PICKLE_INDEX_FILE, WEIGHT_SUFFIXES
from merge.io.writer import AtomicOutput
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["carry_folder_files", "set_config_dtype", "module_folders", "NOT_CARRIED", "CONFIG_DTYPE_KEYS"]

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

    A sentence-transformers folder also gets the module subfolders its ``modules.json`` names (``1_Pooling/``,
    ``2_Normalize/``, ...), without which ``SentenceTransformer(out)`` cannot build the model. Other subfolders
    (``onnx/``, ``openvino/`` exports of the original weights) are not carried: they would not hold the soup.
    A module's own weights (``2_Dense/model.safetensors``) are copied from ``folder`` with a warning, since only
    the main checkpoint is merged.

    Returns:
        The files written into the output.
    """
    if not folder.is_dir():
        return []
    copied = _carry_modules(folder, atomic)
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


def module_folders(folder: Path) -> list[str]:
    """The subfolders a sentence-transformers ``modules.json`` loads modules from (none for other folders).

    Only relative paths inside ``folder`` count; the main module (path ``""``) is the folder itself.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "modules.json").write_text('[{"path": ""}, {"path": "1_Pooling"}, {"path": "../x"}]')
        >>> module_folders(d)
        ['1_Pooling']
    """
    try:
        entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    found = []
    for entry in entries if isinstance(entries, list) else ():
        sub = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(sub, str) or not sub.strip("/"):
            continue
        parts = PurePosixPath(sub).parts
        if sub.startswith("/") or ".." in parts or any(p.startswith(".") for p in parts):
            continue
        found.append(PurePosixPath(*parts).as_posix())
    return found


def _carry_modules(folder: Path, atomic: AtomicOutput) -> list[Path]:
    """Copy the sentence-transformers module subfolders of ``folder`` into the output, file by file."""
    copied: list[Path] = []
    for sub in module_folders(folder):
        src = folder / sub
        atomic.file(sub).mkdir(parents=True, exist_ok=True)  # even a module with no files (2_Normalize)
        if not src.is_dir():
            continue  # on the Hub, where empty folders cannot exist
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(folder).as_posix()
            if f.is_dir():
                atomic.file(rel).mkdir(parents=True, exist_ok=True)
                continue
            if f.suffix in WEIGHT_SUFFIXES:
                warnings.warn(f"{rel}: a sentence-transformers module's own weights, outside the merged checkpoint; "
                              f"copied unmerged from {folder}", MergeWarning, stacklevel=3)
            dst = atomic.file(rel)
            shutil.copyfile(f, dst)
            copied.append(dst)
    return copied
