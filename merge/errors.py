"""One exception family for papa-merge.

Every error the library raises on bad input is a :class:`MergeError`. Each subclass also subclasses
the standard exception a caller would expect (a missing checkpoint is also a ``FileNotFoundError``),
so ``except FileNotFoundError`` keeps working. Messages are one line-led paragraph that names the
problem and the fix; the CLI prints them without a traceback (set ``PAPA_MERGE_DEBUG=1`` to see it).

Every warning the library issues is a :class:`MergeWarning` (a ``UserWarning``), so one filter
(``warnings.simplefilter("error", MergeWarning)``) or one CLI rule (a one-line ``warning: ...``) covers them all.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "MergeError",
    "PapaMergeError",
    "python_fix",
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
    "NonFiniteWarning",
    "DifferentStartsWarning",
    "WeakPullWarning",
    "DefaultSplitWarning",
    "PartialBufferWarning",
    "WeakMemberWarning",
]


def python_fix(option: str, choices: tuple) -> str:
    """``pass on_mismatch='skip' or 'first'``: the fix spelled as Python keyword arguments."""
    if not choices:
        return f"pass {option}=..."
    return "pass " + " or ".join(f"{option}={c!r}" if i == 0 else repr(c) for i, c in enumerate(choices))


class MergeError(Exception):
    """Base class of every error papa-merge raises on bad input or environment.

    Besides the message, an error carries what it is about, so callers (and the CLI) need not parse text:

    Attributes:
        message: what went wrong and the fix, in words that name no command-line flag.
        path: the file or folder concerned, if any.
        tensor: the tensor name concerned, if any.
        member: the index of the member concerned, if any.
        option: the keyword argument that resolves it (``on_mismatch``, ``force``, ``device``, ...),
            spelled as a Python argument in ``str(error)`` and as a flag by the CLI.
        choices: values of ``option`` to suggest (empty: the option alone, e.g. a boolean flag).
    """

    exit_code: int = 1

    def __init__(self, message: str = "", *, path: object = None, tensor: str | None = None,
                 member: int | None = None, option: str | None = None, choices: tuple | list = ()):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor, self.member = tensor, member
        self.option, self.choices = option, tuple(choices)

    def format(self, spell: Callable[[str, tuple], str] = python_fix) -> str:
        """The message, then the option that fixes it as ``spell(option, choices)`` spells it (if it spells one)."""
        fix = spell(self.option, self.choices) if self.option else ""
        return f"{self.message} ({fix})" if fix else self.message

    def __str__(self) -> str:
        return self.format()


PapaMergeError = MergeError  # the name users of other tools look for


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

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...], **fields: object):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}", **fields)


class InvalidArgumentError(MergeError, ValueError):
    """An option has a value outside its domain (weights that do not match members, ...)."""

    exit_code = 2


class MissingMetadataError(MergeError, KeyError):
    """A checkpoint lacks the metadata an operation needs (e.g. greedy soup needs the architecture)."""
    # MergeError.__str__ comes first in the MRO, so the message is not quoted as KeyError's would be.


class HubError(MergeError, OSError):
    """The Hugging Face Hub (or a compatible server) refused or failed a request."""


class MergeWarning(UserWarning):
    """Base class of every warning papa-merge issues: the work went on, but its result may not be what was wanted."""


class NonFiniteWarning(MergeWarning):
    """A member holds NaN or infinite values in a tensor that was merged."""


class DifferentStartsWarning(MergeWarning):
    """A soup's members come from different starts: their average is likely much worse than each member."""


class WeakPullWarning(MergeWarning):
    """A PAPA run from scratch whose pulls were too weak, over its length, to keep the members averageable."""


class DefaultSplitWarning(MergeWarning):
    """Checkpoints that record no data split were evaluated on papa-merge's default split of the dataset.

    Their val and test rows may include rows the checkpoints were trained on elsewhere.
    """


class PartialBufferWarning(MergeWarning):
    """A non-float tensor (a buffer such as ``position_ids``) is missing from some members: it is copied, not merged,
    so it was taken from a member that holds it."""


class WeakMemberWarning(MergeWarning):
    """A member scores far below the others of its run; the ensemble and the soups average it all the same."""
