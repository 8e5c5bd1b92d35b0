"""Model folders: the files beside the weights (config, tokenizer) that make a merged folder loadable."""

from __future__ import annotations

import shutil
from pathlib import Path

from merge.io.sources import WEIGHT_SUFFIXES
from merge.io.writer import INDEX_FILE, AtomicOutput

__all__ = ["carry_folder_files", "NOT_CARRIED"]

# Files of a model folder that are weights (not carried over) or are regenerated.
NOT_CARRIED = {"README.md", ".gitattributes", INDEX_FILE, "pytorch_model.bin.index.json"}


def carry_folder_files(folder: Path, atomic: AtomicOutput) -> list[Path]:
    """Copy a model folder's config and tokenizer files so the soup loads with from_pretrained."""
    if not folder.is_dir():
        return []
    copied = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name in NOT_CARRIED or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            continue
        dst = atomic.file(f.name)
        shutil.copyfile(f, dst)
        copied.append(dst)
    return copied
