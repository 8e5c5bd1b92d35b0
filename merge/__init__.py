"""papa-merge: merge neural-network checkpoints, exactly, in constant memory.

The public verbs::

    import merge
    merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")    # stream from disk
    merge.uniform_soup(paths, out="soup/")                                     # HF model folder
    merge.average([sd_a, sd_b], weights=[0.7, 0.3])                            # in memory
    merge.open_checkpoint("model.safetensors").infos                           # lazy inspection
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
from merge.inspect import inspect_checkpoint
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.io.writer import write_state_dict
from merge.ops import get_operator, list_operators
from merge.soups import MergeResult, average, plan_soup, soup, uniform_soup

__version__ = "0.1.0"

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
