"""Recipe files in mergekit's YAML schema: ``papa-merge run recipe.yml -o out/``.

A mergekit user's config runs unchanged, for the methods papa-merge implements::

    merge_method: ties
    base_model: meta-llama/Llama-3.1-8B
    models:
      - model: org/math-ft
        parameters: {weight: 0.5, density: [0.3, 0.7]}       # a gradient over the layers
      - model: ./code-ft
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 0.4}]   # per-tensor, by name filter
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    out_dtype: bfloat16
    tokenizer_source: base

Read as mergekit 0.1.5 reads it (``mergekit/config.py``, ``parameter_resolver.py``, ``plan.py``):

- the model equal to ``base_model`` is the base, the others are members; a base given to a method that takes
  none (``linear``, ``karcher``, ``passthrough``) is one more member, as mergekit adds it;
- a parameter is a scalar, a gradient (a list of numbers, interpolated over a slice's layers:
  ``t = i / (n - 1)`` for layer ``i`` of ``n``, the value at ``t * (len - 1)`` interpolated linearly between
  its neighbours; a list of words or booleans picks ``list[int(t * (len - 1))]``), or a list of
  ``{filter, value}`` (the first whose filter is a substring of the tensor name, or that has no filter or
  ``*``, wins; its value may be a gradient). Tensors outside the layers (embeddings, final norm, head) take
  ``t = 0``, as mergekit 0.1.5 gives them;
- precedence: a slice source's (a model's) parameters, then the slice's, then the global ones; a level whose
  filters match nothing passes to the next. A member's parameters are evaluated against the member's own
  tensor name (its layer number before renumbering), the shared ones against the output's name;
- ``slices:`` stack layer ranges of the sources (:mod:`merge.slices`): every method, and ``passthrough``
  frankenmerges that stack or repeat layers; the output's layers are renumbered and a folder output's
  ``config.json`` gets the new layer count and per-layer lists;
- several YAML documents (``---``) are the stages of a mergekit-multi recipe: each has a ``name``, later ones
  use earlier ones as models by that name; the unnamed one (else the one no other uses) is written to the
  output, the others to a temporary folder beside it, removed at the end;
- ``tokenizer_source: base | union | MODEL``, the ``tokenizer:`` block (``source``, ``tokens``,
  ``pad_to_multiple_of``) and ``chat_template`` build the output's tokenizer and each model's embedding and head
  rows on it by mergekit's rules (:mod:`merge.vocab`); the folder output carries that tokenizer.

Model references are local paths when they exist, else Hub repositories (``hf://``).
``dtype`` is mergekit's compute dtype: papa-merge always computes in float32 (float64 when
``dtype: float64``), never in bfloat16/float16; ``out_dtype`` (else ``dtype``) is the output's.

What papa-merge does not do is refused by name before any model is read, never ignored: ``modules``
(multi-module models), ``override_architecture``, a tokenizer source on the Hub that is not one of the models,
and any key mergekit does not define. ``model+lora`` (or
``{model: ..., lora: ...}``) with a PEFT adapter, a local folder or a Hub repository (``org/name[@rev]``, whose
two adapter files alone are fetched), is applied per tensor as the merge streams (merge.lora). Deliberate
differences from mergekit are listed in ``DIFFERENCES``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from merge.errors import CheckpointNotFoundError, InvalidArgumentError
from merge.io.schemes import HF_PREFIX, parse_hub_reference
from merge.ops import Operator, get_operator

if TYPE_CHECKING:
    from merge.vocab import TokenizerSpec, TokenSource
from merge.params import gradient_value

__all__ = ["Recipe", "RecipeSlice", "RecipeSource", "load_recipe", "run_recipe", "plan_recipe",
           "UnsupportedRecipeError", "SUPPORTED_KEYS", "preview", "evaluate_setting", "MAX_RECIPE_BYTES",
           "MAX_VALUES", "MAX_STAGES", "DIFFERENCES"]

# Bounds that no real recipe comes near (mergekit's own examples are under 2 KB and 200 values), so that
# a hostile or mistaken file costs a bounded time and a one-line error of bounded length.
MAX_RECIPE_BYTES = 1 << 20
MAX_VALUES = 100_000  # scalars, lists and mappings once YAML aliases are expanded
MAX_DEPTH = 64  # nesting levels (a recipe uses about 6)
MAX_TEXT = 4096  # characters of a model reference (PATH_MAX) or a parameter's string value
MAX_STAGES = 64  # documents of a multi-stage recipe (published ones have 2 to 5)
PREVIEW_CHARS = 80  # of a value shown in an error message
STAGE_PREFIX = "stage:"  # a model reference to an earlier stage's output, as Recipe.members shows it

SUPPORTED_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "name")
_REFUSED = {
    "modules": "per-module definitions (multi-module models such as vision-language ones) are not supported; "
               "merge whole models with 'models:' or one layer stack with 'slices:'",
}
_KNOWN_MERGEKIT = {"name", "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                   "tokenizer_source", "tokenizer", "chat_template", "slices", "modules"}

# What papa-merge does on purpose otherwise than mergekit 0.1.5 (docs/operators.md lists them too).
DIFFERENCES = (
    "computes in float32 (float64 with dtype: float64), never in bfloat16/float16; dtype and out_dtype only set "
    "the output's dtype",
    "layers are read from tensor names (model.layers.N., transformer.h.N., blocks.N., ...), not from a table per "
    "architecture; every tensor outside the layers is kept (mergekit keeps those its architecture lists): names "
    "with embed/wte/wpe/tok_embeddings/word_embeddings come from the first slice, the others from the last",
    "a frankenmerge's config.json also gets its per-layer lists (layer_types, ...) rebuilt; mergekit sets the "
    "layer count only",
    "every slice merges the same number of models, and the base is in every slice or in none (mergekit plans "
    "each slice on its own); a recipe with slices or gradients runs in one process (no jobs or ranks)",
    "a multi-stage recipe whose stages all have names writes the one no other stage uses to the output (mergekit "
    "writes them all to its intermediate folder); intermediates are never reused between runs (mergekit's "
    "--lazy) and are removed at the end, on failure too",
    "a parameter shared by all models (normalize, lambda, t, ...) set on one model is refused; mergekit ignores "
    "it there",
    "an empty document of a multi-document file is skipped; an empty gradient list is refused",
)


class UnsupportedRecipeError(InvalidArgumentError):
    """A recipe field papa-merge does not implement; ``field`` names it."""

    def __init__(self, message: str, *, field: str, **fields: object):
        self.field = field
        super().__init__(message, **fields)


# A parameter setting, normalised: ``{filter, value}`` entries in precedence order, each value a scalar or a
# gradient (a list of scalars). A scalar ``x`` is ``[{"filter": None, "value": x}]``; levels of precedence
# (source, slice, global) are concatenated, which is mergekit's fall-through (first match wins).
Setting = list[dict[str, object]]


def evaluate_setting(setting: Setting, tensor: str, t: float = 0.0) -> object:
    """A setting's value for one tensor at gradient position ``t`` (mergekit's ``evaluate_setting``).

    Returns ``None`` when no entry's filter matches ``tensor``.

    Example:
        >>> evaluate_setting([{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": None, "value": 0.5}],
        ...                  "model.layers.3.mlp.up_proj.weight", t=0.25)
        0.25
    """
    if not isinstance(setting, list):
        return setting
    for entry in setting:
        flt = entry.get("filter")
        if flt is None or flt == "*" or (tensor and flt in tensor):
            return gradient_value(entry["value"], t)
    return None


def _is_gradient(setting: Setting) -> bool:
    return any(isinstance(e["value"], list) for e in setting)


def _is_plain(setting: Setting) -> bool:
    """One unfiltered scalar: the same value for every tensor."""
    return len(setting) == 1 and setting[0].get("filter") is None and not isinstance(setting[0]["value"], list)


@dataclass
class RecipeSource:
    """One source of a slice (one model of ``models:``): its reference, layer range and own parameters."""

    model: str
    layers: tuple[int, int] | None = None  # None: every layer (``models:``)
    params: dict[str, Setting] = field(default_factory=dict)


@dataclass
class RecipeSlice:
    """One output slice: its sources, its parameters and its own base model (else the recipe's)."""

    sources: list[RecipeSource]
    params: dict[str, Setting] = field(default_factory=dict)
    base: str | None = None


@dataclass
class Recipe:
    """A parsed recipe: method, members, base, parameters and dtypes, as :func:`merge.soup` takes them.

    ``slices`` holds the recipe's layer structure (one slice over every layer for ``models:``); ``layered``
    says whether it needs it (``slices:`` given, or a gradient parameter), else the members merge whole as
    in :func:`merge.soup`. ``stages`` are the earlier stages of a multi-stage recipe, in the order they run.
    """

    method: str
    members: list[str]
    base: str | None
    params: dict[str, Setting]
    member_params: list[dict[str, Setting]]
    dtype: str | None
    accumulate: str
    path: Path | None = None
    text: str = ""
    conditional: bool = False
    notes: list[str] = field(default_factory=list)
    slices: list[RecipeSlice] = field(default_factory=list)
    layered: bool = False
    name: str | None = None
    stages: list[Recipe] = field(default_factory=list)
    global_params: dict[str, Setting] = field(default_factory=dict)  # every global parameter, as written
    tokenizer: TokenizerSpec | None = None  # tokenizer_source, the tokenizer block, chat_template (merge.vocab)

    def resolve(self, tensor: str) -> tuple[dict[str, object], list[dict[str, object]]]:
        """Parameters for one tensor of a whole-model merge (``{filter, value}`` lists evaluated on its name)."""
        shared = {k: evaluate_setting(v, tensor) for k, v in self.params.items()}
        members = [{k: evaluate_setting(v, tensor) for k, v in mp.items()} for mp in self.member_params]
        return ({k: v for k, v in shared.items() if v is not None},
                [{k: v for k, v in m.items() if v is not None} for m in members])

    def record(self) -> dict[str, object]:
        """What the merge's recipe metadata records about the file."""
        rec: dict[str, object] = {"format": "mergekit", "text": self.text}
        if self.path is not None:
            rec["path"] = str(self.path)
            rec["sha256"] = hashlib.sha256(self.text.encode()).hexdigest()
        if self.name is not None:
            rec["stage"] = self.name
        return rec

    def refs(self) -> list[str]:
        """Every model reference the recipe reads (members, base, slice sources)."""
        found = [*self.members, *([self.base] if self.base else [])]
        found += [s.model for sl in self.slices for s in sl.sources] + [sl.base for sl in self.slices if sl.base]
        return list(dict.fromkeys(found))


def _scalar(key: str, value: object, where: str) -> object:
    """A parameter's scalar value as it is, if papa-merge can take it as a number, boolean or word."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            raise InvalidArgumentError(f"{where}: parameter {key!r}: {preview(value)} is out of range of any number "
                                       "papa-merge computes with") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"{where}: parameter {key!r}: {value} is not a finite number")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise InvalidArgumentError(f"{where}: parameter {key!r}: {preview(value)} is not a number or a method's word")
    return value


_SCALARS = (bool, int, float, str)


def _value(key: str, value: object, where: str, flt: object = None) -> object:
    """A scalar, or a gradient: a non-empty list of scalars."""
    if isinstance(value, _SCALARS):
        return _scalar(key, value, where)
    if isinstance(value, list) and value and all(isinstance(v, _SCALARS) for v in value):
        return [_scalar(key, v, where) for v in value]
    if isinstance(value, list) and not value:
        raise InvalidArgumentError(f"{where}: parameter {key!r}{'' if flt is None else f' filter {preview(flt)}'}: "
                                   "an empty gradient list; give one value or at least one per end")
    raise InvalidArgumentError(f"{where}: parameter {key!r}: value {preview(value)} is not a number, boolean, word "
                               "or a list of them (a gradient)")


def _check_value(key: str, value: object, where: str) -> Setting:
    """A parameter value as a :data:`Setting`: a scalar, a gradient, or ``{filter, value}`` entries."""
    if isinstance(value, _SCALARS) or (isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)):
        return [{"filter": None, "value": _value(key, value, where)}]
    if isinstance(value, Mapping) and "value" in value:
        value = [value]
    if isinstance(value, list):
        out: Setting = []
        for cond in value:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise InvalidArgumentError(f"{where}: parameter {key!r}: each entry of a list must be "
                                           f"{{filter: ..., value: ...}}, got {preview(cond)}")
            flt = cond.get("filter")
            if flt is not None and not (isinstance(flt, str) and len(flt) <= MAX_TEXT):
                raise InvalidArgumentError(f"{where}: parameter {key!r}: filter {preview(flt)} is not a piece of a "
                                           "tensor name; write it as a string (quoted if it looks like a number)")
            out.append({"filter": flt, "value": _value(key, cond["value"], where, flt)})
        return out
    raise InvalidArgumentError(f"{where}: parameter {key!r} has a value papa-merge cannot read: {preview(value)}")


def _params(raw: object, where: str) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"{where}: 'parameters' must be a mapping of name: value, got {preview(raw)}")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_TEXT:
            raise InvalidArgumentError(f"{where}: parameter name {preview(k)} is not a name")
        out[k] = _check_value(k, v, where)
    return out


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _adapter_ref(raw: object, where: str, folder: Path) -> str:
    """A LoRA adapter reference (mergekit's ``lora``): a local folder, else a Hub repository (``hf://org/name``, or
    ``org/name[@revision]`` and ``{path, revision}`` as mergekit writes them), as ``hf://org/name[@revision]``."""
    revision = None
    if isinstance(raw, Mapping):
        revision, raw = raw.get("revision"), raw.get("path")
    if not isinstance(raw, str) or not raw or len(raw) > MAX_TEXT or "\0" in raw:
        raise InvalidArgumentError(f"{where}: LoRA adapter reference must be a folder or a Hub repository, got "
                                   f"{preview(raw)}")
    if revision is not None and not (isinstance(revision, str) and revision and len(revision) <= MAX_TEXT):
        raise InvalidArgumentError(f"{where}: LoRA adapter revision must be a branch, tag or commit, got "
                                   f"{preview(revision)}")
    local = Path(raw).expanduser()
    if not _exists(local) and not local.is_absolute() and _exists(folder / local):
        local = folder / local
    if _exists(local) and revision is None:
        return str(local)
    try:
        hub = parse_hub_reference(raw if raw.startswith(HF_PREFIX) else HF_PREFIX + raw)
    except InvalidArgumentError:
        hub = None
    if hub is None or "/" not in hub.repo_id or raw.startswith((".", "/", "~")) or (revision and hub.revision):
        raise CheckpointNotFoundError(f"{where}: LoRA adapter {preview(raw)} is neither a local folder nor a Hub "
                                      "repository (org/name[@revision])", path=raw)
    return str(dataclasses.replace(hub, revision=revision or hub.revision))


def _model_ref(raw: object, where: str, folder: Path, stages: frozenset[str] = frozenset()) -> str:
    """A mergekit model reference as a papa-merge checkpoint reference (local path, hf://, or an earlier stage)."""
    revision = None
    if isinstance(raw, Mapping):
        if raw.get("lora") is not None:
            base = _model_ref({k: v for k, v in raw.items() if k != "lora"}, where, folder, stages)
            return f"{base}+{_adapter_ref(raw['lora'], where, folder)}"
        if raw.get("override_architecture") is not None:
            raise UnsupportedRecipeError(f"{where}: 'override_architecture' is not supported: papa-merge reads the "
                                         "layers from the tensor names; drop it", field="override_architecture")
        inner = raw.get("model", raw)
        if isinstance(inner, Mapping):
            revision = inner.get("revision")
            inner = inner.get("path")
        raw = inner
    if not isinstance(raw, str) or not raw or len(raw) > MAX_TEXT or "\0" in raw:
        raise InvalidArgumentError(f"{where}: model reference must be a path or a Hub repository, got {preview(raw)}")
    if revision is not None and not (isinstance(revision, str) and revision and len(revision) <= MAX_TEXT):
        raise InvalidArgumentError(f"{where}: revision must be a branch, tag or commit, got {preview(revision)}")
    if raw in stages and revision is None:
        return STAGE_PREFIX + raw
    if "+" in raw and not _exists(Path(raw)):  # model+lora: the adapter is applied per tensor (merge.lora)
        model, lora = raw.rsplit("+", 1)
        return f"{_model_ref(model, where, folder, stages)}+{_adapter_ref(lora, where, folder)}"
    if raw.startswith(HF_PREFIX):
        return raw
    try:
        local = Path(raw).expanduser()
    except RuntimeError:  # ~user of no such user
        local = Path(raw)
    if not _exists(local) and not local.is_absolute() and _exists(folder / local):
        local = folder / local  # mergekit resolves paths from the working directory; then the recipe's folder
    if _exists(local):
        return str(local)
    if raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
        return f"{HF_PREFIX}{raw}" + (f"@{revision}" if revision else "")
    raise CheckpointNotFoundError(f"{where}: model {preview(raw)} is neither a local path nor a Hub repository "
                                  "(org/name)" + (f" nor a stage of this file ({', '.join(sorted(stages))})"
                                                  if stages else ""), path=raw)


def preview(value: object, limit: int = PREVIEW_CHARS) -> str:
    """``value`` for an error message: its type and the start of its repr, at most about ``limit`` characters.

    Computed without expanding the value: a list that YAML aliases make a billion items long (or one that
    contains itself) costs as much as its first ``limit`` characters.
    """
    kind = type(value).__name__
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        kind = f"a {'mapping' if isinstance(value, Mapping) else kind} of {len(value)} item{'s' * (len(value) != 1)}"
    elif isinstance(value, (str, bytes)) and len(value) > limit:
        kind = f"a {'string' if isinstance(value, str) else kind} of {len(value)} characters"
    elif isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return _short_repr(value, limit)
    text = "".join(itertools.islice(_repr_pieces(value, limit), limit + 1))
    return f"{kind}: {text[:limit] + '...' if len(text) > limit else text}"


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short_repr(value: object, limit: int) -> str:
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return repr(value[:limit])[:-1] + "..."
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        return f"an integer of about {int((value.bit_length() - 1) * math.log10(2)) + 1} digits"
    return repr(value)[:limit + 1]


def _repr_pieces(value: object, limit: int) -> Iterator[str]:
    """The repr of ``value`` one character at a time (generators: the caller takes only what it prints)."""
    if isinstance(value, Mapping):
        items: Iterable = value.items()
        opening, closing = "{", "}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
        opening, closing = {list: "[]", tuple: "()"}.get(type(value), "{}")
    else:
        yield from _short_repr(value, limit)
        return
    yield opening
    for i, item in enumerate(items):
        if i:
            yield from ", "
        if isinstance(value, Mapping):
            yield from _repr_pieces(item[0], limit)
            yield from ": "
            item = item[1]
        yield from _repr_pieces(item, limit)  # each level yields first, so at most ``limit`` levels are entered
    yield closing


def _node_size(root: object, where: str, path: str | os.PathLike | None) -> int:
    """How many values the YAML node graph ``root`` holds once its aliases are expanded, counted without
    expanding them (each node once, bottom-up); refuses more than ``MAX_VALUES`` and a node that contains itself."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1 + len(node.value) // 64  # a long string weighs like many short ones
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        key = id(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_VALUES:
                raise InvalidArgumentError(
                    f"{where}: the recipe holds more than {MAX_VALUES} values once its YAML aliases (*name) are "
                    "expanded; a recipe lists a few models and parameters: write them out", path=path)
        elif key in open_nodes:
            raise InvalidArgumentError(f"{where}: a YAML alias refers to a value that contains it (line "
                                       f"{node.start_mark.line + 1}); a recipe cannot contain itself", path=path)
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return sizes[id(root)]


@functools.cache
def _loader() -> type:
    """PyYAML's safe loader, refusing flow nesting (``[[[...``) beyond ``MAX_DEPTH`` as the scanner meets it: the
    scanner's cost grows with the square of that nesting, and the composer would recurse once per level."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def fetch_flow_collection_start(self, TokenClass: type) -> None:  # PyYAML's name
            if self.flow_level >= MAX_DEPTH:
                raise RecursionError
            super().fetch_flow_collection_start(TokenClass)

    return RecipeLoader


def _read_text(path: str | os.PathLike, where: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such recipe file", path=path) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise InvalidArgumentError(f"{where}: larger than {MAX_RECIPE_BYTES >> 20} MiB, which no recipe is; "
                                   "is it the right file?", path=path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{where}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                                   "save the recipe as UTF-8", path=path) from None


def _read_yaml(path: str | os.PathLike | None, text: str | None, where: str) -> tuple[list[Mapping], str]:
    """The recipe's YAML documents (one mapping each, empty documents skipped) and its text.

    Each document is composed first, its size with aliases expanded is counted (all documents together), and
    only then is it built: YAML's aliases can make a 300-byte document describe billions of values.
    """
    import yaml

    if text is None:
        text = _read_text(path, where)
    elif len(text) > MAX_RECIPE_BYTES:
        raise InvalidArgumentError(f"{where}: larger than {MAX_RECIPE_BYTES >> 20} MiB, which no recipe is", path=path)
    loader = None
    docs: list[object] = []
    try:
        loader = _loader()(text)  # the reader refuses control characters here already
        total = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            total += _node_size(node, where, path)
            if total > MAX_VALUES:
                raise InvalidArgumentError(f"{where}: the recipe holds more than {MAX_VALUES} values once its YAML "
                                           "aliases (*name) are expanded; write them out", path=path)
            if len(docs) >= MAX_STAGES:
                raise InvalidArgumentError(f"{where}: more than {MAX_STAGES} YAML documents; a multi-stage recipe "
                                           "has a few", path=path)
            docs.append(loader.construct_document(node))
    except InvalidArgumentError:
        raise
    except RecursionError:
        raise InvalidArgumentError(f"{where}: nested too deeply to be a recipe (a recipe nests about 6 levels)",
                                   path=path) from None
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # ValueError: e.g. an integer of 5000 digits
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InvalidArgumentError(f"{where}: not valid YAML ({_clip(first)})", path=path) from None
    finally:
        if loader is not None:
            loader.dispose()
    docs = [d for d in docs if d is not None]
    if not docs:
        raise InvalidArgumentError(f"{where}: a recipe is a YAML mapping with merge_method and models, got "
                                   "an empty file", path=path)
    for d in docs:
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"{where}: a recipe is a YAML mapping with merge_method and models, got "
                                       f"{preview(d)}", path=path)
    return docs, text


def _check_fields(raw: Mapping, where: str, path: str | os.PathLike | None) -> None:
    """Refuse the fields papa-merge does not implement, each by name."""
    for key, reason in _REFUSED.items():
        if raw.get(key) is not None:
            raise UnsupportedRecipeError(f"{where}: '{key}' is not supported: {reason}", field=key, path=path)
    unknown = [k for k in raw if k not in _KNOWN_MERGEKIT]
    if unknown:
        raise UnsupportedRecipeError(f"{where}: unknown field {preview(unknown[0])}; papa-merge reads "
                                     f"{', '.join(SUPPORTED_KEYS)}", field=_clip(str(unknown[0])), path=path)
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise InvalidArgumentError(f"{where}: give 'tokenizer_source' or a 'tokenizer' block, not both (as mergekit)",
                                   path=path)
    if raw.get("slices") is not None and raw.get("models") is not None:
        raise InvalidArgumentError(f"{where}: give 'models' or 'slices', not both (as mergekit)", path=path)


def _entry_fields(entry: Mapping, allowed: set[str], where: str, path: str | os.PathLike | None) -> None:
    extra = sorted(set(entry) - allowed, key=str)
    if extra:
        raise UnsupportedRecipeError(f"{where}: unknown field {preview(extra[0])}; it takes "
                                     f"{', '.join(sorted(allowed))}", field=_clip(str(extra[0])), path=path)


def _read_models(models: list, where: str, folder: Path, path: str | os.PathLike | None,
                 stages: frozenset[str]) -> list[RecipeSource]:
    sources = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise InvalidArgumentError(f"{where}: models[{i}] needs a 'model', got {preview(entry)}", path=path)
        _entry_fields(entry, {"model", "parameters"}, f"{where}: models[{i}]", path)
        sources.append(RecipeSource(_model_ref(entry["model"], f"{where}: models[{i}]", folder, stages),
                                    None, _params(entry.get("parameters"), f"{where}: models[{i}]")))
    return sources


def _layer_range(raw: object, where: str) -> tuple[int, int]:
    if (not isinstance(raw, list) or len(raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20 for v in raw)
            or raw[0] >= raw[1]):
        raise InvalidArgumentError(f"{where}: layer_range must be [first, last + 1] with 0 <= first < last + 1, "
                                   f"got {preview(raw)}")
    return raw[0], raw[1]


def _read_slices(slices: object, where: str, folder: Path, path: str | os.PathLike | None,
                 stages: frozenset[str]) -> list[RecipeSlice]:
    if not isinstance(slices, list) or not slices:
        raise InvalidArgumentError(f"{where}: 'slices' must list the output's slices, got {preview(slices)}",
                                   path=path)
    out = []
    for s, raw in enumerate(slices):
        at = f"{where}: slices[{s}]"
        if not isinstance(raw, Mapping) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
            raise InvalidArgumentError(f"{at}: a slice lists its 'sources', got {preview(raw)}", path=path)
        _entry_fields(raw, {"sources", "base_model", "parameters", "residual_weight"}, at, path)
        sources = []
        for i, src in enumerate(raw["sources"]):
            here = f"{at}.sources[{i}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise InvalidArgumentError(f"{here}: a source needs 'model' and 'layer_range', got {preview(src)}",
                                           path=path)
            _entry_fields(src, {"model", "layer_range", "parameters"}, here, path)
            sources.append(RecipeSource(_model_ref(src["model"], here, folder, stages),
                                        _layer_range(src["layer_range"], here),
                                        _params(src.get("parameters"), here)))
        base = _model_ref(raw["base_model"], f"{at}.base_model", folder, stages) if raw.get("base_model") else None
        out.append(RecipeSlice(sources, _params(raw.get("parameters"), at), base))
    return out


def _token_source(raw: object, at: str, folder: Path, path: str | os.PathLike | None,
                  stages: frozenset[str]) -> TokenSource:
    """One ``tokens:`` entry: its source (a model, ``{kind: model_token, ...}``, ``{kind: zero}``) and ``force``."""
    from merge.vocab import TokenSource

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"{at}: a token's entry is {{source: ..., force: ...}}, got {preview(raw)}",
                                   path=path)
    _entry_fields(raw, {"source", "force"}, at, path)
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise InvalidArgumentError(f"{at}: 'force' is true or false, got {preview(force)}", path=path)
    src = raw.get("source")
    if src is None:
        return TokenSource(None, force=force)
    kind = src.get("kind") if isinstance(src, Mapping) else None
    if kind == "zero":
        _entry_fields(src, {"kind"}, f"{at}.source", path)
        return TokenSource("zero", force=force)
    if kind == "model_token":
        _entry_fields(src, {"kind", "model", "token_id", "token"}, f"{at}.source", path)
        tid, tok = src.get("token_id"), src.get("token")
        if (tid is None) == (tok is None):
            raise InvalidArgumentError(f"{at}.source: give one of 'token_id' or 'token' (as mergekit)", path=path)
        if tid is not None and not (isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0):
            raise InvalidArgumentError(f"{at}.source: token_id must be a row number, got {preview(tid)}", path=path)
        if tok is not None and not (isinstance(tok, str) and len(tok) <= MAX_TEXT):
            raise InvalidArgumentError(f"{at}.source: token must be a token's text, got {preview(tok)}", path=path)
        return TokenSource("model_token", _model_ref(src.get("model"), f"{at}.source", folder, stages), tid, tok,
                           force)
    if kind is not None:
        raise InvalidArgumentError(f"{at}.source: kind {preview(kind)} is not one of model_token, zero", path=path)
    return TokenSource("model", _model_ref(src, f"{at}.source", folder, stages), force=force)


