"""Permutation alignment of networks trained from different initialisations (Git Re-Basin): the algorithm.

Two networks trained from different random starts compute similar functions with their hidden units
in a different order, so their average mixes unrelated units and scores near chance. Git Re-Basin
(Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries", ICLR 2023;
code samuela/git-re-basin, ``src/weight_matching.py``) permutes one network's hidden units onto
another's; permuting the units of a network (the output channels of a layer, the matching entries of
its normalisation and the input channels of what consumes it) leaves the function it computes unchanged.

- :func:`permutation_spec` finds which tensor axes share one permutation by tracing the model with
  ``torch.fx``, or, for a model fx cannot trace (Hugging Face transformers: Python control flow on the inputs,
  and transformers 5 has no fx tracer of its own), with the graph recorded by running it once on the example
  (:mod:`merge.align.record`; the reference writes a spec by hand per architecture): the output channels of a
  convolution or linear layer, the BatchNorm/LayerNorm after it, the input channels of its consumers
  (a linear layer after a ``Flatten`` takes the channel's whole block of features), and residual streams
  tied wherever two streams are added or multiplied, and attention heads moved as whole heads (the query,
  key and value projections' output units by head, the output projection's input units with them;
  :func:`_attention_blocks` says which attention it recognises). A permutation whose units reach anything the
  tracer does not know (an unknown module or function, a reshape, a concatenation, the network's output,
  a weight shared or read directly) is left in place and reported in :attr:`PermutationSpec.fixed`, never
  permuted wrongly.
- :func:`weight_matching` is the reference's coordinate descent: for each permutation in a random order,
  the linear assignment (``scipy.optimize.linear_sum_assignment``) maximising the sum of inner products
  of the reference's weights with the other's, the other permutations held fixed, until a full sweep
  improves nothing.
- :func:`activation_matching` matches each permutation's units by the correlation of their activations
  on the same batches (the reference's ``mnist_mlp_activation_matching.py``, one assignment per layer).
- :func:`align` aligns every member onto one reference member (:mod:`merge.align.checkpoints` does it for
  checkpoints).

Deliberate differences from the reference, each a decision:

- Specs are traced from the model, not written by hand; the tracer covers MLPs, convolution networks
  with BatchNorm (``small_cnn``, VGG-like), ResNets (timm) and transformer blocks written with plain
  modules (embeddings and the residual stream, LayerNorm, the MLP's hidden units, attention heads), and
  leaves in place what it cannot tie. Attention heads move as whole heads only where the attention is
  ``F.scaled_dot_product_attention`` on heads split by a view/reshape and a transpose, without a mask or with
  one that broadcasts over the heads (a padding mask); the units within a head are not permuted (queries and
  keys share a rotation symmetry, not only a permutation); activation matching matches heads by the summed
  correlations of their merged outputs, unit by unit. Any other attention (a mask per head, ``q @ k.transpose``,
  another layout) keeps its query/key/value units in place and is reported. A BERT-like Hugging Face encoder
  (MiniLM: ``BertModel``, ``BertForSequenceClassification``, with the default SDPA attention) is recorded by
  running it: its MLP units and attention heads are permuted, and its residual stream is tied across the
  embeddings, every LayerNorm and every sublayer's output (left in place where it is the model's output, as a
  bare encoder's hidden states). With ``attn_implementation="eager"`` its heads stay in place, reported.
- Weight matching's cost uses the parameters only, as the reference's specs name only parameters; the
  BatchNorm running statistics are permuted with their layer but do not enter the cost.
- The random order of permutations comes from ``torch.Generator`` seeded with ``seed + iteration`` (the
  reference mixes a JAX key with the iteration); inner products are accumulated in float64.
- Activation matching matches on the Pearson correlation of the activations (the reference's MNIST
  script computes both and matches on the uncentred ``E[A B]``; correlation is the choice of Jordan et
  al.'s REPAIR and does not favour units with large activations). Activations are taken after the
  nonlinearity where the unit has one (the reference takes them after ReLU), else at the layer's output;
  where several points share one permutation (a residual stream), their correlation matrices are summed.
- The permutations are applied to a copy of the state dict; the identity is returned for fixed units.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> spec = permutation_spec(net, torch.zeros(1, 4))
    >>> sorted(spec.sizes.items())
    [('0', 8)]
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from merge.align.record import Recording, record_graph
from merge.bn import inputs_of, move_to
from merge.errors import InvalidArgumentError, MismatchError

__all__ = ["PermutationSpec", "AlignResult", "permutation_spec", "apply_permutation", "random_permutation",
           "weight_matching", "activation_matching", "align", "linear_assignment", "ALIGN_METHODS", "ALIGN_CITATION"]

ALIGN_CITATION = ("Ainsworth, Hayase & Srinivasa, 2023. Git Re-Basin: Merging Models modulo Permutation "
                  "Symmetries. ICLR; code samuela/git-re-basin")
ALIGN_METHODS = ("weight", "activation")

Axis = tuple[str, int] | tuple[str, int, int]
"""``(permutation name, repeat)`` of one tensor axis: the axis holds ``repeat`` consecutive entries per unit;
``(permutation name, repeat, tiles)``: it holds ``tiles`` such blocks one after the other, each permuted alike
(a fused query/key/value projection's output: the query, key and value heads move together)."""


@dataclass
class PermutationSpec:
    """Which axes of which tensors share a permutation (the reference's ``PermutationSpec``).

    Attributes:
        axes_to_perm: state-dict key -> one entry per axis, ``None`` or ``(permutation, repeat)``.
        perm_to_axes: permutation -> ``[(key, axis, repeat), ...]``.
        sizes: permutation -> number of units.
        fixed: units left in place -> why (a permutation the tracer could not tie soundly).
        params: the keys that are parameters (the weight-matching cost uses these, as the reference).
    """

    axes_to_perm: dict[str, tuple[Axis | None, ...]]
    perm_to_axes: dict[str, list[tuple[str, int, int]]]
    sizes: dict[str, int]
    fixed: dict[str, str] = field(default_factory=dict)
    params: frozenset[str] = frozenset()
    _graph: Any = field(default=None, repr=False)
    _points: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict, repr=False)

    def describe(self) -> list[str]:
        """One line per permutation and per fixed group, for reports."""
        lines = [f"permuted {p}: {self.sizes[p]} units, {len(self.perm_to_axes[p])} tensor axes"
                 for p in self.perm_to_axes]
        lines += [f"left in place {p}: {why}" for p, why in self.fixed.items()]
        return lines


