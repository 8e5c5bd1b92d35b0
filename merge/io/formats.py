"""File names and suffixes of checkpoints: the one place that spells them (pure constants, no torch).

Readers (``open_checkpoint``), writers (``plan_output``, the torch-file sink), the folder carrier, the
model card and the Hub all ask this module which files hold weights and what outputs are called, so a
new format is one edit here.

Example:
    >>> shard_name(2, 3)
    'model-00002-of-00003.safetensors'
    >>> SHARD_RE.fullmatch(shard_name(2, 3)).group("stem")
    'model'
"""

from __future__ import annotations

import re

__all__ = ["WEIGHT_SUFFIXES", "PICKLE_SUFFIXES", "TORCH_SUFFIXES", "SAFETENSORS_SUFFIX", "INDEX_SUFFIX",
           "SINGLE_FILE", "INDEX_FILE", "PICKLE_FILE", "PICKLE_INDEX_FILE", "FOLDER_CANDIDATES", "CARD_FILE",
           "SHARD_RE", "shard_name"]

SAFETENSORS_SUFFIX = ".safetensors"
# Pickled state dicts papa-merge reads (with weights-only loading).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Every file that holds weights: a folder's weight files, a repo's checkpoint files.
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
# Torch state-dict files papa-merge writes (as timm's avg_checkpoints.py does).
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# A shard index is named after the files it joins: model.safetensors.index.json, pytorch_model.bin.index.json.
INDEX_SUFFIX = ".index.json"

# The names the ecosystem loads a model folder's weights by (transformers, timm, huggingface_hub).
SINGLE_FILE = "model.safetensors"
INDEX_FILE = SINGLE_FILE + INDEX_SUFFIX
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = PICKLE_FILE + INDEX_SUFFIX
# Where a model folder keeps its weights, in order of preference.
FOLDER_CANDIDATES = (INDEX_FILE, SINGLE_FILE, PICKLE_INDEX_FILE, PICKLE_FILE)
# The model card, at the top of a folder or repo.
CARD_FILE = "README.md"

# transformers' shard names: model-00001-of-00003.safetensors.
SHARD_RE = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})(?P<suffix>\.[a-z]+)")


def shard_name(index: int, total: int, *, stem: str = "model", suffix: str = SAFETENSORS_SUFFIX) -> str:
    """The file name of shard ``index`` (from 1) of ``total``, as transformers names them."""
    return f"{stem}-{index:05d}-of-{total:05d}{suffix}"