def _read_tokenizer(raw: Mapping, where: str, folder: Path, path: str | os.PathLike | None,
                    stages: frozenset[str]) -> TokenizerSpec | None:
    """``tokenizer_source``, the ``tokenizer:`` block and ``chat_template`` as a :class:`merge.vocab.TokenizerSpec`."""
    from merge.vocab import TokenizerSpec, chat_template_text

    block, source = raw.get("tokenizer"), raw.get("tokenizer_source")
    template = raw.get("chat_template")
    if block is None and source is None and template is None:
        return None
    tokens: dict[str, object] = {}
    pad = None
    if block is not None:
        if not isinstance(block, Mapping):
            raise InvalidArgumentError(f"{where}: 'tokenizer' is a mapping (source, tokens, pad_to_multiple_of), got "
                                       f"{preview(block)}", path=path)
        _entry_fields(block, {"source", "tokens", "pad_to_multiple_of"}, f"{where}: tokenizer", path)
        source = block.get("source", "union")  # mergekit's default
        pad = block.get("pad_to_multiple_of")
        if pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool) and 0 < pad <= 1 << 20):
            raise InvalidArgumentError(f"{where}: tokenizer.pad_to_multiple_of must be a positive whole number, got "
                                       f"{preview(pad)}", path=path)
        raw_tokens = block.get("tokens") or {}
        if not isinstance(raw_tokens, Mapping):
            raise InvalidArgumentError(f"{where}: tokenizer.tokens maps each token to its source, got "
                                       f"{preview(raw_tokens)}", path=path)
        for tok, entry in raw_tokens.items():
            if not isinstance(tok, str) or not tok or len(tok) > MAX_TEXT:
                raise InvalidArgumentError(f"{where}: tokenizer.tokens: {preview(tok)} is not a token's text "
                                           "(quote it if it looks like a number)", path=path)
            tokens[tok] = _token_source(entry, f"{where}: tokenizer.tokens[{_clip(repr(tok))}]", folder, path, stages)
    field_name = "tokenizer" if block is not None else "tokenizer_source"
    if source is not None and source not in ("base", "union"):
        source = _model_ref(source, f"{where}: {field_name}", folder, stages)
    if template is not None:
        if not isinstance(template, str) or len(template) > MAX_RECIPE_BYTES:
            raise InvalidArgumentError(f"{where}: 'chat_template' is auto or a Jinja template, got "
                                       f"{preview(template)}", path=path)
        if template != "auto":
            chat_template_text(template)  # a name or a non-template is refused here, before any model is read
    base = _model_ref(raw["base_model"], f"{where}: base_model", folder, stages) if raw.get("base_model") else None
    return TokenizerSpec(source, tokens, pad, template, base)  # type: ignore[arg-type]