@dataclass
class AlignResult:
    """Members aligned onto a reference: ``state_dicts[i]`` is member i permuted (the reference unchanged)."""

    state_dicts: list[dict[str, Tensor]]
    perms: list[dict[str, Tensor]]
    spec: PermutationSpec
    method: str
    reference: int

    def record(self) -> dict:
        """The alignment's provenance, for a recipe."""
        moved = [sum(int((p != torch.arange(len(p))).sum()) for p in perms.values()) for perms in self.perms]
        return {"method": self.method, "reference": self.reference, "citation": ALIGN_CITATION,
                "permutations": {p: self.spec.sizes[p] for p in self.spec.perm_to_axes},
                "left_in_place": dict(self.spec.fixed), "units_moved": moved}


# ---------------------------------------------------------------------------------------------------------------
# Tracing

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
                        nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.Softplus)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_UNARY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                    F.leaky_relu, F.hardswish, F.dropout, torch.nn.functional.elu}
_ACTIVATION_FUNCTIONS = _UNARY_FUNCTIONS - {F.dropout}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, torch.add,
           torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool1d,
                   F.max_pool1d, F.avg_pool1d}
_HARMLESS_METHODS = {"size", "dim"}


_OUTPUT = "reaches the network's output"


@dataclass(frozen=True)
class _Tag:
    group: str
    axis: int
    repeat: int


@dataclass
class _Attention:
    """One attention block whose heads can move as whole heads (found by :func:`_attention_blocks`)."""

    producers: dict[fx.Node, int]  # the Linear nodes of the queries, keys and values -> chunks of their output
    heads: int
    head_size: int
    owned: set[fx.Node]  # every node between the projections and the merged heads (no other user)
    merged: fx.Node  # the heads merged back into one axis (its consumers are traced as usual)
    axis: int


def _ints(node: fx.Node, n: int) -> tuple[int, ...] | None:
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if node.kwargs or not all(isinstance(a, int) for a in args):
        return None
    return tuple(a % n for a in args)


