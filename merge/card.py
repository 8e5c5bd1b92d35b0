"""The model card (README.md) of a checkpoint: facts read from its metadata, then sections, then YAML.

One card for both places a merged model lives: ``papa-merge soup -o folder/`` writes it into the
folder, and ``papa-merge push`` writes it into the repo (with the repo's name in the loading snippets).
A card papa-merge wrote ends with a marker holding the hash of its text, so ``push`` can tell a card
it may regenerate for the repo from one the user has edited (which is uploaded as is).

Example:
    >>> from merge.card import model_card
    >>> print(model_card("soup.safetensors", repo_id="org/my-soup"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from merge.io import schemes
from merge.io.formats import CARD_FILE, INDEX_SUFFIX, PICKLE_FILE, SAFETENSORS_SUFFIX, SINGLE_FILE, WEIGHT_SUFFIXES
from merge.io.schemes import HF_PREFIX, is_repo_id
from merge.keys import DATA_KEY, METRICS_KEY, MODEL_KEY, RECIPE_KEY

__all__ = ["model_card", "write_card", "is_generated_card", "recipe_members", "weight_file_name"]

_SOUP_METHODS = {"uniform", "weighted", "greedy", "papa", "average"}
_MARKER = "<!-- papa-merge model card, sha256:{} (an edited card is pushed as is) -->"
_MARKER_RE = re.compile(r"\n<!-- papa-merge model card, sha256:([0-9a-f]{64}) "
                        r"\(an edited card is pushed as is\) -->\n?$")


def weight_file_name(path: str | os.PathLike) -> str:
    """The name a single checkpoint file is stored under in a repo: ``model.safetensors`` (or ``pytorch_model.bin``).

    Example:
        >>> weight_file_name("runs/soup.safetensors"), weight_file_name("averaged.pth")
        ('model.safetensors', 'pytorch_model.bin')
    """
    return SINGLE_FILE if Path(path).suffix == SAFETENSORS_SUFFIX else PICKLE_FILE


def is_generated_card(text: str) -> bool:
    """Whether README text is a card papa-merge wrote and nobody edited since (its hash still matches)."""
    m = _MARKER_RE.search(text)
    return bool(m) and hashlib.sha256(text[:m.start()].encode()).hexdigest() == m.group(1)


def _sign(text: str) -> str:
    return text + "\n" + _MARKER.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


@dataclass
class _Facts:
    """What the card says, read once from the checkpoint."""

    name: str
    folder: bool
    n_tensors: int
    n_bytes: int
    config: dict
    recipe: dict
    metrics: object
    model_spec: dict | None
    data_spec: dict | None
    weight_files: list[str]
    sources: list[str] = field(default_factory=list)
    library: str | None = None
    pipeline_tag: str | None = None


def _json_meta(meta: dict[str, str], key: str) -> object:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _repo_of(reference: str) -> str:
    """``org/name`` of ``hf://org/name[@rev][/path]``."""
    body = reference[len(HF_PREFIX):] if reference.startswith(HF_PREFIX) else reference
    body = body.split("@", 1)[0]
    return "/".join(body.split("/")[:2])


def _looks_like_repo(name: object) -> bool:
    return is_repo_id(name, org_required=True)


