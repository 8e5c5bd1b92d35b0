"""Bytes <-> tensors: lazy checkpoint sources and the streaming, atomic safetensors writer.

The names below are imported on first use (PEP 562), so ``merge.io.header`` and ``merge.io.schemes``
(which need no torch) load without importing torch.
"""

from __future__ import annotations

import importlib

__all__ = ["Source", "TensorInfo", "open_checkpoint", "read_safetensors_metadata", "AtomicOutput",
           "plan_output", "write_state_dict"]

_HOME = {"Source": "merge.io.sources", "TensorInfo": "merge.io.sources", "open_checkpoint": "merge.io.sources",
         "read_safetensors_metadata": "merge.io.sources", "AtomicOutput": "merge.io.writer",
         "plan_output": "merge.io.writer", "write_state_dict": "merge.io.writer"}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'merge.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