def _attention_blocks(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> list[_Attention]:
    """Attention written with plain modules whose heads can move as whole heads, matched exactly:

    ``Linear`` (one per query/key/value, or one fused, ``.split`` into equal chunks) -> ``.view``/``.reshape``
    ``(B, T, H, d)`` -> ``.transpose(1, 2)`` -> ``F.scaled_dot_product_attention(q, k, v)`` (no mask, or a mask
    that broadcasts over the heads, as a padding mask ``(B, 1, T, S)``; dropout, causality and scale are the same
    for every head) -> ``.transpose(1, 2)`` -> ``.view``/``.reshape`` ``(B, T, H*d)``, every intermediate node used
    once; ``.contiguous()`` and views to the same shape between them are passed (Hugging Face's SDPA attention).
    Permuting the heads alike in the queries, keys and values permutes the attention's output heads the same
    way, which the consumer of the merged heads undoes. Anything else (a mask per head, another layout, another
    user, attention written as ``q @ k.transpose``) matches nothing and the units stay in place.
    """
    shape = _Tracer.shape
    found = []

    def linear(n: Any) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear) \
            and len(n.args) == 1 and not n.kwargs and len(n.users) == 1

    def same_for_every_head(node: fx.Node) -> bool:
        """No mask, or one that broadcasts over the heads (``(B, 1, T, S)``: a padding mask, Hugging Face's)."""
        mask = node.kwargs.get("attn_mask")
        if mask is None:
            return True
        s = shape(mask) if isinstance(mask, fx.Node) else None
        return s is not None and (len(s) < 3 or s[-3] == 1)

    def through(n: fx.Node, owned: set[fx.Node]) -> fx.Node:
        """Past the single users that change nothing: ``.contiguous()``, ``.clone()``, a view to the same shape."""
        while len(n.users) == 1:
            u = next(iter(n.users))
            if u.op != "call_method" or u.args[0] is not n or not (
                    u.target in ("contiguous", "clone") and len(u.args) == 1 and not u.kwargs
                    or u.target in ("view", "reshape") and shape(u) is not None and shape(u) == shape(n)):
                break
            owned.add(u)
            n = u
        return n

    for node in graph.nodes:
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention or len(node.args) != 3 \
                or set(node.kwargs) - {"dropout_p", "is_causal", "scale", "attn_mask", "enable_gqa"} \
                or any(isinstance(v, fx.Node) for k, v in node.kwargs.items() if k != "attn_mask") \
                or node.kwargs.get("enable_gqa", False) or not same_for_every_head(node):
            continue
        owned, producers, layout = {node}, {}, set()
        ok = True
        for qkv in node.args:
            # q = view(proj_or_chunk, B, T, H, d).transpose(1, 2)
            s = shape(qkv) if isinstance(qkv, fx.Node) else None
            if s is None or len(s) != 4 or qkv.op != "call_method" or qkv.target != "transpose" \
                    or _ints(qkv, 4) not in ((1, 2), (2, 1)) or len(qkv.users) != 1:
                ok = False
                break
            view = qkv.args[0]
            sv, src = shape(view), view.args[0] if view.args else None
            if view.op != "call_method" or view.target not in ("view", "reshape") or len(view.users) != 1 \
                    or sv is None or len(sv) != 4 or shape(src) != (sv[0], sv[1], sv[2] * sv[3]):
                ok = False
                break
            layout.add(sv[1:])
            owned |= {qkv, view}
            if linear(src):
                producers[src] = 1
                continue
            # a chunk of a fused projection: getitem(split(proj, H*d, dim=-1), i)
            split = src.args[0] if src.op == "call_function" and src.target is operator.getitem else None
            if split is None or len(src.users) != 1 or split.op != "call_method" or split.target != "split":
                ok = False
                break
            # the chunks' sizes are read from their shapes (the split size is often computed from x.shape): all
            # chunks of one size that together cover the projection's output are its blocks, in order
            proj, size = split.args[0], sv[2] * sv[3]
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            sp, chunks = shape(proj), list(split.users)
            if sp is None or len(sp) != 3 or not isinstance(dim, int) or dim % 3 != 2 \
                    or set(split.kwargs) - {"dim"} or not linear(proj) or sp[2] % size \
                    or any(c.op != "call_function" or c.target is not operator.getitem or shape(c) != shape(src)
                           or not isinstance(c.args[1], int)
                           for c in chunks) \
                    or sorted(c.args[1] for c in chunks) != list(range(sp[2] // size)):
                ok = False
                break
            owned |= {src, split}
            producers[proj] = sp[2] // size
        if not ok or len(layout) != 1:
            continue
        (_t, heads, head_size), = layout
        # the chunks of a fused projection all feed this attention
        for proj, tiles in producers.items():
            if tiles > 1 and not all(c in owned for c in next(iter(proj.users)).users):
                ok = False
        # out = attention.transpose(1, 2).reshape(B, T, H*d), through .contiguous() and views that change nothing
        out = through(node, owned)
        back = next(iter(out.users)) if len(out.users) == 1 else None
        after = through(back, owned) if back is not None else None
        merged = next(iter(after.users)) if after is not None and len(after.users) == 1 else None
        if not ok or back is None or merged is None or back.op != "call_method" or back.target != "transpose" \
                or back.args[0] is not out or _ints(back, 4) not in ((1, 2), (2, 1)) or merged.op != "call_method" \
                or merged.args[0] is not after or merged.target not in ("view", "reshape") or shape(back) is None \
                or shape(back)[2:] != (heads, head_size) or shape(merged) != (*shape(back)[:2], heads * head_size):
            continue
        found.append(_Attention(producers, heads, head_size, owned | {back}, merged, 2))
    return found


class _Tracer:
    """Walks a shape-annotated fx graph and records which axes share a permutation (union-find over groups)."""

    def __init__(self, modules: Mapping[str, nn.Module], graph: fx.Graph):
        self.modules = dict(modules)
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}
        self.fixed: dict[str, list[str]] = {}
        self.tags: dict[fx.Node, _Tag] = {}
        self.axes: dict[tuple[str, int], list[tuple[str | None, int]]] = {}
        self.points: dict[str, list[fx.Node]] = {}
        self.order: dict[str, int] = {}
        self.tiles: dict[tuple[str, int], int] = {}
        self.heads: dict[fx.Node, tuple[str, int, int]] = {}  # q/k/v projection -> (head group, head size, tiles)
        self.owned: set[fx.Node] = set()  # the nodes between the projections and the merged heads
        for att in _attention_blocks(graph, self.modules):
            g = self.new(f"{next(iter(att.producers)).target}.heads", att.heads)
            for prod, tiles in att.producers.items():
                self.heads[prod] = (g, att.head_size, tiles)
            self.owned |= att.owned
            self.tags[att.merged] = _Tag(g, att.axis, att.head_size)
            # activation matching compares the heads' outputs (merged), unit by unit within a head
            self.points.setdefault(g, []).append((att.merged, False, att.axis, att.head_size))

    # union-find
    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def new(self, name: str, size: int) -> str:
        g, i = name, 1
        while g in self.parent:
            g, i = f"{name}#{i}", i + 1
        self.parent[g], self.size[g], self.order[g] = g, size, len(self.order)
        return g

    def union(self, a: str, b: str) -> str:
        ra, rb = sorted((self.find(a), self.find(b)), key=self.order.__getitem__)  # named after the first layer
        if ra != rb:
            self.parent[rb] = ra
            if self.size[ra] != self.size[rb]:
                self.fix(ra, f"tied to {rb} of another size")
        return ra

    def fix(self, g: str, why: str) -> None:
        self.fixed.setdefault(g, []).append(why)

    def assign(self, key: str, axis: int, tag: _Tag | None) -> None:
        self.axes.setdefault((key, axis), []).append((tag.group, tag.repeat) if tag else (None, 1))

    # helpers
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tag_of(self, arg: Any) -> _Tag | None:
        return self.tags.get(arg) if isinstance(arg, fx.Node) else None

    def fix_inputs(self, node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            t = self.tags.get(arg)
            if t is not None:
                self.fix(t.group, f"{why} ({node.name})")

    def point(self, tag: _Tag, node: fx.Node, activation: bool) -> None:
        if tag.repeat == 1:
            self.points.setdefault(tag.group, []).append((node, activation, tag.axis, 1))

    # rules
    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "placeholder" or node.op == "get_attr" or node in self.owned:
                continue
            if node.op == "output":
                self.fix_inputs(node, _OUTPUT)
            elif node.op == "call_module":
                self.module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)

    def producer(self, node: fx.Node, mod: nn.Module, out_features: int, in_tag: _Tag | None, in_ok: bool) -> None:
        x = node.args[0]
        if in_tag is not None and not in_ok:
            self.fix(in_tag.group, f"feeds {node.target} along another axis")
        self.assign(f"{node.target}.weight", 1, in_tag if in_ok else None)
        if node in self.heads:
            # A query/key/value projection: its output units move as whole heads (every chunk of a fused one alike).
            g, head_size, tiles = self.heads[node]
            for k in ("weight", "bias") if getattr(mod, "bias", None) is not None else ("weight",):
                self.assign(f"{node.target}.{k}", 0, _Tag(g, 0, head_size))
                self.tiles[(f"{node.target}.{k}", 0)] = tiles
            return
        shape = self.shape(node)
        if shape is None:
            self.fix_inputs(node, "no shape")
            return
        axis = 1 if isinstance(mod, _CONVS) else len(shape) - 1
        tag = _Tag(self.new(str(node.target), out_features), axis, 1)
        self.tags[node] = tag
        self.assign(f"{node.target}.weight", 0, tag)
        if getattr(mod, "bias", None) is not None:
            self.assign(f"{node.target}.bias", 0, tag)
        self.point(tag, node, False)
        del x

    def module(self, node: fx.Node, mod: nn.Module) -> None:
        x = node.args[0] if node.args else None
        t = self.tag_of(x)
        shape = self.shape(x)
        if isinstance(mod, nn.Linear) and len(node.args) == 1:
            ok = t is not None and shape is not None and t.axis == len(shape) - 1
            self.producer(node, mod, mod.out_features, t, ok)
        elif isinstance(mod, _CONVS) and mod.groups == 1 and len(node.args) == 1:
            ok = t is not None and t.axis == 1 and t.repeat == 1
            self.producer(node, mod, mod.out_channels, t, ok)
        elif (isinstance(mod, _CONVS) and mod.groups == mod.in_channels == mod.out_channels and t is not None
              and t.axis == 1 and t.repeat == 1):
            self.assign(f"{node.target}.weight", 0, t)
            if mod.bias is not None:
                self.assign(f"{node.target}.bias", 0, t)
            self.tags[node] = t
        elif isinstance(mod, nn.Embedding) and len(node.args) == 1:
            # An embedding's rows are inputs (token ids), its columns are units written into the stream.
            shape = self.shape(node)
            if shape is not None:
                tag = _Tag(self.new(str(node.target), mod.embedding_dim), len(shape) - 1, 1)
                self.tags[node] = tag
                self.assign(f"{node.target}.weight", 1, tag)
                self.assign(f"{node.target}.weight", 0, None)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and len(node.args) == 1:
            if t is not None and (t.axis != 1 or t.repeat != 1):
                self.fix(t.group, f"normalised by {node.target} along another axis")
                t = None
            for k in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, k, None) is not None:
                    self.assign(f"{node.target}.{k}", 0, t)
            if t is not None:
                self.tags[node] = t
        elif isinstance(mod, nn.LayerNorm) and len(node.args) == 1:
            if t is not None and (len(mod.normalized_shape) != 1 or shape is None or t.axis != len(shape) - 1
                                  or t.repeat != 1):
                self.fix(t.group, f"normalised by {node.target} over other axes")
                t = None
            for k in ("weight", "bias"):
                if getattr(mod, k, None) is not None:
                    self.assign(f"{node.target}.{k}", 0, t)
            if t is not None:
                self.tags[node] = t
        elif isinstance(mod, _ELEMENTWISE_MODULES) and len(node.args) == 1:
            if t is not None:
                self.tags[node] = t
                if isinstance(mod, _ACTIVATIONS):
                    self.point(t, node, True)
        elif isinstance(mod, _POOLS) and len(node.args) == 1:
            if t is not None:
                if t.axis == 1 and t.repeat == 1:
                    self.tags[node] = t
                else:
                    self.fix(t.group, f"pooled by {node.target} along another axis")
        elif isinstance(mod, nn.Flatten) and len(node.args) == 1:
            self.flatten(node, t, shape, mod.start_dim, mod.end_dim)
        else:
            self.fix_inputs(node, f"feeds {type(mod).__name__} {node.target}, which the tracer does not know")

    def flatten(self, node: fx.Node, t: _Tag | None, shape: tuple[int, ...] | None, start: int, end: int) -> None:
        if t is None:
            return
        if shape is None:
            self.fix(t.group, f"flattened without a known shape ({node.name})")
            return
        n = len(shape)
        start, end = start % n, end % n
        if t.axis < start:
            self.tags[node] = t
        elif t.axis == start and end == n - 1:
            self.tags[node] = _Tag(t.group, start, t.repeat * math.prod(shape[start + 1:]))
        else:
            self.fix(t.group, f"flattened across its axis ({node.name})")

    def reduce(self, node: fx.Node, t: _Tag, shape: tuple[int, ...] | None, dim: Any, keepdim: Any) -> None:
        """A mean over other axes than the units' keeps them (on an axis shifted by the axes removed)."""
        if shape is None or dim is None or not isinstance(keepdim, bool) or t.repeat != 1:
            self.fix(t.group, f"reduced across its axis ({node.name})")
            return
        dims = {d % len(shape) for d in (dim if isinstance(dim, (tuple, list)) else (dim,)) if isinstance(d, int)}
        if t.axis in dims or len(dims) != len(dim if isinstance(dim, (tuple, list)) else (dim,)):
            self.fix(t.group, f"reduced across its axis ({node.name})")
            return
        self.tags[node] = t if keepdim else _Tag(t.group, t.axis - sum(d < t.axis for d in dims), 1)

    def index(self, node: fx.Node, t: _Tag, shape: tuple[int, ...] | None, index: Any) -> None:
        """Basic indexing (integers and slices) that takes every entry of the units' axis keeps them (``x[:, 0]``,
        a transformer's first token), on the axis shifted by the integers before it."""
        index = index if isinstance(index, tuple) else (index,)
        if shape is None or len(index) > len(shape) or not all(isinstance(i, (int, slice)) for i in index):
            self.fix(t.group, f"indexed in a way the tracer does not follow ({node.name})")
            return
        full = slice(None)
        if t.axis < len(index) and index[t.axis] != full:
            self.fix(t.group, f"indexed along its axis ({node.name})")
            return
        self.tags[node] = _Tag(t.group, t.axis - sum(isinstance(i, int) for i in index[:t.axis]), t.repeat)

    def binary(self, node: fx.Node, a: Any, b: Any) -> None:
        ta, tb = self.tag_of(a), self.tag_of(b)
        if ta is None and tb is None:
            return
        if ta is not None and tb is not None:
            # Broadcasting aligns axes from the right: the units must sit on the same axis counted from the end.
            sa, sb, so = self.shape(a), self.shape(b), self.shape(node)
            if sa is not None and sb is not None and so is not None and ta.axis - len(sa) == tb.axis - len(sb) \
                    and ta.repeat == tb.repeat and sa[ta.axis] == sb[tb.axis]:
                self.tags[node] = _Tag(self.union(ta.group, tb.group), len(so) + ta.axis - len(sa), ta.repeat)
            else:
                self.fix_inputs(node, "combined with a tensor of another layout")
            return
        other = b if ta is not None else a
        t = ta or tb
        # A scalar (a Python number or a one-element tensor) commutes with any permutation; a tensor does not.
        if not isinstance(other, fx.Node) or (self.shape(other) is not None and math.prod(self.shape(other)) == 1):
            self.tags[node] = t
        else:
            self.fix(t.group, f"combined with an unpermuted tensor ({node.name})")

    def function(self, node: fx.Node) -> None:
        f = node.target
        x = node.args[0] if node.args else None
        if f in _BINARY and len(node.args) == 2:
            self.binary(node, node.args[0], node.args[1])
        elif f in _UNARY_FUNCTIONS and self.tag_of(x) is not None:
            self.tags[node] = self.tag_of(x)
            if f in _ACTIVATION_FUNCTIONS:
                self.point(self.tag_of(x), node, True)
        elif f in _POOL_FUNCTIONS and self.tag_of(x) is not None:
            t = self.tag_of(x)
            if t.axis == 1 and t.repeat == 1:
                self.tags[node] = t
            else:
                self.fix(t.group, f"pooled along another axis ({node.name})")
        elif f is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.flatten(node, self.tag_of(x), self.shape(x), start, end)
        elif f is torch.mean and self.tag_of(x) is not None:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            self.reduce(node, self.tag_of(x), self.shape(x), dim,
                        node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        elif f is getattr and node.args[1] in ("shape",):
            return
        elif f is operator.getitem and self.tag_of(x) is not None and len(node.args) == 2:
            self.index(node, self.tag_of(x), self.shape(x), node.args[1])
        else:
            self.fix_inputs(node, f"feeds {getattr(f, '__name__', f)}, which the tracer does not know")

    def method(self, node: fx.Node) -> None:
        name, x = node.target, node.args[0]
        t = self.tag_of(x)
        if name in _HARMLESS_METHODS:
            return
        if name in _BINARY_METHODS and len(node.args) == 2:
            self.binary(node, node.args[0], node.args[1])
        elif name in _UNARY_METHODS and t is not None:
            self.tags[node] = t
            if name in ("relu", "relu_", "sigmoid", "tanh"):
                self.point(t, node, True)
        elif name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.flatten(node, t, self.shape(x), start, end)
        elif name == "mean" and t is not None:
            self.reduce(node, t, self.shape(x), node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"),
                        node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        else:
            self.fix_inputs(node, f"feeds the method .{name}(), which the tracer does not know")


# The module types the rules of :class:`_Tracer` know, recorded whole when the model is run (not traced by fx).
_LEAVES = (nn.Linear, *_CONVS, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, *_ELEMENTWISE_MODULES,
           *_POOLS, nn.Flatten)
# Rows of the example input a recording runs on: every intermediate tensor stays alive during the run.
_RECORD_ROWS = 2


def _rows(x: Any, n: int) -> Any:
    if isinstance(x, Tensor):
        return x[:n] if x.dim() else x
    if isinstance(x, Mapping):
        return {k: _rows(v, n) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_rows(v, n) for v in x)
    return x


def _trace(model: nn.Module, example_input: Any) -> tuple[fx.Graph, fx.GraphModule | Recording]:
    """The model's graph: ``torch.fx.symbolic_trace`` with ``ShapeProp``, or, for a model fx cannot trace (a Hugging
    Face model's Python control flow), the graph recorded by running it (:func:`merge.align.record.record_graph`)."""
    from torch.fx.passes.shape_prop import ShapeProp

    was = model.training
    model.eval()
    try:
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - control flow on the inputs: record the graph by running the model
            try:
                rec = record_graph(model, _rows(example_input, _RECORD_ROWS), leaves=_LEAVES)
            except Exception as e:  # noqa: BLE001 - a model that does not run on its input cannot be aligned
                raise InvalidArgumentError(f"{type(model).__name__} does not run on the example input "
                                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), so "
                                           "its permutations are unknown; pass one batch of its inputs") from None
            return rec.graph, rec
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            ShapeProp(gm).propagate(*args)
    finally:
        model.train(was)
    return gm.graph, gm


def permutation_spec(model: nn.Module, example_input: Any) -> PermutationSpec:
    """Trace ``model`` and find the hidden-unit permutations that leave its function unchanged.

    Args:
        model: the network (its weights are not used; only its structure).
        example_input: one input batch (a tensor, a tuple of the forward's arguments, or a dict of keyword arguments:
            a tokenised batch), for the shapes; a recorded model runs on its first 2 rows.

    Returns:
        The :class:`PermutationSpec`; units it could not tie soundly are in ``fixed``, not permuted.

    Raises:
        InvalidArgumentError: the model cannot be traced by ``torch.fx`` and does not run on ``example_input``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> spec = permutation_spec(net, torch.zeros(1, 1, 4, 4))
        >>> spec.axes_to_perm["4.weight"]
        (None, ('0', 4))
    """
    graph, runner = _trace(model, example_input)
    tr = _Tracer(dict(model.named_modules()), graph)
    tr.run(graph)
    if isinstance(runner, Recording) and runner.unknown:
        for g in list(tr.parent):
            tr.fix(g, f"the model makes a tensor outside torch's functions ({runner.unknown[0]}), whose units are "
                      "unknown")
    state = model.state_dict(keep_vars=True)
    # A weight read directly (get_attr) or shared by two names would be permuted for one use only.
    direct = {n.target for n in graph.nodes if n.op == "get_attr"}
    by_id: dict[int, list[str]] = {}
    for k, v in state.items():
        by_id.setdefault(id(v), []).append(k)
    shared = {k for names in by_id.values() if len(names) > 1 for k in names}
    for (key, _axis), uses in tr.axes.items():
        groups = {g for g, _ in uses if g is not None}
        reason = None
        if key not in state:
            reason = f"{key} is no tensor of the state dict"
        elif key in direct or key in shared:
            reason = f"{key} is shared or read directly"
        elif any(g is None for g, _ in uses) and groups:
            reason = f"{key} is used both with permuted and unpermuted inputs"
        elif len({r for _, r in uses}) > 1:
            reason = f"{key} is used with different layouts"
        for g in groups:
            if reason:
                tr.fix(g, reason)
        gl = sorted(groups)
        for g in gl[1:]:
            tr.union(gl[0], g)
    for (key, axis), uses in tr.axes.items():
        tiles = tr.tiles.get((key, axis), 1)
        for g, r in uses:
            if g is not None and key in state and state[key].shape[axis] != tr.size[tr.find(g)] * r * tiles:
                tr.fix(g, f"{key} axis {axis} has {state[key].shape[axis]} entries, not "
                          f"{tiles}x{tr.size[tr.find(g)]}x{r}")
    fixed_roots: dict[str, list[str]] = {}
    for g, whys in tr.fixed.items():
        fixed_roots.setdefault(tr.find(g), []).extend(whys)
    axes_to_perm: dict[str, list[Axis | None]] = {k: [None] * v.dim() for k, v in state.items()}
    perm_to_axes: dict[str, list[tuple[str, int, int]]] = {}
    for (key, axis), uses in tr.axes.items():
        g, r = uses[0]
        if g is None or key not in state:
            continue
        root = tr.find(g)
        if root in fixed_roots:
            continue
        tiles = tr.tiles.get((key, axis), 1)
        axes_to_perm[key][axis] = (root, r) if tiles == 1 else (root, r, tiles)
        perm_to_axes.setdefault(root, []).append((key, axis, r) if tiles == 1 else (key, axis, r, tiles))
    sizes = {p: tr.size[p] for p in perm_to_axes}
    fixed = {}
    for root, whys in fixed_roots.items():
        if all(w.startswith(_OUTPUT) for w in whys):
            continue  # the output units are no hidden units: not worth a report
        members = sorted(g for g in tr.parent if tr.find(g) == root)
        fixed[", ".join(members)] = "; ".join(dict.fromkeys(whys))
    points = {}
    for g, pts in tr.points.items():
        root = tr.find(g)
        if root in sizes:
            points.setdefault(root, []).extend(pts)
    # Activation matching reads each unit after its nonlinearity where it has one (as the reference).
    chosen = {}
    names = runner.keys if isinstance(runner, Recording) else {}

    def key(n: fx.Node) -> str:  # a recorded node is found again by its key when the model runs on a batch
        return names.get(n.name, n.name)

    for root, pts in points.items():
        act = [(key(n), axis, r) for n, is_act, axis, r in pts if is_act]
        chosen[root] = act or [(key(n), axis, r) for n, _, axis, r in pts]
    params = frozenset(k for k, _ in model.named_parameters())
    return PermutationSpec({k: tuple(v) for k, v in axes_to_perm.items()}, perm_to_axes, sizes, fixed, params,
                           runner, chosen)


# ---------------------------------------------------------------------------------------------------------------
# Applying permutations

def _index(perm: Tensor, repeat: int, tiles: int = 1) -> Tensor:
    if repeat != 1:
        perm = (perm[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1)
    if tiles == 1:
        return perm
    return torch.cat([perm + i * len(perm) for i in range(tiles)])


def _permuted(spec: PermutationSpec, perms: Mapping[str, Tensor], key: str, w: Tensor,
              except_axis: int | None = None) -> Tensor:
    for axis, ax in enumerate(spec.axes_to_perm.get(key, ())):
        if ax is None or axis == except_axis:
            continue
        p, r, *tiles = ax
        w = torch.index_select(w, axis, _index(perms[p].to(w.device), r, *tiles))
    return w


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Tensor],
                      state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with ``perms`` applied: unit ``i`` of permutation ``p`` becomes old unit ``perms[p][i]``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> spec = permutation_spec(net, torch.zeros(1, 2))
        >>> sd = apply_permutation(spec, {"0": torch.tensor([2, 0, 1])}, net.state_dict())
        >>> torch.equal(sd["0.bias"], net[0].bias.detach()[[2, 0, 1]])
        True
    """
    return {k: _permuted(spec, perms, k, v) for k, v in state_dict.items()}


def random_permutation(spec: PermutationSpec, *, seed: int = 0) -> dict[str, Tensor]:
    """A random permutation for every permutation of ``spec`` (for tests and demonstrations)."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}


def _identity(spec: PermutationSpec) -> dict[str, Tensor]:
    return {p: torch.arange(n) for p, n in spec.sizes.items()}


def linear_assignment(cost: Tensor) -> Tensor:
    """The column each row takes in the assignment maximising the sum of the square ``cost`` matrix.

    Example:
        >>> linear_assignment(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
        [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    assert (rows == range(len(rows))).all()
    return torch.as_tensor(cols, dtype=torch.long)


def _check_same(spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    for key in spec.axes_to_perm:
        if spec.axes_to_perm[key] and any(spec.axes_to_perm[key]):
            for sd, which in ((a, "the reference"), (b, "the member")):
                if key not in sd:
                    raise MismatchError(f"{which} has no tensor {key!r}, which the model's permutations move; is it "
                                        "a checkpoint of the same architecture?", tensor=key)
            if a[key].shape != b[key].shape:
                raise MismatchError(f"{key}: shapes differ ({tuple(a[key].shape)} vs {tuple(b[key].shape)}); members "
                                    "must share one architecture", tensor=key)


def weight_matching(spec: PermutationSpec, reference: Mapping[str, Tensor], other: Mapping[str, Tensor], *,
                    seed: int = 0, max_iter: int = 100, init: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Permutations of ``other`` that match its weights to ``reference``'s (Git Re-Basin weight matching).

    The reference's coordinate descent: each sweep visits the permutations in a random order; for
    permutation ``p`` it sums, over every axis ``p`` moves, the inner products of the reference's slices
    with the other's (all other permutations applied), and solves the linear assignment that maximises
    the sum. It stops after a sweep that improves nothing (or ``max_iter`` sweeps).

    Args:
        spec: from :func:`permutation_spec`.
        reference, other: state dicts of one architecture.
        seed: seed of the random order.
        max_iter: most sweeps.
        init: starting permutations (default: the identity).

    Returns:
        ``{permutation: LongTensor}``, for :func:`apply_permutation` on ``other``.

    Raises:
        MismatchError: the state dicts lack a permuted tensor or disagree on its shape.
    """
    _check_same(spec, reference, other)
    ref = {k: v.detach().to(torch.float64) for k, v in reference.items() if k in spec.params}
    oth = {k: v.detach().to(torch.float64) for k, v in other.items() if k in spec.params}
    perm = {p: v.clone() for p, v in (init or _identity(spec)).items()}
    names = list(spec.perm_to_axes)
    for it in range(max_iter):
        progress = False
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + it))
        for i in order.tolist():
            p, n = names[i], spec.sizes[names[i]]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis, _r, *tiles in spec.perm_to_axes[p]:
                if key not in ref:
                    continue
                t = tiles[0] if tiles else 1
                wa = ref[key]
                wb = _permuted(spec, perm, key, oth[key], except_axis=axis)
                # the axis holds t tiles of n units (each repeated): gather each unit's entries from every tile
                wa = torch.movedim(wa, axis, 0).reshape(t, n, -1).transpose(0, 1).reshape(n, -1)
                wb = torch.movedim(wb, axis, 0).reshape(t, n, -1).transpose(0, 1).reshape(n, -1)
                cost += wa @ wb.T
            new = linear_assignment(cost)
            old_l = cost[torch.arange(n), perm[p]].sum()
            new_l = cost[torch.arange(n), new].sum()
            progress = progress or bool(new_l > old_l + 1e-12)
            perm[p] = new
        if not progress:
            break
    return perm