def _check_tokenizer_refs(spec: TokenizerSpec | None, refs: list[str], where: str,
                          path: str | os.PathLike | None) -> None:
    """Every model a token's row comes from is one of the recipe's models; a Hub tokenizer source is one too."""
    if spec is None:
        return
    for tok, src in spec.tokens.items():
        if src.model is not None and src.model not in refs:
            raise InvalidArgumentError(f"{where}: tokenizer.tokens[{_clip(repr(tok))}]: takes its row from "
                                       f"{src.model}, which is not one of the recipe's models", path=path)
    if (spec.source not in (None, "base", "union") and spec.source not in refs
            and str(spec.source).startswith(HF_PREFIX)):
        raise UnsupportedRecipeError(f"{where}: a tokenizer source on the Hub that is not one of the recipe's models "
                                     f"({spec.source}) is not supported; download it and name its folder",
                                     field="tokenizer_source", path=path)


def _check_shared_on_models(op: Operator, slices: list[RecipeSlice], from_models: bool, where: str) -> None:
    """A parameter shared by all members (``normalize``, ``t``) set on one model is refused (mergekit reads those
    at the slice and global levels only, and ignores them on a model)."""
    shared = {p.name for p in op.params if not p.per_member}
    for s, sl in enumerate(slices):
        for i, src in enumerate(sl.sources):
            for k in [k for k in src.params if k in shared]:
                at = f"models[{i}]" if from_models else f"slices[{s}].sources[{i}]"
                raise InvalidArgumentError(f"{where}: {at}: parameter {k!r} of {op.name} is shared by all models; "
                                           "set it under the global 'parameters'", option=k)


