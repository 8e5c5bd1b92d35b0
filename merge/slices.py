"""Layer slices of mergekit recipes: stacking, repeating and renumbering transformer layers, streamed.

A recipe's ``slices:`` list builds the output's layers slice by slice; each slice takes the same number of
consecutive layers (``layer_range: [a, b]``, ``b`` excluded) from each of its sources and merges them layer by
layer. A frankenmerge stacks slices of one source each (``passthrough``). mergekit plans it that way
(``mergekit/plan.py``: ``plan_module``, ``plan_slice``, ``plan_layer``); here the plan becomes names only: each
member of the merge is a :class:`SliceSource` that presents the output's tensor names, each one read from the
tensor of a source model it stands for, so the streaming engine runs a slice merge like any other merge.

Layers are read from the tensor names (``model.layers.N.``, ``transformer.h.N.``, ``blocks.N.``, ...), not from a
table per architecture. Tensors outside the layers follow mergekit's rules: the embeddings (``pre`` weights)
come from the first slice's sources, everything else outside the layers (final norm, head: ``post`` weights)
from the last slice's; both are merged with the gradient position ``t = 0``, as mergekit 0.1.5 does (its
``plan_module`` evaluates both with the module's reader at ``t=0``). A layer's position is ``t = i / (n - 1)``
for layer ``i`` of an ``n``-layer slice (``t = 1`` when the slice has one layer).

Example:
    >>> layout_of(["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight",
    ...            "model.norm.weight"]).num_layers
    2
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import InvalidArgumentError
from merge.io.sources import Source, TensorInfo

__all__ = ["LayerLayout", "layout_of", "SliceSource", "SliceInput", "SlicePlan", "TensorPlace", "plan_slices",
           "layer_position", "rewrite_layer_config", "LAYER_COUNT_KEYS"]

# ``<prefix><container>.<index>.<rest>``: the first numbered container of a known name is the layer stack
# (``model.layers.3.``, ``transformer.h.3.``, ``blocks.3.``, ``gpt_neox.layers.3.``, ``encoder.layer.3.``).
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|blocks|block)\.)(?P<index>\d+)\.(?P<rest>.+)$")
# Tensors outside the layers that mergekit's architectures list before them (``pre_weights``): embeddings.
_PRE_RE = re.compile(r"(^|\.)(embed_tokens|embed|embeddings|wte|wpe|tok_embeddings|word_embeddings|"
                     r"embed_in|position_embeddings)(\.|$)")
# Keys of a transformers config.json that hold the layer count (mergekit's ``num_layers_config_key``).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerLayout:
    """The layer structure of a checkpoint, read from its tensor names.

    ``prefix`` is the layer stack's prefix (``model.layers.``); ``layers[i]`` the names of layer ``i`` after
    ``prefix + str(i) + "."``; ``pre`` and ``post`` the tensors outside the layers (embeddings; the rest).
    """

    prefix: str | None
    layers: list[list[str]]
    pre: list[str]
    post: list[str]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def name(self, layer: int, rest: str) -> str:
        return f"{self.prefix}{layer}.{rest}"


def layout_of(names: Sequence[str], *, where: str = "model") -> LayerLayout:
    """The :class:`LayerLayout` of a checkpoint with tensors ``names``.

    Raises:
        InvalidArgumentError: the names hold two layer stacks (a vision tower beside the language model:
            mergekit needs ``modules:`` for those) or a stack with a gap in its numbering.
    """
    found = [(m, n) for n in names if (m := _LAYER_RE.match(n))]
    prefixes = Counter(m.group("prefix") for m, _ in found)
    if len(prefixes) > 1:
        shown = ", ".join(f"{p}N. ({c} tensors)" for p, c in prefixes.most_common(3))
        raise InvalidArgumentError(f"{where}: holds several layer stacks ({shown}); slicing layers needs one "
                                   "(mergekit's 'modules:' for multi-module models is not supported)")
    prefix = next(iter(prefixes), None)
    by_layer: dict[int, list[str]] = {}
    for m, _ in found:
        by_layer.setdefault(int(m.group("index")), []).append(m.group("rest"))
    if by_layer and sorted(by_layer) != list(range(len(by_layer))):
        missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
        raise InvalidArgumentError(f"{where}: its layers {prefix}N. skip numbers ({missing[:5]}); a layer stack is "
                                   "numbered 0, 1, 2, ...")
    inside = {n for _, n in found}
    outside = [n for n in names if n not in inside]
    return LayerLayout(prefix, [by_layer[i] for i in range(len(by_layer))],
                       [n for n in outside if _PRE_RE.search(n)], [n for n in outside if not _PRE_RE.search(n)])


def layer_position(index: int, count: int) -> float:
    """mergekit's gradient position of layer ``index`` of a slice of ``count`` layers (``plan_slice``)."""
    return index / (count - 1) if count > 1 else 1.0


