"""Recipe files in mergekit's YAML schema: ``papa-merge run recipe.yml -o out/``.

A mergekit user's config runs unchanged, for the methods papa-merge implements::

    merge_method: ties
    base_model: meta-llama/Llama-3.1-8B
    models:
      - model: org/math-ft
        parameters: {weight: 0.5, density: 0.5}
      - model: ./code-ft
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 0.4}]   # per-tensor, by name filter
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    out_dtype: bfloat16
    tokenizer_source: base

Read as mergekit reads it (``mergekit/config.py``, ``plan.py``): the model equal to ``base_model`` is
the base, the others are members; a base given to a method that takes none (``linear``,
``karcher``) is one more member, as mergekit adds it; per-model parameters win over global ones,
and a list of ``{filter, value}`` picks the first whose filter is a substring of the tensor name.
Model references are local paths when they exist, else Hub repositories (``hf://``).
``dtype`` is mergekit's compute dtype: papa-merge always computes in float32 (float64 when
``dtype: float64``), never in bfloat16/float16; ``out_dtype`` (else ``dtype``) is the output's.

What papa-merge does not do is refused by name, never ignored: ``slices`` and ``modules``
(layer-range stacking), gradient parameter lists (``density: [0.1, 0.5]``), ``tokenizer`` and
``tokenizer_source: union`` (tokenizer merging), ``chat_template``, LoRA references (``model+lora``),
and any key mergekit does not define.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import CheckpointNotFoundError, InvalidArgumentError
from merge.io.schemes import HF_PREFIX
from merge.ops import Operator, get_operator

__all__ = ["Recipe", "load_recipe", "run_recipe", "plan_recipe", "UnsupportedRecipeError", "SUPPORTED_KEYS", "preview",
           "MAX_RECIPE_BYTES", "MAX_VALUES"]

# Bounds that no real recipe comes near (mergekit's own examples are under 2 KB and 200 values), so that
# a hostile or mistaken file costs a bounded time and a one-line error of bounded length.
MAX_RECIPE_BYTES = 1 << 20
MAX_VALUES = 100_000  # scalars, lists and mappings once YAML aliases are expanded
MAX_DEPTH = 64  # nesting levels (a recipe uses about 6)
MAX_TEXT = 4096  # characters of a model reference (PATH_MAX) or a parameter's string value
PREVIEW_CHARS = 80  # of a value shown in an error message

SUPPORTED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_REFUSED = {
    "slices": "layer-range slices (stacking or frankenmerging layers) are not supported; merge whole models with "
              "'models:'",
    "modules": "per-module definitions are not supported; merge whole models with 'models:'",
    "tokenizer": "tokenizer merging is not supported; use 'tokenizer_source: base' (the base model's tokenizer)",
    "chat_template": "chat templates are not written; the base model's tokenizer files are carried over as they are",
}
_KNOWN_MERGEKIT = {"name", "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                   "tokenizer_source", "tokenizer", "chat_template", "slices", "modules"}


class UnsupportedRecipeError(InvalidArgumentError):
    """A recipe field papa-merge does not implement; ``field`` names it."""

    def __init__(self, message: str, *, field: str, **fields: object):
        self.field = field
        super().__init__(message, **fields)


@dataclass
class Recipe:
    """A parsed recipe: method, members, base, parameters and dtypes, as :func:`merge.soup` takes them."""

    method: str
    members: list[str]
    base: str | None
    params: dict[str, object]
    member_params: list[dict[str, object]]
    dtype: str | None
    accumulate: str
    path: Path | None = None
    text: str = ""
    conditional: bool = False
    notes: list[str] = field(default_factory=list)

    def resolve(self, tensor: str) -> tuple[dict[str, object], list[dict[str, object]]]:
        """Parameters for one tensor (``{filter, value}`` lists evaluated against its name)."""
        shared = {k: _pick(v, tensor) for k, v in self.params.items()}
        shared = {k: v for k, v in shared.items() if v is not None}
        members = []
        for mp in self.member_params:
            picked = {k: _pick(v, tensor) for k, v in mp.items()}
            members.append({k: v for k, v in picked.items() if v is not None})
        return shared, members

    def record(self) -> dict[str, object]:
        """What the merge's recipe metadata records about the file."""
        rec: dict[str, object] = {"format": "mergekit", "text": self.text}
        if self.path is not None:
            rec["path"] = str(self.path)
            rec["sha256"] = hashlib.sha256(self.text.encode()).hexdigest()
        return rec