def _entries(setting: Setting | object) -> Setting:
    return setting if isinstance(setting, list) else [{"filter": None, "value": setting}]


def _simple(setting: Setting) -> Setting | object:
    """A setting as :class:`Recipe` shows it: a plain scalar as itself, else its ``{filter, value}`` entries."""
    return setting[0]["value"] if _is_plain(setting) else setting


def _chain(*levels: Setting | object | None) -> Setting:
    """Levels of precedence as one setting: their entries in order, up to the first that matches every tensor."""
    out: Setting = []
    for level in levels:
        for e in _entries(level) if level is not None else ():
            out.append(e)
            if e.get("filter") in (None, "*"):
                return out
    return out


def _parse_document(raw: Mapping, where: str, path: str | os.PathLike | None, text: str,
                    stages: frozenset[str]) -> Recipe:
    """One recipe document (one stage) as a :class:`Recipe`."""
    _check_fields(raw, where, path)
    method = raw.get("merge_method")
    if method is None:
        raise InvalidArgumentError(f"{where}: 'merge_method' is missing", path=path)
    if not isinstance(method, str):
        raise InvalidArgumentError(f"{where}: 'merge_method' must be a method's name, got {preview(method)}", path=path)
    op = get_operator(_clip(method))  # a name too long to be one is refused by its start
    folder = Path(path).parent if path is not None else Path(".")
    base = _model_ref(raw["base_model"], f"{where}: base_model", folder, stages) if raw.get("base_model") else None
    given_slices = raw.get("slices") is not None
    if given_slices:
        slices = _read_slices(raw["slices"], where, folder, path, stages)
    else:
        models = raw.get("models")
        if not isinstance(models, list) or not models:
            raise InvalidArgumentError(f"{where}: 'models' must list the models to merge (or 'slices' their "
                                       f"layers), got {preview(models)}", path=path)
        sources = _read_models(models, where, folder, path, stages)
        if base is not None and base not in [s.model for s in sources]:
            sources.append(RecipeSource(base))  # mergekit adds a base that is not among the models
        slices = [RecipeSlice(sources)]
    _check_shared_on_models(op, slices, not given_slices, where)
    params = _params(raw.get("parameters"), f"{where}: parameters")
    dtype, out_dtype = raw.get("dtype"), raw.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and not (isinstance(value, str) and len(value) <= PREVIEW_CHARS):
            raise InvalidArgumentError(f"{where}: {key!r} must name a dtype (float32, bfloat16, ...), got "
                                       f"{preview(value)}", path=path)
    accumulate = "float64" if str(dtype).lower() in ("float64", "fp64", "double") else "float32"
    notes = []
    per_member = {p.name for p in op.params if p.per_member}
    everything = [params, *(sl.params for sl in slices), *(s.params for sl in slices for s in sl.sources)]
    gradient = any(_is_gradient(v) for level in everything for v in level.values())
    name = raw.get("name")
    if name is not None and not (isinstance(name, str) and name and len(name) <= MAX_TEXT):
        raise InvalidArgumentError(f"{where}: 'name' must name the stage, got {preview(name)}", path=path)
    # The whole-model view (members, base, per-member parameters), which a recipe without layer structure runs.
    sources = slices[0].sources
    members = [s.model for s in sources if base is None or s.model != base]
    member_params = [dict(s.params) for s in sources if base is None or s.model != base]
    if base is not None and op.base == "none":
        # mergekit adds the base model to the inputs of a method that has no use for one
        members = [s.model for s in sources]
        member_params = [dict(s.params) for s in sources]
        notes.append("base_model is one more member of this method, as in mergekit")
        shown_base = None
    else:
        shown_base = base
    shared = {k: v for k, v in params.items() if k not in per_member}
    for mp in member_params:
        for k in per_member & params.keys():
            mp[k] = _chain(mp.get(k), params[k])  # the model's own value first, the global one if none matches
    conditional = not all(_is_plain(v) for level in [shared, *member_params] for v in level.values())
    shared = {k: _simple(v) for k, v in shared.items()}
    member_params = [{k: _simple(v) for k, v in mp.items()} for mp in member_params]
    if given_slices:
        members = list(dict.fromkeys(s.model for sl in slices for s in sl.sources
                                     if op.base == "none" or s.model != (sl.base or base)))
        notes.append(f"{len(slices)} slices, {len(members)} model{'s' * (len(members) != 1)}")
    tokenizer = _read_tokenizer(raw, where, folder, path, stages)
    recipe = Recipe(method, members, shown_base, shared, member_params, out_dtype or dtype, accumulate,
                    Path(path) if path is not None else None, text, conditional, notes, slices,
                    given_slices or gradient, name, [], params, tokenizer)
    _check_tokenizer_refs(tokenizer, recipe.refs(), where, path)
    return recipe