def _facts(path: Path, weights_name: str | None, name: str | None = None) -> _Facts:
    from merge.backend.arrays import NeedsTorch
    from merge.io.sources import open_checkpoint

    try:  # the header is all a card needs: torch only for a pickle
        src = open_checkpoint(path, numpy=True)
    except NeedsTorch:
        src = open_checkpoint(path)
    with src:
        meta = dict(src.metadata)
        n_tensors, n_bytes = len(src.infos), src.nbytes
        files = [f.name for f in src.files]
    folder = path.is_dir()
    config: dict = {}
    if folder and (path / "config.json").is_file():
        try:
            loaded = json.loads((path / "config.json").read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            config = {}
    if folder:
        index = [f.name for f in path.iterdir() if f.name.endswith(INDEX_SUFFIX)]
        weight_files = sorted(index) + sorted(files)
    else:
        weight_files = [weights_name or weight_file_name(path)]
    recipe = _json_meta(meta, RECIPE_KEY)
    spec = _json_meta(meta, MODEL_KEY)
    data = _json_meta(meta, DATA_KEY)
    f = _Facts(name=name or (path.name if folder else path.stem), folder=folder, n_tensors=n_tensors, n_bytes=n_bytes,
               config=config, recipe=recipe if isinstance(recipe, dict) else {},
               metrics=_json_meta(meta, METRICS_KEY), model_spec=spec if isinstance(spec, dict) else None,
               data_spec=data if isinstance(data, dict) else None, weight_files=weight_files)
    f.sources += [_source_of(m) for m in f.recipe.get("members") or []]
    arch = str((f.model_spec or {}).get("arch", ""))
    architectures = config.get("architectures") or []
    if "model_type" in config or architectures:
        f.library = "transformers"
        if any(str(a).endswith("ForSequenceClassification") for a in architectures):
            f.pipeline_tag = "text-classification"
    elif "architecture" in config or arch.startswith("timm:"):
        f.library = "timm"
        f.pipeline_tag = "image-classification"
    elif arch.startswith("hf:"):
        f.library = "transformers"
    return f


def _front_matter(f: _Facts, repo_id: str | None) -> str:
    from huggingface_hub import ModelCardData

    base_models = [_repo_of(s) for s in f.sources if s.startswith(HF_PREFIX)]
    name_or_path = f.config.get("_name_or_path")
    if not base_models and _looks_like_repo(name_or_path):
        base_models.append(name_or_path)
    base_models = [b for b in dict.fromkeys(base_models) if b != repo_id]
    tags = ["merge", "papa-merge"]
    if f.recipe.get("method") in _SOUP_METHODS:
        tags.append("model-soup")
    tags.append("safetensors" if all(w.endswith((SAFETENSORS_SUFFIX, ".json")) for w in f.weight_files) else "pytorch")
    data = ModelCardData(base_model=base_models or None, library_name=f.library, pipeline_tag=f.pipeline_tag,
                         tags=tags, base_model_relation="merge" if len(base_models) > 1 else None)
    return "---\n" + data.to_yaml() + "\n---\n"


def _fmt(x: object) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _what_it_is(f: _Facts) -> list[str]:
    recipe = f.recipe
    if recipe:
        n = len(recipe.get("members") or [])
        version = recipe.get("version", "")
        lines = [f"This checkpoint is a **{recipe.get('method')}** merge of {n} checkpoint{'s' if n != 1 else ''}, "
                 f"made with papa-merge {version}.".replace("  ", " ")]
        if recipe.get("citation"):
            lines += ["", f"Method: {recipe['citation']}"]
    else:
        lines = ["This checkpoint's metadata holds no merge recipe."]
    weights = f.weight_files
    if len(weights) == 1:
        where = f"`{weights[0]}`"
    elif weights and weights[0].endswith(INDEX_SUFFIX):
        where = f"`{weights[0]}` and the {len(weights) - 1} shards it lists"
    else:
        where = ", ".join(f"`{w}`" for w in weights)
    lines += ["", f"The model is {where}: {f.n_tensors} tensor{'s' if f.n_tensors != 1 else ''}, "
                  f"{f.n_bytes / 1e6:.2f} MB of weights."]
    if f.model_spec is not None:
        lines += ["", f"Model: `{json.dumps(f.model_spec, sort_keys=True)}`"]
    if f.data_spec is not None and f.data_spec.get("dataset"):
        lines += ["", f"Trained on: `{f.data_spec['dataset']}`"]
    return lines


def _shares(weights: list) -> list[float]:
    """Each weight's share of their sum, scaled by the largest magnitude first: 1e308, 1e308 are halves, not 0."""
    w = []
    for x in weights:
        try:
            w.append(float(x))
        except (TypeError, ValueError):  # a recipe read from someone's file: shown as nan, not a traceback
            w.append(math.nan)
    top = max((abs(x) for x in w if math.isfinite(x)), default=0.0) or 1.0
    scaled = [x / top for x in w]
    total = math.fsum(x for x in scaled if math.isfinite(x)) or 1.0
    return [x / total for x in scaled]


def recipe_members(recipe: dict) -> list[tuple[str, float]]:
    """Each member of a recorded recipe as ``(name, weight)``: its file name (or ``hf://`` source), weights summing
    to 1.

    Example:
        >>> recipe_members({"members": [{"path": "/r/a.safetensors"}, {"path": "b/"}], "weights": [3, 1]})
        [('a.safetensors', 0.75), ('b', 0.25)]
    """
    members = recipe.get("members") or []
    weights = _shares(recipe.get("weights") or [1.0] * len(members))
    out = []
    for i, m in enumerate(members):
        p = str(m.get("source") or m.get("path", "?")) if isinstance(m, dict) else str(m)
        if not p.startswith(HF_PREFIX):
            p = schemes.describe(p) or PurePosixPath(p.replace(os.sep, "/").rstrip("/")).name
        out.append((p, weights[i] if i < len(weights) else 0.0))
    return out


def _member_row(label: str, m: object, source: str, weight: str) -> str:
    """One row of the recipe table: the member's public name, where it came from, its weight."""
    # A file's content hash where the recipe has one (pickles); a safetensors header hash is not one.
    digest = str(m.get("sha256") or "")[:12] if isinstance(m, dict) else ""
    if source.startswith(HF_PREFIX):
        name, kind = source, "Hub"
    else:
        name = PurePosixPath(source.replace(os.sep, "/").rstrip("/")).name or source
        fmt = m.get("format") if isinstance(m, dict) else None
        folder = fmt == "sharded" or not name.endswith(WEIGHT_SUFFIXES)
        kind = "local folder" if folder else "local file"
    return f"| {label} | `{name}` | {kind}{f' (sha256 {digest}...)' if digest else ''} | {weight} |"


def _source_of(m: object) -> str:
    p = str(m.get("source") or m.get("path", "?")) if isinstance(m, dict) else str(m)
    return p if p.startswith(HF_PREFIX) else (schemes.describe(p) or p)


def _recipe_section(f: _Facts) -> list[str]:
    recipe = f.recipe
    if not recipe:
        return []
    members = recipe.get("members") or []
    weights = _shares(recipe.get("weights") or [1.0] * len(members))
    lines = ["## Recipe", "", "| # | member | source | weight |", "|---|---|---|---|"]
    for i, (m, s) in enumerate(zip(members, f.sources)):
        lines.append(_member_row(str(i), m, s, f"{weights[i]:.4g}" if i < len(weights) else "?"))
    if recipe.get("base"):
        lines.append(_member_row("base", recipe["base"], _source_of(recipe["base"]), "(base)"))
    lines += ["", f"- method: `{recipe.get('method')}`"]
    params = recipe.get("parameters")
    if isinstance(params, dict) and params:
        lines.append("- parameters: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(params.items())))
    if "coefficients" in recipe:
        lines.append(f"- coefficients: `{json.dumps(recipe['coefficients'])}`")
    if "seed" in recipe:
        lines.append(f"- seed: `{recipe['seed']}`")
    lines += [f"- output dtype: `{recipe.get('dtype', 'as input')}`, "
              f"accumulated in `{recipe.get('accumulate', 'float32')}`"]
    if isinstance(recipe.get("processes"), int) and recipe["processes"] > 1:
        lines.append(f"- merged by {recipe['processes']} processes, split by tensors (the same bits as one process)")
    if recipe.get("skipped"):
        lines.append(f"- skipped tensors: {', '.join(f'`{s}`' for s in recipe['skipped'][:20])}")
    if recipe.get("copied_from_first"):
        lines.append(f"- copied from member 0: {', '.join(f'`{s}`' for s in recipe['copied_from_first'][:20])}")
    for k in ("selection", "order", "val_metric", "metric"):
        if k in recipe:
            lines.append(f"- {k}: `{json.dumps(recipe[k])}`")
    return lines


def _metrics_section(f: _Facts) -> list[str]:
    if not isinstance(f.metrics, dict):
        return []
    splits = {k: v for k, v in f.metrics.items() if isinstance(v, dict)}
    if not splits:
        return []
    keys: list[str] = []
    for v in splits.values():
        keys += [k for k in v if k not in keys]
    order = [k for k in ("acc", "nll", "ece") if k in keys] + [k for k in keys if k not in ("acc", "nll", "ece")]
    lines = ["## Metrics", "", "| split | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for split, v in splits.items():
        lines.append(f"| {split} | " + " | ".join(_fmt(v.get(k, "")) for k in order) + " |")
    return lines


def _timm_overlay(f: _Facts) -> str | None:
    """``pretrained_cfg_overlay`` arguments for a timm model stored as one file (no config.json beside it)."""
    spec = f.model_spec or {}
    arch = str(spec.get("arch", ""))
    if not arch.startswith("timm:"):
        return None
    pre = (f.data_spec or {}).get("preprocessing") or {}
    chans = int(spec.get("in_chans") or 3)
    size = spec.get("image_size") or pre.get("image_size")
    parts = [f"num_classes={spec.get('num_classes')}"]
    if size:
        parts.append(f"input_size=({chans}, {int(size)}, {int(size)})")
    elif chans != 3:
        parts.append(f"in_chans={chans}")
    return ", ".join(parts)


def _usage(f: _Facts, repo_id: str | None, shown_as: str) -> list[str]:
    """How to load it: with the library its config names, from the repo (or, for a local card, the path)."""
    where = repo_id or shown_as
    spec_arch = str((f.model_spec or {}).get("arch", ""))
    lines = ["## Usage", ""]
    if f.library == "transformers" and f.folder:
        if f.pipeline_tag == "text-classification":
            lines += ["```python",
                      "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
                      "", f"model = AutoModelForSequenceClassification.from_pretrained({where!r})",
                      f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
                      f"classifier = pipeline('text-classification', model={where!r})", "```"]
        else:
            lines += ["```python", "from transformers import AutoModel", "",
                      f"model = AutoModel.from_pretrained({where!r})", "```"]
    elif f.library == "timm" and f.folder and f.config:
        source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{shown_as}"
        lines += ["```python", "import timm", "", f"model = timm.create_model({source!r}, pretrained=True)", "```"]
    else:
        fname = f.weight_files[0] if f.weight_files else SINGLE_FILE
        if repo_id:
            file_expr = f"hf_hub_download({repo_id!r}, {fname!r})"
            imports = ["from huggingface_hub import hf_hub_download"]
        else:
            file_expr = repr(shown_as if not f.folder else f"{shown_as}/{fname}")
            imports = []
        overlay = _timm_overlay(f)
        if overlay is not None:
            lines += ["```python", "import timm", *imports, "",
                      f"model = timm.create_model({spec_arch[5:]!r}, pretrained=True,",
                      f"                          pretrained_cfg_overlay=dict(file={file_expr}, {overlay}))", "```"]
        elif f.model_spec is not None:
            ref = f"hf://{repo_id}" if repo_id else shown_as
            lines += ["```python", "from merge.models import load_member  # pip install papa-merge", "",
                      f"model, metadata = load_member({ref!r})  # the network, in eval mode, with these weights",
                      "```"]
        elif fname.endswith(INDEX_SUFFIX):  # a sharded folder: every shard its index lists
            lines += _sharded_snippet(fname, repo_id, shown_as)
        elif not fname.endswith(SAFETENSORS_SUFFIX):
            lines += ["```python", "import torch", *imports, "",
                      f"state_dict = torch.load({file_expr}, weights_only=True)",
                      "model.load_state_dict(state_dict)  # your model's architecture", "```"]
        else:
            lines += ["```python", *imports, "from safetensors.torch import load_file", "",
                      f"state_dict = load_file({file_expr})",
                      "model.load_state_dict(state_dict)  # your model's architecture", "```"]
    ref = f"hf://{repo_id}" if repo_id else shown_as
    lines += ["", f"Or merge it further: `papa-merge soup {ref} ... -o soup.safetensors`."]
    return lines


def _sharded_snippet(index: str, repo_id: str | None, shown_as: str) -> list[str]:
    """Loading a sharded checkpoint without papa-merge: the index names the shard of every tensor."""
    if repo_id:
        head = ["from huggingface_hub import snapshot_download", "",
                f"folder = Path(snapshot_download({repo_id!r}))"]
    else:
        head = ["", f"folder = Path({shown_as!r})"]
    if index.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX):
        imports, load = ["from safetensors.torch import load_file"], "load_file(folder / shard)"
    else:
        imports, load = ["import torch"], "torch.load(folder / shard, weights_only=True)"
    return ["```python", "import json", "from pathlib import Path", "", *imports, *head,
            f"index = json.loads((folder / {index!r}).read_text())",
            "state_dict = {}",
            "for shard in sorted(set(index['weight_map'].values())):",
            f"    state_dict.update({load})",
            "model.load_state_dict(state_dict)  # your model's architecture", "```"]


def _checkpoints_section(checkpoints: Sequence[str], repo_id: str | None) -> list[str]:
    rid = repo_id or "org/name"
    lines = ["## Checkpoints in this repo", "",
             f"This repo holds {len(checkpoints)} checkpoints side by side; name the one you want, e.g. "
             f"`hf://{rid}/{checkpoints[0]}`:", ""]
    lines += [f"- `{c}`" for c in checkpoints]
    return lines


def model_card(path: str | os.PathLike, *, repo_id: str | None = None, weights_name: str | None = None,
               checkpoints: Sequence[str] | None = None, shown_as: str | None = None) -> str:
    """The README.md (model card) for a checkpoint, built from its ``papa_merge.*`` metadata.

    The YAML front matter (written by huggingface_hub's ``ModelCardData``) holds ``base_model`` (the
    members that came from the Hub, or the config's ``_name_or_path``), ``library_name`` and
    ``pipeline_tag`` (``transformers``/``timm`` when a config or the model metadata says so) and
    ``tags``. The body says which file is the model, records the recipe (method, each member with its
    source and weight, dtypes), the metrics from ``papa_merge.metrics``, how to load it with the
    library it belongs to, and the full recipe as JSON. It ends with a marker that lets
    :func:`is_generated_card` tell it from a card the user has edited.

    Args:
        path: the checkpoint: a ``.safetensors`` file or a model folder.
        repo_id: the repo it will live in (title and loading snippets); None for a local card.
        weights_name: the name a single file is stored under (default :func:`weight_file_name`).
        checkpoints: every checkpoint file the repo revision will hold, when it holds several side by
            side (``push(keep_existing=True)``); the card lists them.
        shown_as: the path shown in a local card's loading snippets (default: ``path``).

    Returns:
        The README.md text.

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: ``path`` is not a readable checkpoint.

    Example:
        >>> print(model_card("soup/")[:3])  # doctest: +SKIP
        ---
    """
    path = Path(path)
    shown = schemes.public_name(shown_as or str(path))  # a card is published: no absolute local path in it
    f = _facts(path, weights_name, name=Path(shown_as).name if shown_as else None)
    sections = [[f"# {repo_id or f.name}", "", *_what_it_is(f)], _recipe_section(f), _metrics_section(f)]
    if checkpoints and len(checkpoints) > 1:
        sections.append(_checkpoints_section(checkpoints, repo_id))
    sections.append(_usage(f, repo_id, shown))
    if f.recipe:
        sections.append(["<details><summary>Full recipe (<code>papa_merge.recipe</code> metadata)</summary>", "",
                         "```json", json.dumps(_public(f.recipe), indent=2, sort_keys=True), "```", "",
                         "</details>"])
    body = "\n\n".join("\n".join(s) for s in sections if s)
    return _sign(_front_matter(f, repo_id) + "\n" + body + "\n")


def _public(value: object) -> object:
    """The recipe as a card shows it: every absolute local path replaced by its public name (hf://..., relative)."""
    return schemes.public_record(value)


def write_card(folder: str | os.PathLike, *, shown_as: str | None = None) -> Path | None:
    """Write ``folder/README.md`` (the card :func:`model_card` builds) unless the folder already has one.

    ``papa-merge soup -o folder/`` calls this on its complete output, so a merged folder carries the
    same card ``push`` would upload (``push`` regenerates it with the repo's name).

    Args:
        folder: a complete model folder.
        shown_as: the folder's path as the user named it (title and loading snippets).

    Returns:
        The README.md written, or None when one was there.
    """
    readme = Path(folder) / CARD_FILE
    if readme.exists():
        return None
    readme.write_text(model_card(folder, shown_as=shown_as))
    return readme