def _pick(value: object, tensor: str) -> object:
    if isinstance(value, list):
        for cond in value:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor:
                return cond["value"]
        return None
    return value


def _scalar(key: str, value: object, where: str) -> object:
    """A parameter's scalar value as it is, if papa-merge can take it as a number, boolean or word."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            raise InvalidArgumentError(f"{where}: parameter {key!r}: {preview(value)} is out of range of any number "
                                       "papa-merge computes with") from None
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise InvalidArgumentError(f"{where}: parameter {key!r}: {preview(value)} is not a number or a method's word")
    return value


def _check_value(key: str, value: object, where: str) -> object:
    """A parameter value: a scalar, or a list of ``{filter, value}`` with scalar values."""
    if isinstance(value, (bool, int, float, str)):
        return _scalar(key, value, where)
    if isinstance(value, Mapping) and "value" in value:
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(v, (bool, int, float, str)) for v in value):
            raise UnsupportedRecipeError(
                f"{where}: parameter {key!r} is a gradient list {preview(value)}; gradients (values interpolated "
                "across layers) are not supported: give one value, or {filter, value} entries", field=f"{key} gradient")
        out = []
        for cond in value:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise InvalidArgumentError(f"{where}: parameter {key!r}: each entry of a list must be "
                                           f"{{filter: ..., value: ...}}, got {preview(cond)}")
            inner, flt = cond["value"], cond.get("filter")
            if isinstance(inner, list):
                raise UnsupportedRecipeError(
                    f"{where}: parameter {key!r} filter {preview(flt)} has a gradient list {preview(inner)}; "
                    "gradients are not supported", field=f"{key} gradient")
            if not isinstance(inner, (bool, int, float, str)):
                raise InvalidArgumentError(f"{where}: parameter {key!r}: value {preview(inner)} is not a number or "
                                           "boolean")
            if flt is not None and not (isinstance(flt, str) and len(flt) <= MAX_TEXT):
                raise InvalidArgumentError(f"{where}: parameter {key!r}: filter {preview(flt)} is not a piece of a "
                                           "tensor name; write it as a string (quoted if it looks like a number)")
            out.append({"filter": flt, "value": _scalar(key, inner, where)})
        return out
    raise InvalidArgumentError(f"{where}: parameter {key!r} has a value papa-merge cannot read: {preview(value)}")


def _params(raw: object, where: str) -> dict[str, object]:
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


def _model_ref(raw: object, where: str, folder: Path) -> str:
    """A mergekit model reference as a papa-merge checkpoint reference (local path or hf://)."""
    revision = None
    if isinstance(raw, Mapping):
        if raw.get("lora") is not None:
            raise UnsupportedRecipeError(f"{where}: LoRA adapters ('lora') are not supported; merge the adapter into "
                                         "its model first", field="lora")
        inner = raw.get("model", raw)
        if isinstance(inner, Mapping):
            revision = inner.get("revision")
            inner = inner.get("path")
        raw = inner
    if not isinstance(raw, str) or not raw or len(raw) > MAX_TEXT or "\0" in raw:
        raise InvalidArgumentError(f"{where}: model reference must be a path or a Hub repository, got {preview(raw)}")
    if revision is not None and not (isinstance(revision, str) and revision and len(revision) <= MAX_TEXT):
        raise InvalidArgumentError(f"{where}: revision must be a branch, tag or commit, got {preview(revision)}")
    if "+" in raw and not _exists(Path(raw)):
        raise UnsupportedRecipeError(f"{where}: {preview(raw)} names a LoRA adapter (model+lora), which is not "
                                     "supported; merge the adapter into its model first", field="lora")
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
                                  "(org/name)", path=raw)


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