def _stage_order(recipes: list[Recipe], where: str, path: str | os.PathLike | None) -> list[Recipe]:
    """The stages in the order they run (each after the stages it reads), the output's last."""
    by_name = {r.name: r for r in recipes if r.name is not None}
    unnamed = [r for r in recipes if r.name is None]
    if len(unnamed) > 1:
        raise InvalidArgumentError(f"{where}: {len(unnamed)} documents without a 'name'; a multi-stage recipe names "
                                   "every stage but the final one (as mergekit-multi)", path=path)
    if len(by_name) + len(unnamed) != len(recipes):
        dup = next(n for n in by_name if sum(r.name == n for r in recipes) > 1)
        raise InvalidArgumentError(f"{where}: two stages are named {preview(dup)}; give each its own name", path=path)

    def reads(r: Recipe) -> list[str]:
        return [ref[len(STAGE_PREFIX):] for ref in r.refs() if ref.startswith(STAGE_PREFIX)]

    used = {n for r in recipes for n in reads(r)}
    if unnamed:
        final = unnamed[0]
    else:
        sinks = [r for r in recipes if r.name not in used]
        if len(sinks) != 1:
            names = ", ".join(str(r.name) for r in sinks) or "none: they read each other in a cycle"
            raise InvalidArgumentError(f"{where}: cannot tell which stage is the output (stages no other stage "
                                       f"reads: {names}); leave the final stage without a 'name'", path=path)
        final = sinks[0]
    order: list[Recipe] = []
    visiting: set[str | None] = set()

    def visit(r: Recipe) -> None:
        if r in order:
            return
        if r.name in visiting:
            raise InvalidArgumentError(f"{where}: stage {r.name!r} reads its own output through other stages; "
                                       "stages cannot form a cycle", path=path)
        visiting.add(r.name)
        for n in reads(r):
            visit(by_name[n])
        visiting.discard(r.name)
        order.append(r)

    visit(final)
    unused = [r.name for r in recipes if r not in order]
    if unused:
        raise InvalidArgumentError(f"{where}: stage {unused[0]!r} is not used by the final stage; remove it or "
                                   "use it", path=path)
    return order


