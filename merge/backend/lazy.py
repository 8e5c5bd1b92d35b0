"""``torch`` for the operator modules, imported on first use.

Listing the operators (``papa-merge soup --list-methods``) reads only their registrations; importing
torch for that costs about 1.6 s. Each operator module binds ``torch = lazy_torch(__name__)``: the first
attribute it reads imports torch and rebinds the module's ``torch`` to the real module, so every later
use is a plain global lookup. Annotations are strings (``from __future__ import annotations``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["lazy_torch"]


class _LazyTorch:
    __slots__ = ("_owner",)

    def __init__(self, owner: str):
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        torch = importlib.import_module("torch")
        owner = sys.modules.get(self._owner)
        if owner is not None and getattr(owner, "torch", None) is self:
            owner.torch = torch
        return getattr(torch, name)

    def __repr__(self) -> str:
        return f"<torch, imported on first use by {self._owner}>"


def lazy_torch(owner: str) -> Any:
    """``torch`` if it is already imported, else a stand-in that imports it on first use by ``owner``."""
    return sys.modules.get("torch") or _LazyTorch(owner)
