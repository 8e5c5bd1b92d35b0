"""Reference schemes: how ``open_checkpoint`` turns ``scheme://...`` into a local path.

The io layer knows no network. An upper layer that can fetch checkpoints registers itself here when it
is imported (``merge.hub`` registers ``hf``), as fsspec and timm register protocols: io keeps the table
and the pure parsing, the registrant keeps the network code.

Example:
    >>> register_scheme("demo", lambda ref: Path("/tmp") / ref.split("://", 1)[1])  # doctest: +SKIP
    >>> resolve("demo://m.safetensors")                                             # doctest: +SKIP
    PosixPath('/tmp/m.safetensors')
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merge.errors import CheckpointNotFoundError

__all__ = ["Scheme", "register_scheme", "split_scheme", "resolve", "describe", "registered_schemes"]

_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


@dataclass(frozen=True)
class Scheme:
    """A registered reference scheme.

    Attributes:
        name: the part before ``://``.
        resolve: ``resolve(reference) -> local path`` (downloads when it must).
        describe: ``describe(local path) -> reference or None``: where a local file came from (a file
            inside a download cache), so recipes can record the source of a member.
    """

    name: str
    resolve: Callable[[str], Path]
    describe: Callable[[str], str | None] | None = None


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, resolve: Callable[[str], Path], *,
                    describe: Callable[[str], str | None] | None = None) -> None:
    """Register (or replace) the resolver of ``name://`` references."""
    _SCHEMES[name.lower()] = Scheme(name.lower(), resolve, describe)


def registered_schemes() -> list[str]:
    return sorted(_SCHEMES)


def split_scheme(reference: str | os.PathLike) -> tuple[str | None, str]:
    """``("hf", "org/name")`` for ``"hf://org/name"``; ``(None, path)`` for a plain path."""
    text = os.fspath(reference)
    m = _SCHEME_RE.match(text) if isinstance(text, str) else None
    if m is None:
        return None, text
    return m.group(1).lower(), text[m.end():]


def resolve(reference: str | os.PathLike) -> Path:
    """The local path of ``reference``: itself for a plain path, the registered resolver's answer otherwise.

    Raises:
        CheckpointNotFoundError: a ``scheme://`` nobody registered (the message lists those that are).
    """
    scheme, _ = split_scheme(reference)
    if scheme is None:
        return Path(reference)
    entry = _SCHEMES.get(scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in registered_schemes()) or "none"
        raise CheckpointNotFoundError(f"{reference}: no reader for {scheme}:// references (known: {known}); "
                                      "pass a local path", path=str(reference))
    return Path(entry.resolve(os.fspath(reference)))


def describe(path: str | os.PathLike) -> str | None:
    """The reference a local path was fetched from (e.g. ``hf://org/name@sha/file``), or None."""
    for entry in _SCHEMES.values():
        if entry.describe is not None:
            ref = entry.describe(os.fspath(path))
            if ref:
                return ref
    return None