def load_recipe(path: str | os.PathLike | None = None, *, text: str | None = None) -> Recipe:
    """Parse a mergekit YAML recipe (a file, or its ``text``), refusing what papa-merge does not implement.

    A file of several YAML documents is a multi-stage recipe (mergekit-multi): the returned :class:`Recipe` is
    the final stage, and its ``stages`` the others, in the order they run.

    Raises:
        UnsupportedRecipeError: a field papa-merge does not implement (``modules``, ``override_architecture``,
            a ``tokenizer_source`` on the Hub that is not one of the models); ``field`` names it.
        InvalidArgumentError: not a recipe (unknown keys, missing ``merge_method`` or ``models``, bad values,
            stages that do not chain).
        UnknownNameError: a method papa-merge does not have (the message lists those it has).

    Example:
        >>> load_recipe(text="merge_method: linear\\nmodels:\\n  - model: a.safetensors\\n"
        ...                  "  - model: b.safetensors\\n").method  # doctest: +SKIP
        'linear'
    """
    where = str(path) if path is not None else "recipe"
    docs, text = _read_yaml(path, text, where)
    if len(docs) == 1:
        return _parse_document(docs[0], where, path, text, frozenset())
    names = frozenset(d["name"] for d in docs if isinstance(d.get("name"), str))
    recipes = []
    for i, doc in enumerate(docs):
        label = doc.get("name") if isinstance(doc.get("name"), str) else f"document {i + 1}"
        recipes.append(_parse_document(doc, f"{where}: stage {_clip(label)}", path, text,
                                       names - {doc.get("name")}))
    order = _stage_order(recipes, where, path)
    final = order[-1]
    final.stages = order[:-1]
    final.notes.append(f"stage {len(order)} of {len(order)}; runs first: "
                       + ", ".join(str(r.name) for r in final.stages))
    return final


def _soup_args(recipe: Recipe) -> dict[str, object]:
    args: dict[str, object] = dict(method=recipe.method, base=recipe.base, dtype=recipe.dtype,
                                   accumulate=recipe.accumulate)
    if recipe.conditional:
        args["resolve"] = recipe.resolve
        shared, members = recipe.resolve("")
        args["params"], args["member_params"] = shared, members
    else:
        args["params"] = dict(recipe.params)
        args["member_params"] = [dict(mp) for mp in recipe.member_params]
    return args


def _member_models(recipe: Recipe, op: Operator) -> list[tuple[list[str], str | None]]:
    """Per slice: the models of its inputs in order, and its base model (``None`` for a method without one)."""
    out = []
    for s, sl in enumerate(recipe.slices):
        base = sl.base or recipe.base
        models = [src.model for src in sl.sources]
        if op.base == "none" or base is None or base not in models:
            if op.base == "required" and base is not None and base not in models:
                raise InvalidArgumentError(f"slices[{s}]: the base model {base} is not among its sources; "
                                           f"{op.name} takes the base's layers from a source of each slice")
            out.append((models, None))
        else:
            out.append((models, base))
    return out


