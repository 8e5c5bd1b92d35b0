"""One exception family for papa-merge.

Every error the library raises on bad input is a :class:`MergeError`. Each subclass also subclasses
the standard exception a caller would expect (a missing checkpoint is also a ``FileNotFoundError``),
so ``except FileNotFoundError`` keeps working. Messages are one line-led paragraph that names the
problem and the fix; the CLI prints them without a traceback (set ``PAPA_MERGE_DEBUG=1`` to see it).
"""

from __future__ import annotations

__all__ = [
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


class MergeError(Exception):
    """Base class of every error papa-merge raises on bad input or environment."""

    exit_code: int = 1


class CheckpointNotFoundError(MergeError, FileNotFoundError):
    """A checkpoint path (or Hub reference) does not exist."""


class CheckpointFormatError(MergeError, ValueError):
    """A file exists but is not a readable checkpoint (truncated, garbage, unsafe pickle, ...)."""


class MismatchError(MergeError, ValueError):
    """Members disagree on tensor names, shapes or dtypes."""


class OutputExistsError(MergeError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class SameInputOutputError(MergeError, ValueError):
    """The output path is one of the inputs (or inside an input folder)."""


class DeviceUnavailableError(MergeError, RuntimeError):
    """A device was asked for that this machine does not have."""


class UnknownNameError(MergeError, ValueError):
    """A registry lookup (operator, model, dataset, ...) got a name it does not know."""

    exit_code = 2

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")


class InvalidArgumentError(MergeError, ValueError):
    """An option has a value outside its domain (weights that do not match members, ...)."""

    exit_code = 2


class MissingMetadataError(MergeError, KeyError):
    """A checkpoint lacks the metadata an operation needs (e.g. greedy soup needs the architecture)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class HubError(MergeError, OSError):
    """The Hugging Face Hub (or a compatible server) refused or failed a request."""
