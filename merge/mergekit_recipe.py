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

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import CheckpointNotFoundError, InvalidArgumentError
from merge.io.schemes import HF_PREFIX
from merge.ops import Operator, get_operator

__all__ = ["Recipe", "load_recipe", "run_recipe", "plan_recipe", "UnsupportedRecipeError", "SUPPORTED_KEYS"]

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


def _check_value(key: str, value: object, where: str) -> object:
    """A parameter value: a scalar, or a list of ``{filter, value}`` with scalar values."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping) and "value" in value:
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(v, (bool, int, float, str)) for v in value):
            raise UnsupportedRecipeError(
                f"{where}: parameter {key!r} is a gradient list {value}; gradients (values interpolated across "
                "layers) are not supported: give one value, or {filter, value} entries", field=f"{key} gradient")
        out = []
        for cond in value:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise InvalidArgumentError(f"{where}: parameter {key!r}: each entry of a list must be "
                                           f"{{filter: ..., value: ...}}, got {cond!r}")
            inner = cond["value"]
            if isinstance(inner, list):
                raise UnsupportedRecipeError(
                    f"{where}: parameter {key!r} filter {cond.get('filter')!r} has a gradient list {inner}; "
                    "gradients are not supported", field=f"{key} gradient")
            if not isinstance(inner, (bool, int, float, str)):
                raise InvalidArgumentError(f"{where}: parameter {key!r}: value {inner!r} is not a number or boolean")
            out.append({"filter": cond.get("filter"), "value": inner})
        return out
    raise InvalidArgumentError(f"{where}: parameter {key!r} has a value papa-merge cannot read: {value!r}")


def _params(raw: object, where: str) -> dict[str, object]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"{where}: 'parameters' must be a mapping of name: value, got {raw!r}")
    return {str(k): _check_value(str(k), v, where) for k, v in raw.items()}


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
    if not isinstance(raw, str) or not raw:
        raise InvalidArgumentError(f"{where}: model reference must be a path or a Hub repository, got {raw!r}")
    if "+" in raw and not Path(raw).exists():
        raise UnsupportedRecipeError(f"{where}: {raw!r} names a LoRA adapter (model+lora), which is not supported; "
                                     "merge the adapter into its model first", field="lora")
    if raw.startswith(HF_PREFIX):
        return raw
    local = Path(raw).expanduser()
    if not local.exists() and not local.is_absolute() and (folder / local).exists():
        local = folder / local  # mergekit resolves paths from the working directory; then the recipe's folder
    if local.exists():
        return str(local)
    if raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
        return f"{HF_PREFIX}{raw}" + (f"@{revision}" if revision else "")
    raise CheckpointNotFoundError(f"{where}: model {raw!r} is neither a local path nor a Hub repository (org/name)",
                                  path=raw)


def _read_yaml(path: str | os.PathLike | None, text: str | None, where: str) -> tuple[Mapping, str]:
    """The recipe's YAML mapping and its text."""
    import yaml

    if text is None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: no such recipe file", path=path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"{where}: not valid YAML ({str(e).splitlines()[0]})", path=path) from None
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError(f"{where}: a recipe is a YAML mapping with merge_method and models", path=path)
    return raw, text


def _check_fields(raw: Mapping, where: str, path: str | os.PathLike | None) -> None:
    """Refuse the fields papa-merge does not implement, each by name."""
    for key, reason in _REFUSED.items():
        if raw.get(key) is not None:
            raise UnsupportedRecipeError(f"{where}: '{key}' is not supported: {reason}", field=key, path=path)
    unknown = [k for k in raw if k not in _KNOWN_MERGEKIT]
    if unknown:
        raise UnsupportedRecipeError(f"{where}: unknown field {unknown[0]!r}; papa-merge reads "
                                     f"{', '.join(SUPPORTED_KEYS)}", field=str(unknown[0]), path=path)
    tok = raw.get("tokenizer_source")
    if tok is not None and tok != "base":
        raise UnsupportedRecipeError(f"{where}: 'tokenizer_source: {tok}' is not supported (tokenizer merging); "
                                     "use 'tokenizer_source: base'", field="tokenizer_source", path=path)


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
            raise InvalidArgumentError(f"{where}: models[{i}] needs a 'model'", path=path)
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise UnsupportedRecipeError(f"{where}: models[{i}]: unknown field {sorted(extra)[0]!r}",
                                         field=sorted(extra)[0], path=path)
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
    if not isinstance(method, str):
        raise InvalidArgumentError(f"{where}: 'merge_method' is missing", path=path)
    op = get_operator(method)
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidArgumentError(f"{where}: 'models' must list the models to merge", path=path)
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
