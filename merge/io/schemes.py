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
from urllib.parse import unquote

from merge.errors import CheckpointNotFoundError, InvalidArgumentError

__all__ = ["Scheme", "register_scheme", "split_scheme", "resolve", "describe", "public_name", "registered_schemes",
           "HF_PREFIX", "HubReference", "parse_hub_reference", "is_repo_id"]

_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
HF_PREFIX = "hf://"
# A Hub repo id: ``name`` or ``org/name``, each part a letter or digit then up to 95 of [A-Za-z0-9_.-].
_REPO_PART = r"[A-Za-z0-9][\w.-]{0,95}"
_REPO_RE = re.compile(rf"^{_REPO_PART}(/{_REPO_PART})?$")


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


def public_name(path: str | os.PathLike, *, start: str | os.PathLike | None = None) -> str:
    """How a local checkpoint is named where others read it (a model card, a published recipe): never an absolute path.

    The reference it was fetched from (``hf://org/name@sha[/file]`` for a file in huggingface_hub's cache);
    else a relative path as given; else the path relative to ``start`` (default: the working folder) when
    inside it; else its bare name. No home or cache folder shows.

    Example:
        >>> public_name("runs/a.safetensors"), public_name("/data/u/runs/b.safetensors", start="/data/u")
        ('runs/a.safetensors', 'runs/b.safetensors')
        >>> public_name("/home/u/soup/")
        'soup'
    """
    text = os.fspath(path)
    ref = describe(text)
    if ref:
        return ref
    p = Path(text)
    if not (p.is_absolute() or text.startswith(("~", "\\"))):
        return p.as_posix()
    try:
        rel = Path(os.path.abspath(os.path.expanduser(text))).relative_to(os.path.abspath(start or os.getcwd()))
    except ValueError:
        rel = None
    return rel.as_posix() if rel is not None and rel.parts else (p.name or text.rstrip("/\\").rsplit("/", 1)[-1])


def public_record(value: object, *, start: str | os.PathLike | None = None) -> object:
    """A record (a recipe, a training record) as others may read it: every absolute path by its :func:`public_name`.

    Example:
        >>> public_record({"members": [{"path": "/home/u/runs/a.safetensors", "size": 3}], "note": "a/b"},
        ...               start="/home/u")
        {'members': [{'path': 'runs/a.safetensors', 'size': 3}], 'note': 'a/b'}
    """
    if isinstance(value, dict):
        return {k: public_record(v, start=start) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_record(v, start=start) for v in value]
    if isinstance(value, str) and len(value) < 4096 and "\n" not in value and os.path.isabs(value):
        return public_name(value, start=start)
    return value


# --- Hub references: pure parsing (the network code that fetches them is merge.hub's) ------------------
def is_repo_id(text: object, *, org_required: bool = False) -> bool:
    """Whether ``text`` is a Hub repo id (``org/name``, or ``name`` unless ``org_required``).

    Example:
        >>> is_repo_id("org/name"), is_repo_id("name"), is_repo_id("name", org_required=True), is_repo_id("a--b")
        (True, True, False, False)
    """
    if not isinstance(text, str):
        return False
    if org_required and "/" not in text:
        return False
    return (bool(_REPO_RE.match(text)) and "--" not in text and ".." not in text
            and not text.endswith((".git", ".")))


@dataclass(frozen=True)
class HubReference:
    """A parsed ``hf://org/name[@revision][/path]``."""

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        text = HF_PREFIX + self.repo_id
        if self.revision:
            text += "@" + self.revision
        if self.path:
            text += "/" + self.path
        return text


def parse_hub_reference(text: str, *, allow_path: bool = True) -> HubReference:
    """Split ``[hf://]org/name[@revision][/path]`` (revisions ``refs/pr/N`` and ``%2F``-quoted ones allowed).

    Raises:
        InvalidArgumentError: not a repo id, an empty revision, or a path where ``allow_path`` is False.

    Example:
        >>> parse_hub_reference("hf://org/name@v2/w.safetensors")
        HubReference(repo_id='org/name', revision='v2', path='w.safetensors')
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"not a Hub reference: {text!r}; write org/name[@revision] or "
                                   "hf://org/name[@revision]")
    body = text.strip()
    if body.startswith(HF_PREFIX):
        body = body[len(HF_PREFIX):]
    body = body.strip("/")
    revision: str | None = None
    path: str | None = None
    if "@" in body:
        repo_id, _, after = body.partition("@")
        parts = after.split("/")
        n = 3 if after.startswith(("refs/pr/", "refs/convert/")) else 1
        revision, path = unquote("/".join(parts[:n])), "/".join(parts[n:]) or None
        if not revision:
            raise InvalidArgumentError(f"{text!r}: empty revision after '@'; write org/name@branch, tag or commit")
    else:
        parts = body.split("/")
        repo_id, path = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if not is_repo_id(repo_id):
        raise InvalidArgumentError(f"not a Hub reference: {text!r}; write org/name[@revision] or "
                                   "hf://org/name[@revision] (letters, digits, '-', '_', '.')")
    if path is not None and not allow_path:
        raise InvalidArgumentError(f"{text!r}: expected a repo (org/name[@revision]), not a file inside one")
    return HubReference(repo_id, revision, path)