class SliceSource(Source):
    """A member of a slice merge: output tensor names, each read from one tensor of an underlying source.

    Args:
        parts: ``output name -> (source, input name)``, in output order.
        label: what the recipe records about it (the models and layer ranges it stands for).
    """

    kind = "slices"

    def __init__(self, parts: dict[str, tuple[Source, str]], *, label: list[dict[str, object]]):
        self._parts = parts
        self._label = label
        owners = list(dict.fromkeys(src for src, _ in parts.values()))
        first = owners[0] if owners else None
        self.path = first.path if first is not None else Path(".")
        self.metadata = dict(first.metadata) if first is not None else {}
        self._owners = owners
        self.infos = {}
        for out, (src, name) in parts.items():
            info = src.infos[name]
            self.infos[out] = TensorInfo(out, info.dtype, info.shape)

    def origin(self, name: str) -> tuple[Source, str]:
        """The source and tensor name that output tensor ``name`` is read from."""
        return self._parts[name]

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        src, inner = self._parts[name]
        src.read_into(inner, byte_offset, out)

    def read(self, name: str):
        src, inner = self._parts[name]
        return src.read(inner)

    @property
    def files(self) -> list[Path]:
        return [f for src in self._owners for f in src.files]

    def fingerprint(self) -> dict[str, object]:
        prints = {id(src): src.fingerprint() for src in self._owners}
        by_path = {str(src.path): prints[id(src)] for src in self._owners}
        return {"path": str(self.path), "format": "slices", "slices": self._label, "sources": by_path}


@dataclass(frozen=True)
class SliceInput:
    """One source of a slice: an open checkpoint, its layer range (``None``: all its layers), its label."""

    source: Source
    layers: tuple[int, int] | None
    model: str


@dataclass(frozen=True)
class TensorPlace:
    """Where an output tensor comes from: its slice, its gradient position, each member's input name."""

    slice: int
    t: float
    names: list[str]


@dataclass
class SlicePlan:
    """A slice merge as the engine runs it: members and base as :class:`SliceSource`, and per output tensor its
    :class:`TensorPlace`; ``layer_origin[k]`` is (slice, source layer) of output layer ``k`` (its first input's)."""

    members: list[SliceSource]
    base: SliceSource | None
    places: dict[str, TensorPlace]
    layer_origin: list[tuple[int, int]] = field(default_factory=list)
    layout: LayerLayout | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_origin)


def _range_of(inp: SliceInput, layout: LayerLayout, where: str) -> tuple[int, int]:
    if inp.layers is None:
        return 0, layout.num_layers
    a, b = inp.layers
    if not layout.num_layers:
        raise InvalidArgumentError(f"{where}: {inp.model} has no numbered layers in its tensor names "
                                   "(model.layers.N., transformer.h.N., blocks.N., ...), so it has no layer_range")
    if not 0 <= a < b <= layout.num_layers:
        raise InvalidArgumentError(f"{where}: layer_range [{a}, {b}] is outside {inp.model}'s "
                                   f"{layout.num_layers} layers; give [first, last + 1] with 0 <= first < last + 1 "
                                   f"<= {layout.num_layers}")
    return a, b