def _read_yaml(path: str | os.PathLike | None, text: str | None, where: str) -> tuple[Mapping, str]:
    """The recipe's YAML mapping and its text.

    The document is composed first, its size with aliases expanded is counted, and only then is it built:
    YAML's aliases can make a 300-byte document describe billions of values.
    """
    import yaml

    if text is None:
        text = _read_text(path, where)
    elif len(text) > MAX_RECIPE_BYTES:
        raise InvalidArgumentError(f"{where}: larger than {MAX_RECIPE_BYTES >> 20} MiB, which no recipe is", path=path)
    loader = None
    try:
        loader = _loader()(text)  # the reader refuses control characters here already
        node = loader.get_single_node()
        if node is not None:
            _node_size(node, where, path)
        raw = None if node is None else loader.construct_document(node)
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
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"{where}: a recipe is a YAML mapping with merge_method and models, got "
                                   f"{preview(raw)}", path=path)
    return raw, text


def _check_fields(raw: Mapping, where: str, path: str | os.PathLike | None) -> None:
    """Refuse the fields papa-merge does not implement, each by name."""
    for key, reason in _REFUSED.items():
        if raw.get(key) is not None:
            raise UnsupportedRecipeError(f"{where}: '{key}' is not supported: {reason}", field=key, path=path)
    unknown = [k for k in raw if k not in _KNOWN_MERGEKIT]
    if unknown:
        raise UnsupportedRecipeError(f"{where}: unknown field {preview(unknown[0])}; papa-merge reads "
                                     f"{', '.join(SUPPORTED_KEYS)}", field=_clip(str(unknown[0])), path=path)
    tok = raw.get("tokenizer_source")
    if tok is not None and tok != "base":
        shown = _clip(tok) if isinstance(tok, str) else preview(tok)
        raise UnsupportedRecipeError(f"{where}: 'tokenizer_source: {shown}' is not supported (tokenizer "
                                     "merging); use 'tokenizer_source: base'", field="tokenizer_source", path=path)


def _read_models(models: list, base: str | None, where: str, folder: Path, path: str | os.PathLike | None,
                 ) -> tuple[list[str], list[dict[str, object]], dict[str, object]]:
    """The members and their parameters; the base's own entry (mergekit lists it among the models) apart."""
    members: list[str] = []
    member_params: list[dict[str, object]] = []
    base_params: dict[str, object] = {}
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise InvalidArgumentError(f"{where}: models[{i}] needs a 'model', got {preview(entry)}", path=path)
        extra = sorted(set(entry) - {"model", "parameters"}, key=str)
        if extra:
            raise UnsupportedRecipeError(f"{where}: models[{i}]: unknown field {preview(extra[0])}",
                                         field=_clip(str(extra[0])), path=path)
        ref = _model_ref(entry["model"], f"{where}: models[{i}]", folder)
        p = _params(entry.get("parameters"), f"{where}: models[{i}]")
        if base is not None and ref == base:
            base_params = p
            continue
        members.append(ref)
        member_params.append(p)
    return members, member_params, base_params


def _spread_params(op: Operator, params: dict[str, object], member_params: list[dict[str, object]],
                   where: str) -> list[dict[str, object]]:
    """Each member's parameters: a per-member parameter given globally applies to each member unless the
    member sets its own; a shared one set on a member is refused (mergekit reads those globally only)."""
    per_member = {p.name for p in op.params if p.per_member}
    member_params = [{k: v for k, v in mp.items()} for mp in member_params]
    for k in [k for k in params if k in per_member]:
        v = params.pop(k)
        for mp in member_params:
            mp.setdefault(k, v)
    shared = {p.name for p in op.params if not p.per_member}
    for i, mp in enumerate(member_params):
        for k in [k for k in mp if k in shared]:
            raise InvalidArgumentError(f"{where}: models[{i}]: parameter {k!r} of {op.name} is shared by all models; "
                                       "set it under the global 'parameters'", option=k)
    return member_params


