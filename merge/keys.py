"""The names papa-merge writes into checkpoints, and the tool's version: one place for each.

Every checkpoint papa-merge writes carries JSON entries in its safetensors ``__metadata__``:

- ``papa_merge.model``: the architecture spec that rebuilds the network (:func:`merge.models.model_spec`);
- ``papa_merge.data``: the dataset and split that reload the same train/val/test rows;
- ``papa_merge.train``: how a member was trained (recipe, method, seeds, steps);
- ``papa_merge.metrics``: val/test accuracy, NLL and ECE measured when it was written;
- ``papa_merge.recipe``: how a merge was made (method, members, weights, dtypes, tool version).

A merge keeps member 0's model and data entries (a soup is rebuilt and evaluated like a member) and
drops the entries that describe one member alone.
"""

from __future__ import annotations

from importlib import metadata as _metadata

__all__ = ["MODEL_KEY", "DATA_KEY", "TRAIN_KEY", "METRICS_KEY", "RECIPE_KEY", "MEMBER_ONLY_KEYS", "PREFIX",
           "version"]

PREFIX = "papa_merge."
MODEL_KEY = "papa_merge.model"
DATA_KEY = "papa_merge.data"
TRAIN_KEY = "papa_merge.train"
METRICS_KEY = "papa_merge.metrics"
RECIPE_KEY = "papa_merge.recipe"
# Entries that describe one member alone and are not carried into a merge of it.
MEMBER_ONLY_KEYS = frozenset({"format", RECIPE_KEY, TRAIN_KEY, METRICS_KEY})

_FALLBACK_VERSION = "0.1.0"  # a source tree that was never installed


def version() -> str:
    """The installed papa-merge version (from the package metadata, as pyproject.toml sets it)."""
    try:
        return _metadata.version("papa-merge")
    except _metadata.PackageNotFoundError:
        return _FALLBACK_VERSION