def plan_slices(slices: Sequence[tuple[list[SliceInput], int | None]]) -> SlicePlan:
    """The members, base and tensor places of a slice merge.

    Args:
        slices: per output slice, its inputs (base excluded or not) and the index among them of the base
            (``None``: no base in this slice). Every slice has the same number of non-base inputs: member ``j``
            of the merge is the ``j``-th non-base input of every slice.

    Raises:
        InvalidArgumentError: inputs of a slice of different lengths, a layer range outside a model, slices of
            different numbers of inputs, a base in some slices only.
    """
    layouts: dict[int, LayerLayout] = {}

    def layout(src: Source, model: str) -> LayerLayout:
        if id(src) not in layouts:
            layouts[id(src)] = layout_of(list(src.infos), where=model)
        return layouts[id(src)]

    counts = {len(inputs) - (base is not None) for inputs, base in slices}
    if len(counts) != 1:
        raise InvalidArgumentError(f"slices have different numbers of models to merge ({sorted(counts)}); papa-merge "
                                   "runs a slice recipe as one merge, so every slice merges the same number")
    bases = {base is not None for _, base in slices}
    if len(bases) != 1:
        raise InvalidArgumentError("the base model is a source of some slices only; list it in every slice")
    n = counts.pop()
    parts: list[dict[str, tuple[Source, str]]] = [{} for _ in range(n)]
    base_parts: dict[str, tuple[Source, str]] = {}
    labels: list[list[dict[str, object]]] = [[] for _ in range(n)]
    base_label: list[dict[str, object]] = []
    places: dict[str, TensorPlace] = {}
    origin: list[tuple[int, int]] = []

    def add_outside(inputs: list[SliceInput], base: int | None, names_of, s: int) -> None:
        ordered = [i for i in range(len(inputs)) if i != base]
        for j, i in enumerate(ordered):
            src = inputs[i].source
            for name in names_of(layout(src, inputs[i].model)):
                parts[j][name] = (src, name)
                places.setdefault(name, TensorPlace(s, 0.0, [name] * n))
        if base is not None:
            src = inputs[base].source
            for name in names_of(layout(src, inputs[base].model)):
                base_parts[name] = (src, name)

    first_inputs, first_base = slices[0]
    add_outside(first_inputs, first_base, lambda lay: lay.pre, 0)
    out_layer = 0
    out_layout: LayerLayout | None = None
    for s, (inputs, base) in enumerate(slices):
        where = f"slices[{s}]"
        ranges = [_range_of(inp, layout(inp.source, inp.model), f"{where}: {inp.model}") for inp in inputs]
        lengths = {b - a for a, b in ranges}
        if len(lengths) != 1:
            shown = ", ".join(f"{inp.model} [{a}, {b}]" for inp, (a, b) in zip(inputs, ranges))
            raise InvalidArgumentError(f"{where}: its sources span different numbers of layers ({shown}); every "
                                       "source of a slice gives the same number of layers")
        count = lengths.pop()
        ordered = [i for i in range(len(inputs)) if i != base]
        for j, i in enumerate(ordered):
            labels[j].append({"model": inputs[i].model, "layer_range": list(ranges[i])})
        if base is not None:
            base_label.append({"model": inputs[base].model, "layer_range": list(ranges[base])})
        lead = ordered[0] if ordered else base
        lead_layout = layout(inputs[lead].source, inputs[lead].model)
        out_layout = out_layout or lead_layout
        for idx in range(count):
            t = layer_position(idx, count)
            rests = lead_layout.layers[ranges[lead][0] + idx]
            outs = {rest: out_layout.name(out_layer, rest) for rest in rests}
            names_in: dict[str, list[str]] = {out: [out] * n for out in outs.values()}
            for j, i in enumerate([*ordered, *([base] if base is not None else [])]):
                lay = layout(inputs[i].source, inputs[i].model)
                src_layer = ranges[i][0] + idx
                for rest in lay.layers[src_layer]:
                    out = outs.get(rest) or out_layout.name(out_layer, rest)
                    target = parts[j] if j < n else base_parts
                    target[out] = (inputs[i].source, lay.name(src_layer, rest))
                    if j < n:
                        names_in.setdefault(out, [out] * n)[j] = lay.name(src_layer, rest)
            for out, names in names_in.items():
                places[out] = TensorPlace(s, t, names)
            origin.append((s, ranges[lead][0] + idx))
            out_layer += 1
    last_inputs, last_base = slices[-1]
    add_outside(last_inputs, last_base, lambda lay: lay.post, len(slices) - 1)
    members = [SliceSource(parts[j], label=labels[j]) for j in range(n)]
    base_src = SliceSource(base_parts, label=base_label) if base_parts else None
    return SlicePlan(members, base_src, places, origin, out_layout)


def rewrite_layer_config(config: dict, origin: Sequence[tuple[int, int]],
                         configs_by_slice: Sequence[dict | None]) -> dict:
    """A transformers ``config.json`` for the stacked layers: the layer count and each per-layer list.

    Args:
        config: the output's config (the base model's, else the first model's, as mergekit takes it).
        origin: per output layer, (slice, layer of the model it comes from).
        configs_by_slice: per slice, the config of the model its layers come from (``None``: ``config``).

    A per-layer list is a top-level list whose key names layers (``layer_types``, ``no_rope_layers``, ...) and
    whose length is the layer count; output layer ``k`` takes the entry of the layer it is copied from, in that
    model's config. mergekit sets the layer count only.

    Example:
        >>> rewrite_layer_config({"num_hidden_layers": 2, "layer_types": ["a", "b"]}, [(0, 0), (0, 1), (0, 1)], [None])
        {'num_hidden_layers': 3, 'layer_types': ['a', 'b', 'b']}
    """
    out = dict(config)
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        return out
    count = config[key]
    for name, value in config.items():
        if not (isinstance(value, list) and len(value) == count and "layer" in name):
            continue
        rebuilt = []
        for s, layer in origin:
            cfg = configs_by_slice[s] if s < len(configs_by_slice) and configs_by_slice[s] else config
            entries = cfg.get(name)
            entries = entries if isinstance(entries, list) and layer < len(entries) else value
            rebuilt.append(entries[layer] if layer < len(entries) else entries[-1])
        out[name] = rebuilt
    out[key] = len(origin)
    return out


def read_config(folder: str | os.PathLike) -> dict | None:
    """A model folder's ``config.json`` as a dict, or ``None`` (a single file, no config, not JSON)."""
    path = Path(folder) / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