class _Recorder(fx.Interpreter):
    """Runs the traced graph and hands the chosen nodes' outputs to ``sink`` as soon as they are computed (an
    in-place activation later would change them)."""

    def __init__(self, gm: fx.GraphModule, wanted: Mapping[str, str], sink: Callable[[str, Tensor], None]):
        super().__init__(gm)
        self.wanted, self.sink = wanted, sink

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.sink(n.name, out)
        return out


def _unit_matrix(x: Tensor, axis: int) -> Tensor:
    return torch.movedim(x.detach(), axis, -1).reshape(-1, x.shape[axis]).to(torch.float64)


def activation_matching(spec: PermutationSpec, model: nn.Module, reference: Mapping[str, Tensor],
                        other: Mapping[str, Tensor], batches: Iterable[Any], *, device: str | torch.device = "cpu",
                        eps: float = 1e-8) -> dict[str, Tensor]:
    """Permutations of ``other`` that match its units to ``reference``'s by the correlation of their activations.

    Both networks run on the same batches; for each permutation the Pearson correlation of every
    reference unit with every other unit is accumulated (summed over the points that share the
    permutation), and one linear assignment maximises the total correlation. Every position of a sequence
    counts, padded ones included (both networks see the same padding).

    Args:
        spec: from :func:`permutation_spec` of ``model``.
        model: the architecture (its own weights are restored afterwards).
        reference, other: state dicts of ``model``.
        batches: input batches (a tensor, or ``(inputs, labels)`` pairs).
        device: where to run.

    Returns:
        ``{permutation: LongTensor}``, for :func:`apply_permutation` on ``other``.

    Raises:
        InvalidArgumentError: no batches.
        MismatchError: as :func:`weight_matching`.
    """
    _check_same(spec, reference, other)
    # Copies: a state dict of the model itself aliases the weights this loads the members into.
    reference = {k: v.detach().clone() for k, v in reference.items()}
    other = {k: v.detach().clone() for k, v in other.items()}
    runner = spec._graph
    # A traced model runs its GraphModule; a recorded one (merge.align.record) runs itself, its points found by key.
    net: nn.Module = runner if isinstance(runner, fx.GraphModule) else model
    wanted = {name: axis for names in spec._points.values() for name, axis, _r in names}
    moments: dict[str, list[Any]] = {}

    def run(sd: Mapping[str, Tensor], x: Any) -> dict[str, Tensor]:
        net.load_state_dict(dict(sd), strict=False)
        got: dict[str, Tensor] = {}

        def sink(name: str, out: Tensor) -> None:
            got[name] = _unit_matrix(out, wanted[name])

        with torch.no_grad():
            if isinstance(runner, Recording):
                runner.replay(net, x, wanted, sink)
            else:
                args = x if isinstance(x, tuple) else (x,)
                _Recorder(runner, wanted, sink).run(*args)
        missing = sorted(set(wanted) - set(got))
        if missing:
            raise MismatchError(f"the model did not compute {missing[0]} on a batch of the members' data as it did "
                                "on the example it was traced with; align with weight matching", option="align")
        return got

    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    was = net.training
    net.to(device).eval()
    n_batches = 0
    try:
        for batch in batches:
            x = move_to(inputs_of(batch), device)
            a, b = run(reference, x), run(other, x)
            n_batches += 1
            for name in wanted:
                za, zb = a[name], b[name]
                # float64 sums of a, b, a^2, b^2 and a^T b over every sample (and position) of every batch
                new = [za.shape[0], za.sum(0), zb.sum(0), (za * za).sum(0), (zb * zb).sum(0), za.T @ zb]
                old = moments.get(name)
                moments[name] = [v.cpu() if isinstance(v, Tensor) else v for v in new] if old is None else \
                    [o + (v.cpu() if isinstance(v, Tensor) else v) for o, v in zip(old, new)]
    finally:
        net.load_state_dict(saved)
        net.train(was)
    if n_batches == 0:
        raise InvalidArgumentError("activation matching needs at least one batch of the members' data",
                                   option="batches")
    perm = _identity(spec)
    for p in spec.perm_to_axes:
        corr = torch.zeros(spec.sizes[p], spec.sizes[p], dtype=torch.float64)
        for name, _, r in spec._points.get(p, []):
            n, sa, sb, saa, sbb, sab = moments[name]
            ma, mb = sa / n, sb / n
            cov = sab / n - ma[:, None] * mb[None, :]
            sda = (saa / n - ma ** 2).clamp_min(0).sqrt()
            sdb = (sbb / n - mb ** 2).clamp_min(0).sqrt()
            c = cov / (sda[:, None] * sdb[None, :] + eps)
            if r > 1:  # whole heads of r units: head i vs head j sums the correlations of their units in order
                k = spec.sizes[p]
                c = c.reshape(k, r, k, r).diagonal(dim1=1, dim2=3).sum(-1)
            corr += c
        perm[p] = linear_assignment(corr)
    return perm