def _slice_resolver(recipe: Recipe, op: Operator, places: Mapping, members_by_slice: list[list[str]]):
    """``name -> (shared, per-member parameters)`` with mergekit's precedence: source, slice, global.

    A member's values are evaluated against its own input tensor name, the shared ones against the output's
    (``mergekit/parameter_resolver.py``: ``resolve_parameters``).
    """
    from merge.slices import TensorPlace

    per_member = {p.name for p in op.params if p.per_member}
    glob = recipe.global_params
    top = [glob, *(sl.params for sl in recipe.slices)]
    member_keys = sorted({k for level in [*top, *(src.params for sl in recipe.slices for src in sl.sources)]
                          for k in level if k in per_member})
    shared_keys = sorted({k for level in top for k in level if k not in per_member})
    n = len(members_by_slice[0]) if members_by_slice else 0

    def resolve(name: str) -> tuple[dict[str, object], list[dict[str, object]]]:
        place = places.get(name) or TensorPlace(0, 0.0, [name] * n)
        sl = recipe.slices[place.slice]
        shared = {}
        for k in shared_keys:
            v = evaluate_setting(_chain(sl.params.get(k), glob.get(k)), name, place.t)
            if v is not None:
                shared[k] = v
        members = []
        for j in range(n):
            model = members_by_slice[place.slice][j]
            got = {}
            for k in member_keys:
                own = [e for src in sl.sources if src.model == model for e in src.params.get(k, ())]
                v = evaluate_setting(_chain(own, sl.params.get(k), glob.get(k)), place.names[j], place.t)
                if v is not None:
                    got[k] = v
            members.append(got)
        return shared, members

    return resolve


def _vocab_inputs(recipe: Recipe, raw: Mapping[str, object]):
    """``tensor -> (models, base)``: the inputs of a vocabulary tensor's merge, as mergekit plans them (every model
    of ``models:``; with ``slices:``, the first slice's sources for the embeddings, the last slice's for the rest)."""
    from merge.slices import layout_of

    spec = recipe.tokenizer
    first, last = recipe.slices[0], recipe.slices[-1]
    lead = raw[first.sources[0].model]
    pre = set(layout_of(list(lead.infos)).pre) if recipe.layered else set()  # type: ignore[attr-defined]

    def inputs(tensor: str) -> tuple[list[str], str | None]:
        sl = first if tensor in pre or not recipe.layered else last
        return [s.model for s in sl.sources], sl.base or spec.base

    return inputs


def _open_refs(recipe: Recipe, stack: contextlib.ExitStack):
    """Open every model of ``recipe``: ``(ref -> Source, VocabPlan | None)``. With a tokenizer to merge, each source
    presents its vocabulary tensors on the output vocabulary (:class:`merge.vocab.VocabSource`)."""
    from merge.lora import open_member

    opened: dict[str, object] = {}
    for ref in recipe.refs():
        opened[ref] = stack.enter_context(open_member(ref))
    spec = recipe.tokenizer
    if spec is None or not spec.merges:
        return opened, None
    from merge.vocab import TOKENIZER_FILES, VocabGroup, build_vocab

    folders = {ref: Path(src.path) for ref, src in opened.items()}  # type: ignore[attr-defined]
    lead = folders[spec.base or recipe.refs()[0]]
    if spec.source == "base" and not (lead.is_dir() and any((lead / f).is_file() for f in TOKENIZER_FILES)):
        recipe.notes.append("tokenizer_source: base, and the base has no tokenizer files: rows merged as they are")
        return opened, None
    if spec.source not in ("base", "union") and spec.source not in folders:
        folders[spec.source] = Path(spec.source)
    plan = build_vocab(spec, recipe.refs(), folders)
    recipe.notes.append(f"tokenizer ({'tokenizer block' if spec.tokens or spec.pad_to_multiple_of else 'source'} "
                        f"{spec.source}): {plan.size} tokens, {plan.rows} embedding rows")
    group = VocabGroup(plan, opened, _vocab_inputs(recipe, opened))  # type: ignore[arg-type]
    return {ref: group.wrap(ref) for ref in opened}, plan


def _open_slices(recipe: Recipe, stack: contextlib.ExitStack):
    """Open every model of a layered recipe and plan its slices: ``(SlicePlan, resolve, opened, VocabPlan)``."""
    from merge.slices import SliceInput, plan_slices

    op = get_operator(recipe.method)
    opened, vocab = _open_refs(recipe, stack)
    specs = []
    members_by_slice = []
    for (models, base), sl in zip(_member_models(recipe, op), recipe.slices):
        inputs = [SliceInput(opened[src.model], src.layers, src.model) for src in sl.sources]
        base_at = models.index(base) if base is not None else None
        specs.append((inputs, base_at))
        members_by_slice.append([m for i, m in enumerate(models) if i != base_at])
    plan = plan_slices(specs)
    return plan, _slice_resolver(recipe, op, plan.places, members_by_slice), opened, vocab


