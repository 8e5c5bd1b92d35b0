"""Shard indexes (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``): their rules, without torch.

An index maps each tensor name to the shard file holding it. papa-merge reads one only if it says
exactly where every tensor is: its map is an object of file names, each a weight file of the
index's kind named beside it, and every tensor of every shard is listed for that shard. A tensor a
shard holds but the index does not list would otherwise vanish from the merge unnoticed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from merge.errors import CheckpointFormatError, CheckpointNotFoundError
from merge.io.formats import INDEX_SUFFIX, WEIGHT_SUFFIXES

__all__ = ["read_weight_map", "check_shards_match"]

_FIX = "the index and its shards disagree: re-download or re-save the checkpoint"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def read_weight_map(index_path: Path) -> dict[str, str]:
    """An index's tensor name -> shard file map, each shard a weight file of the index's kind beside it.

    Raises:
        CheckpointNotFoundError: no index file.
        CheckpointFormatError: not JSON, no ``weight_map`` object, an empty map, a value that is no file
            name, a shard name leading outside the folder (``..``, absolute), or a shard of another kind
            (``model.safetensors.index.json`` joins ``.safetensors`` files; an index never names an index).
    """
    def bad(message: str, tensor: str | None = None) -> CheckpointFormatError:
        return CheckpointFormatError(f"{index_path}: {message}", path=index_path, tensor=tensor)

    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{index_path}: no such file", path=index_path) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"not a shard index: corrupt JSON ({_first_line(e)})") from None
    if not isinstance(index, dict):
        raise bad(f"not a shard index: it is a JSON {_json_kind(index)}, not an object with a 'weight_map'")
    if "weight_map" not in index:
        raise bad("not a shard index: it has no 'weight_map'")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise bad(f"'weight_map' is a JSON {_json_kind(weight_map)}, not an object of tensor name -> shard file")
    if not weight_map:
        raise bad("'weight_map' lists no tensors")
    # model.safetensors.index.json joins .safetensors shards, pytorch_model.bin.index.json .bin shards.
    kind = Path(index_path.name.removesuffix(INDEX_SUFFIX)).suffix
    kinds = (kind,) if kind in WEIGHT_SUFFIXES else WEIGHT_SUFFIXES
    checked: set[str] = set()
    for name, shard in weight_map.items():
        if type(shard) is not str or not shard:
            raise bad(f"'weight_map' entry {name!r} is {shard!r}, not a shard file name", name)
        if shard in checked:
            continue
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts:
            raise bad(f"shard name {shard!r} leads outside the folder; an index names its shards by file name, "
                      "beside it", name)
        if not shard.endswith(kinds):
            raise bad(f"shard {shard!r} is not a {' or '.join(kinds)} file; an index joins weight files", name)
        checked.add(shard)
    return weight_map


def _json_kind(x: object) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(x), type(x).__name__)


def check_shards_match(index_path: Path, wanted: Mapping[str, str], shard_tensors: Mapping[str, list[str]]) -> None:
    """Every tensor of every shard is listed for that shard, and every listed tensor is in its shard.

    Args:
        index_path: the index (named in errors).
        wanted: tensor name -> shard file, as the index says (names normalised as the shards' are).
        shard_tensors: shard file -> the tensor names it holds.

    Raises:
        CheckpointFormatError: the first disagreement, naming the shard and the tensor.
    """
    for shard, names in shard_tensors.items():
        for name in names:
            listed = wanted.get(name)
            if listed != shard:
                where = "which the index does not list" if listed is None else f"which the index lists in {listed!r}"
                raise CheckpointFormatError(f"{index_path}: shard {shard!r} holds tensor {name!r}, {where}; {_FIX}",
                                            path=index_path, tensor=name)
    held = {n for names in shard_tensors.values() for n in names}
    missing = [k for k in wanted if k not in held]
    if missing:
        raise CheckpointFormatError(f"{index_path}: {len(missing)} tensors listed in the index are not in their shard, "
                                    f"e.g. {missing[:3]}; {_FIX}", path=index_path, tensor=missing[0])
