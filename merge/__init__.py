"""papa-merge: merge neural-network checkpoints, exactly, in constant memory.

The public verbs::

    import merge
    merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")    # stream from disk
    merge.uniform_soup(paths, out="soup/")                                     # HF model folder
    merge.average([sd_a, sd_b], weights=[0.7, 0.3])                            # in memory
    merge.open_checkpoint("model.safetensors").infos                           # lazy inspection
    merge.greedy_soup_checkpoints(paths, out="greedy.safetensors", recompute_bn=20)  # model soups' greedy

Training (``merge.train``), data (``merge.data``), models (``merge.models``) and the Hub
(``merge.hub``) are submodules.
"""

from merge import hub
from merge.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    DeviceUnavailableError,
    HubError,
    InvalidArgumentError,
    MergeError,
    MismatchError,
    MissingMetadataError,
    OutputExistsError,
    SameInputOutputError,
    UnknownNameError,
)
from merge.bn import recompute_bn
from merge.evaluate import evaluate_checkpoints, metrics
from merge.greedy import greedy_ensemble_selection, greedy_soup, greedy_soup_checkpoints
from merge.inspect import inspect_checkpoint
from merge.keys import version
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.io.writer import write_state_dict
from merge.ops import get_operator, list_operators
from merge.soups import MergeResult, average, plan_soup, soup, uniform_soup

__version__ = version()

__all__ = [
    "__version__",
    "hub",
    "soup",
    "uniform_soup",
    "average",
    "plan_soup",
    "MergeResult",
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
]