def _rewrite_config(recipe: Recipe, plan, opened: Mapping[str, object], out: Path) -> list[Path]:
    """A folder output's ``config.json`` with the stacked layer count and per-layer lists (the file, if rewritten)."""
    from merge.slices import read_config, rewrite_layer_config

    config = read_config(out)
    if config is None or not plan.layer_origin:
        return []
    lead = []
    for sl in recipe.slices:
        base = sl.base or recipe.base
        src = next((s for s in sl.sources if s.model != base), sl.sources[0])
        lead.append(read_config(opened[src.model].path))
    rewritten = rewrite_layer_config(config, plan.layer_origin, lead)
    if rewritten == config:
        return []
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(rewritten, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return [out / "config.json"]


def _check_one_process(recipe: Recipe, options: Mapping[str, object]) -> None:
    if options.get("jobs", 1) != 1 or options.get("ranks"):
        raise InvalidArgumentError("a recipe with slices, gradient parameters or a tokenizer runs in one process; "
                                   "leave jobs at 1 "
                                   "and run it outside torchrun", option="jobs", choices=(1,))


def _with_stage_outputs(recipe: Recipe, outputs: Mapping[str, str]) -> Recipe:
    """``recipe`` with its references to earlier stages replaced by their output folders."""
    def ref(r: str | None) -> str | None:
        if r is not None and r.startswith(STAGE_PREFIX):
            return outputs[r[len(STAGE_PREFIX):]]
        return r

    slices = [RecipeSlice([dataclasses.replace(s, model=ref(s.model)) for s in sl.sources], sl.params, ref(sl.base))
              for sl in recipe.slices]
    tokenizer = recipe.tokenizer
    if tokenizer is not None:
        tokens = {t: dataclasses.replace(src, model=ref(src.model)) for t, src in tokenizer.tokens.items()}
        tokenizer = dataclasses.replace(tokenizer, source=ref(tokenizer.source), base=ref(tokenizer.base),
                                        tokens=tokens)
    return dataclasses.replace(recipe, members=[ref(m) for m in recipe.members], base=ref(recipe.base),
                               slices=slices, stages=[], tokenizer=tokenizer)


def plan_recipe(recipe: Recipe | str | os.PathLike, **options: object):
    """Validate a recipe against its models without writing (``papa-merge run --dry-run``).

    A multi-stage recipe is planned up to its first stage (the later ones read outputs not yet written); a
    note says so.
    """
    from merge.soups import plan_soup

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.stages:
        first = recipe.stages[0]
        recipe.notes.append(f"planned: stage {first.name} (the later stages read outputs not yet written)")
        recipe = first
    if not recipe.layered and not _merges_vocab(recipe):
        return plan_soup(recipe.members, **_soup_args(recipe), **options)
    with contextlib.ExitStack() as stack:
        if not recipe.layered:
            opened, _ = _open_refs(recipe, stack)
            members, base = _whole_model_inputs(recipe, opened)
            return plan_soup(members, **{**_soup_args(recipe), "base": base}, sources=members, base_source=base,
                             **options)
        plan, resolve, _, _ = _open_slices(recipe, stack)
        shared, members = resolve("")
        return plan_soup(plan.members, method=recipe.method, base=plan.base, params=shared, member_params=members,
                         dtype=recipe.dtype, accumulate=recipe.accumulate, sources=list(plan.members),
                         base_source=plan.base, resolve=resolve, **options)


def _merges_vocab(recipe: Recipe) -> bool:
    return recipe.tokenizer is not None and recipe.tokenizer.merges


def _whole_model_inputs(recipe: Recipe, opened: Mapping[str, object]) -> tuple[list, object]:
    """The members and base of a recipe without layer structure, as opened sources."""
    return [opened[m] for m in recipe.members], (opened[recipe.base] if recipe.base is not None else None)


def _check_tokenizer_output(recipe: Recipe, out: str | os.PathLike) -> None:
    """A merged tokenizer or a chat template needs a folder output to be written into (mergekit writes folders)."""
    from merge.soups import output_kind

    spec = recipe.tokenizer
    if spec is None or output_kind(out) == "folder":
        return
    if spec.source not in (None, "base") or spec.tokens or spec.pad_to_multiple_of or spec.chat_template:
        what = "chat_template" if spec.source is None else "tokenizer"
        raise InvalidArgumentError(f"output {out}: the recipe's {what} is written into a model folder beside the "
                                   "weights; write the output to a folder (a path without a suffix)", path=out,
                                   option="out")


def _finish_tokenizer(recipe: Recipe, vocab, opened: Mapping[str, object], out: Path,
                      files: list[Path]) -> dict[str, object] | None:
    """Write the output tokenizer (merged, or the donor's with the chat template) into folder ``out`` (its files
    appended to ``files``); what the recipe records about it."""
    from merge.vocab import TokenizerWarning, chat_template_text, load_tokenizer, write_tokenizer

    spec = recipe.tokenizer
    if spec is None or not out.is_dir():
        return None
    folders = [Path(src.path) for src in opened.values()]  # type: ignore[attr-defined]
    template = chat_template_text(spec.chat_template, folders) if spec.chat_template else None
    if vocab is not None:
        files += write_tokenizer(out, vocab.tokenizer, rows=vocab.rows, chat_template=template)
        return {"source": spec.source, "tokens": len(vocab.vocab), "rows": vocab.rows}
    if spec.chat_template is None:
        return None
    donor = Path(opened[spec.base or recipe.refs()[0]].path)  # type: ignore[attr-defined]
    try:
        tokenizer = load_tokenizer(donor)
    except Exception as e:  # noqa: BLE001 - mergekit logs it and keeps the merge
        warnings.warn(TokenizerWarning(f"{donor}: its tokenizer does not load ({type(e).__name__}); the chat "
                                       "template is not written"), stacklevel=3)
        return None
    files += write_tokenizer(out, tokenizer, rows=None, chat_template=template)
    return {"chat_template": spec.chat_template if len(spec.chat_template) < 80 else "literal"}


def _run_one(recipe: Recipe, out: str | os.PathLike, options: dict[str, object]):
    from merge.soups import soup

    extra = dict(options.pop("recipe_extra", None) or {})
    extra["recipe_file"] = recipe.record()
    _check_tokenizer_output(recipe, out)
    if not recipe.layered and recipe.tokenizer is None:
        return soup(recipe.members, out=out, recipe_extra=extra, **_soup_args(recipe), **options)
    _check_one_process(recipe, options)
    record: dict[str, object] = {}

    def folder_files(folder: Path) -> list[Path]:
        # Inside the unpublished output folder: published with the weights, or not at all.
        files = _rewrite_config(recipe, plan, opened, folder) if recipe.layered else []
        written = _finish_tokenizer(recipe, vocab, opened, folder, files)
        if written is not None:
            record["tokenizer"] = written
        return files

    with contextlib.ExitStack() as stack:
        plan = None
        if not recipe.layered:
            opened, vocab = _open_refs(recipe, stack)
            members, base = _whole_model_inputs(recipe, opened)
            result = soup(members, out=out, recipe_extra=extra, folder_files=folder_files,
                          **{**_soup_args(recipe), "base": base}, **options)
        else:
            plan, resolve, opened, vocab = _open_slices(recipe, stack)
            shared, members = resolve("")
            extra["layers"] = plan.num_layers
            result = soup(plan.members, out=out, method=recipe.method, base=plan.base, params=shared,
                          member_params=members, dtype=recipe.dtype, accumulate=recipe.accumulate, resolve=resolve,
                          recipe_extra=extra, folder_files=folder_files, **options)
        result.recipe.update(record)
        return result


def run_recipe(recipe: Recipe | str | os.PathLike, *, out: str | os.PathLike, **options: object):
    """Run a mergekit recipe through the same code as :func:`merge.soup`.

    A recipe with ``slices:`` or gradient parameters runs as a merge of :class:`merge.slices.SliceSource`
    members (one process). A multi-stage recipe runs its stages in order, each earlier one into a folder of a
    temporary directory beside ``out`` (``.NAME.stages-*``), removed at the end whether the run succeeds or
    fails; ``force`` applies to ``out`` only.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML file.
        out: as in :func:`merge.soup`.
        **options: :func:`merge.soup` options (``device``, ``seed``, ``force``, ``shard_size``, ``strict``, ...).

    Returns:
        The :class:`merge.soups.MergeResult` of the final stage; its recipe metadata records the file (path,
        sha256, text).

    Example:
        >>> import merge
        >>> merge.run_recipe("ties.yml", out="merged/")  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if not recipe.stages:
        return _run_one(recipe, out, dict(options))
    out = Path(out)
    from merge.soups import output_kind

    output_kind(out)  # a bad output suffix is refused before the first stage runs
    if out.exists() and not options.get("force"):
        from merge.io.atomic import check_output_free

        check_output_free(out, force=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.stages-", dir=out.parent))
    try:
        outputs: dict[str, str] = {}
        stage_options = {k: v for k, v in options.items() if k not in ("force", "recipe_extra", "verify")}
        for i, stage in enumerate(recipe.stages):
            target = work / f"stage{i}"  # not the stage's name: a name is not a safe path
            _run_one(_with_stage_outputs(stage, outputs), target, {**stage_options, "shard_size": "1TB"})
            outputs[str(stage.name)] = str(target)
        return _run_one(_with_stage_outputs(recipe, outputs), out, dict(options))
    finally:
        shutil.rmtree(work, ignore_errors=True)