def load_recipe(path: str | os.PathLike | None = None, *, text: str | None = None) -> Recipe:
    """Parse a mergekit YAML recipe (a file, or its ``text``), refusing what papa-merge does not implement.

    Raises:
        UnsupportedRecipeError: a field papa-merge does not implement (``slices``, ``modules``, gradient
            lists, ``tokenizer``, ``tokenizer_source: union``, ``chat_template``, LoRA); ``field`` names it.
        InvalidArgumentError: not a recipe (unknown keys, missing ``merge_method`` or ``models``, bad values).
        UnknownNameError: a method papa-merge does not have (the message lists those it has).

    Example:
        >>> load_recipe(text="merge_method: linear\\nmodels:\\n  - model: a.safetensors\\n"
        ...                  "  - model: b.safetensors\\n").method  # doctest: +SKIP
        'linear'
    """
    where = str(path) if path is not None else "recipe"
    raw, text = _read_yaml(path, text, where)
    _check_fields(raw, where, path)
    method = raw.get("merge_method")
    if method is None:
        raise InvalidArgumentError(f"{where}: 'merge_method' is missing", path=path)
    if not isinstance(method, str):
        raise InvalidArgumentError(f"{where}: 'merge_method' must be a method's name, got {preview(method)}", path=path)
    op = get_operator(_clip(method))  # a name too long to be one is refused by its start
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidArgumentError(f"{where}: 'models' must list the models to merge, got {preview(models)}",
                                   path=path)
    folder = Path(path).parent if path is not None else Path(".")
    base = _model_ref(raw["base_model"], f"{where}: base_model", folder) if raw.get("base_model") else None
    members, member_params, base_params = _read_models(models, base, where, folder, path)
    notes = []
    if base is not None and op.base == "none":
        # mergekit adds the base model to the inputs of a method that has no use for one
        members.append(base)
        member_params.append(base_params)
        base = None
        notes.append("base_model is one more member of this method, as in mergekit")
    params = _params(raw.get("parameters"), f"{where}: parameters")
    member_params = _spread_params(op, params, member_params, where)
    conditional = any(isinstance(v, list) for v in params.values()) or any(
        isinstance(v, list) for mp in member_params for v in mp.values())
    dtype, out_dtype = raw.get("dtype"), raw.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and not (isinstance(value, str) and len(value) <= PREVIEW_CHARS):
            raise InvalidArgumentError(f"{where}: {key!r} must name a dtype (float32, bfloat16, ...), got "
                                       f"{preview(value)}", path=path)
    accumulate = "float64" if str(dtype).lower() in ("float64", "fp64", "double") else "float32"
    return Recipe(method, members, base, params, member_params,
                  out_dtype or dtype, accumulate, Path(path) if path is not None else None, text, conditional, notes)


def _soup_args(recipe: Recipe) -> dict[str, object]:
    scalar_members = [{k: v for k, v in mp.items()} for mp in recipe.member_params]
    args: dict[str, object] = dict(method=recipe.method, base=recipe.base, dtype=recipe.dtype,
                                   accumulate=recipe.accumulate)
    if recipe.conditional:
        args["resolve"] = recipe.resolve
        shared, members = recipe.resolve("")
        args["params"], args["member_params"] = shared, members
    else:
        args["params"], args["member_params"] = dict(recipe.params), scalar_members
    return args


def plan_recipe(recipe: Recipe | str | os.PathLike, **options: object):
    """Validate a recipe against its models without writing (``papa-merge run --dry-run``)."""
    from merge.soups import plan_soup

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return plan_soup(recipe.members, **_soup_args(recipe), **options)


def run_recipe(recipe: Recipe | str | os.PathLike, *, out: str | os.PathLike, **options: object):
    """Run a mergekit recipe through the same code as :func:`merge.soup`.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML file.
        out: as in :func:`merge.soup`.
        **options: :func:`merge.soup` options (``device``, ``seed``, ``force``, ``shard_size``, ``strict``, ...).

    Returns:
        The :class:`merge.soups.MergeResult`; its recipe metadata records the file (path, sha256, text).

    Example:
        >>> import merge
        >>> merge.run_recipe("ties.yml", out="merged/")  # doctest: +SKIP
    """
    from merge.soups import soup

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    extra = dict(options.pop("recipe_extra", None) or {})
    extra["recipe_file"] = recipe.record()
    return soup(recipe.members, out=out, recipe_extra=extra, **_soup_args(recipe), **options)