def align(model: nn.Module, state_dicts: Sequence[Mapping[str, Tensor]], *, method: str = "weight",
          example_input: Any = None, batches: Iterable[Any] | None = None, reference: int = 0, seed: int = 0,
          max_iter: int = 100, device: str | torch.device = "cpu",
          spec: PermutationSpec | None = None) -> AlignResult:
    """Permute every member's hidden units onto the reference member's.

    Args:
        model: the members' architecture.
        state_dicts: the members.
        method: ``weight`` (:func:`weight_matching`) or ``activation`` (:func:`activation_matching`).
        example_input: one input batch, for tracing (default: the first of ``batches``).
        batches: input batches, needed by ``activation`` (a list: it is read once per member).
        reference: index of the member the others are aligned onto.
        seed, max_iter: of weight matching.
        device: of activation matching.
        spec: a spec already traced from ``model``.

    Returns:
        An :class:`AlignResult`; each permuted member computes the same function as before.

    Raises:
        InvalidArgumentError: an unknown method, a reference out of range, no input to trace with, or no
            batches for activation matching.
        MismatchError: members of different architectures.

    Example:
        >>> result = align(model, [sd0, sd1], method="weight", example_input=x)  # doctest: +SKIP
        >>> merge.average(result.state_dicts)  # doctest: +SKIP
    """
    if method not in ALIGN_METHODS:
        raise InvalidArgumentError(f"unknown alignment method {method!r}; choose one of {', '.join(ALIGN_METHODS)}",
                                   option="align", choices=list(ALIGN_METHODS))
    if not 0 <= reference < len(state_dicts):
        raise InvalidArgumentError(f"the reference must be a member index from 0 to {len(state_dicts) - 1}, got "
                                   f"{reference}", option="align_to")
    batches = list(batches) if batches is not None else None
    if method == "activation" and not batches:
        raise InvalidArgumentError("activation matching needs batches of the members' data", option="batches")
    if spec is None:
        if example_input is None:
            if not batches:
                raise InvalidArgumentError("tracing the model needs an example input or a batch", option="batches")
            example_input = inputs_of(batches[0])
        spec = permutation_spec(model, example_input)
    ref = state_dicts[reference]
    out, perms = [], []
    for i, sd in enumerate(state_dicts):
        if i == reference:
            perm = _identity(spec)
        elif method == "weight":
            perm = weight_matching(spec, ref, sd, seed=seed, max_iter=max_iter)
        else:
            perm = activation_matching(spec, model, ref, sd, batches, device=device)
        perms.append(perm)
        out.append(apply_permutation(spec, perm, sd) if i != reference else dict(sd))
    return AlignResult(out, perms, spec, method, reference)
