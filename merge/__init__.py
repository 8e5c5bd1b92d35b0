"""papa-merge: merge neural-network checkpoints, exactly, in constant memory.

The public verbs::

    import merge
    merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")    # stream from disk
    merge.uniform_soup(paths, out="soup/")                                     # HF model folder
    merge.average([sd_a, sd_b], weights=[0.7, 0.3])                            # in memory
    merge.open_checkpoint("model.safetensors").infos                           # lazy inspection
    merge.greedy_soup_checkpoints(paths, out="greedy.safetensors", recompute_bn=20)  # model soups' greedy
    merge.check_starts(paths).shared                                           # members of one start?
    merge.select_checkpoints(paths, size=3, out="selection.json")              # hyper-ensemble selection
    merge.midpoint([a, b], out="mid.safetensors", data="mnist")                # a subspace line's midpoint
    merge.collapse_checkpoint("late.safetensors", out="one.safetensors")       # late-phase weights -> one
    merge.run_recipe("recipe.yml", out="merged/")                             # a mergekit recipe
    merge.window_soup(glob("run/checkpoint-*"), out="w/", schedule="ema:0.9", window=5)  # a run's last checkpoints
    merge.check_members(["hf://org/a", "hf://org/b"], method="ties", base="hf://org/base")  # before downloading

Training (``merge.train``), data (``merge.data``), models (``merge.models``) and the Hub
(``merge.hub``) are submodules.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from merge.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    DeviceUnavailableError,
    HubError,
    InvalidArgumentError,
    MergeError,
    MergeWarning,
    MismatchError,
    MissingMetadataError,
    OutputExistsError,
    PartialBufferWarning,
    SameInputOutputError,
    UnknownNameError,
    WeakMemberWarning,
)
from merge.io import schemes as _schemes

# The public verbs, by the module that defines them. They are imported on first use (PEP 562), so
# ``import merge`` and the commands that only describe checkpoints (``papa-merge --help``, ``inspect``)
# answer without importing torch (about 1.6 s). Add an export here and to ``__all__``.
_EXPORTS: dict[str, str] = {
    "hub": "merge.hub",
    "recompute_bn": "merge.bn",
    "evaluate_checkpoints": "merge.evaluate",
    "metrics": "merge.evaluate",
    "greedy_ensemble_selection": "merge.greedy",
    "greedy_soup": "merge.greedy",
    "greedy_soup_checkpoints": "merge.greedy",
    "inspect_checkpoint": "merge.inspect",
    "version": "merge.keys",
    "open_checkpoint": "merge.io.sources",
    "read_safetensors_metadata": "merge.io.sources",
    "write_state_dict": "merge.io.writer",
    "get_operator": "merge.ops",
    "list_operators": "merge.ops",
    "MergeResult": "merge.soups",
    "average": "merge.soups",
    "plan_soup": "merge.soups",
    "soup": "merge.soups",
    "uniform_soup": "merge.soups",
    "output_kind": "merge.soups",
    "run_recipe": "merge.mergekit_recipe",
    "load_recipe": "merge.mergekit_recipe",
    "NonFiniteWarning": "merge.engine",
    "NonFiniteError": "merge.engine",
    "check_starts": "merge.lineage",
    "DifferentStartsWarning": "merge.lineage",
    "select_checkpoints": "merge.greedy",
    "collapse_checkpoint": "merge.collapse",
    "midpoint": "merge.interpolate",
    "window_soup": "merge.windows",
    "check_members": "merge.check",
}


def __getattr__(name: str) -> object:
    if name == "__version__":
        from merge.keys import version

        value: object = version()
    elif name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if module.__name__ == f"merge.{name}" else getattr(module, name)
    elif not name.startswith("_") and importlib.util.find_spec(f"merge.{name}") is not None:
        value = importlib.import_module(f"merge.{name}")  # merge.train, merge.data, ... as attributes
    else:
        raise AttributeError(f"module 'merge' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# hf:// references resolve through merge.hub, which registers its own resolver when imported. Until it is,
# these stand-ins import it on first use, so ``import merge`` stays light and hf:// works anyway.
def _resolve_hf(reference: str) -> Path:
    from merge.hub import resolve_reference

    return resolve_reference(reference)


def _describe_hf(path: str) -> str | None:
    if "models--" not in str(path):  # only a file inside huggingface_hub's cache came from the Hub
        return None
    from merge.hub import hub_source_of

    return hub_source_of(path)


if "hf" not in _schemes.registered_schemes():
    _schemes.register_scheme("hf", _resolve_hf, describe=_describe_hf)

__all__ = [
    "__version__",
    "hub",
    "soup",
    "uniform_soup",
    "average",
    "plan_soup",
    "MergeResult",
    "output_kind",
    "run_recipe",
    "load_recipe",
    "NonFiniteWarning",
    "NonFiniteError",
    "open_checkpoint",
    "read_safetensors_metadata",
    "write_state_dict",
    "inspect_checkpoint",
    "greedy_soup",
    "greedy_soup_checkpoints",
    "greedy_ensemble_selection",
    "recompute_bn",
    "evaluate_checkpoints",
    "metrics",
    "get_operator",
    "list_operators",
    "MergeError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "MismatchError",
    "OutputExistsError",
    "SameInputOutputError",
    "DeviceUnavailableError",
    "UnknownNameError",
    "InvalidArgumentError",
    "MissingMetadataError",
    "HubError",
    "MergeWarning",
    "PartialBufferWarning",
    "WeakMemberWarning",
    "check_starts",
    "DifferentStartsWarning",
    "select_checkpoints",
    "collapse_checkpoint",
    "midpoint",
    "window_soup",
    "check_members",
]
