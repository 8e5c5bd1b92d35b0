"""A graph of a model recorded by running it, for models ``torch.fx`` cannot trace (Hugging Face transformers).

``torch.fx.symbolic_trace`` runs the forward on proxies, so Python control flow on the inputs (every
Hugging Face model checks its arguments and builds its attention mask in Python) stops it, and
transformers 5 no longer ships its own fx tracer. :func:`record_graph` runs the model once on a real
example instead and writes down what happened as an ``fx.Graph`` of the same form ``symbolic_trace``
produces, so the same rules read it (:mod:`merge.align.permute`):

- the modules of the ``leaves`` types (linear layers, norms, embeddings, activations) are ``call_module``
  nodes, seen by forward hooks, their insides not recorded;
- every torch function and tensor method called outside them (``F.gelu``, ``x.view(...)``, ``a + b``,
  ``F.scaled_dot_product_attention``) is a ``call_function`` or ``call_method`` node, seen by a
  ``TorchFunctionMode``; a function returning several tensors gets one ``getitem`` node per tensor;
- a parameter or buffer used outside a leaf is a ``get_attr`` node, any other tensor that no recorded
  operation made (the inputs, constants) a ``placeholder``; the tensors the model returns feed the ``output``;
- each node carries the shape of its output (``node.meta["tensor_meta"].shape``), as ``ShapeProp`` does.

What the graph shows is the path the example took: control flow that depends on the input (a padding
mask present or not) is not seen, as in any tracing by execution. Each node also gets a key that names it
by the module it ran in, its operation and its count there (``bert.encoder.layer.0.intermediate:gelu#0``);
:meth:`Recording.replay` runs the model again and hands the outputs of chosen keys to a callback, which is
how activation matching reads the units of a recorded model on batches of another shape or padding.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> rec = record_graph(net, torch.zeros(2, 4), leaves=(nn.Linear, nn.ReLU))
    >>> [n.op for n in rec.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Recording", "record_graph", "call_model"]

# Calls that read only what a tensor is (its size, type, place), never its values in order.
_METADATA = {"__get__", "size", "dim", "numel", "__len__", "stride", "is_contiguous", "is_floating_point",
             "is_complex", "element_size", "get_device", "data_ptr", "storage_offset", "__bool__", "item", "__format__",
             "__repr__", "__hash__", "__eq__"}
# Tensor dunders as the operator or method fx would record (reflected ones with their operands swapped).
_DUNDERS = {"__add__": ("method", "add", False), "__radd__": ("method", "add", True),
            "__iadd__": ("method", "add_", False), "__sub__": ("method", "sub", False),
            "__isub__": ("method", "sub_", False), "__mul__": ("method", "mul", False),
            "__rmul__": ("method", "mul", True), "__imul__": ("method", "mul_", False),
            "__truediv__": ("function", operator.truediv, False), "__getitem__": ("function", operator.getitem, False),
            "__matmul__": ("function", operator.matmul, False)}


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a dict of inputs (a tokenised batch), ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a model's output (a tensor, tuple, list, dict or ``ModelOutput``), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class Recording:
    """A recorded graph: ``graph`` (shape-annotated), ``keys`` (node name -> key stable across runs), ``unknown``
    (tensors that appeared without any recorded operation making them, nor being an input, a parameter, a buffer
    or a module's tensor attribute: what they hold is unknown, so :mod:`merge.align.permute` permutes nothing)."""

    graph: fx.Graph
    keys: dict[str, str] = field(default_factory=dict)
    leaves: tuple[type, ...] = ()
    unknown: list[str] = field(default_factory=list)  # placeholders of tensors made where nothing was recorded

    def replay(self, model: nn.Module, x: Any, wanted: Mapping[str, Any],
               sink: Callable[[str, Tensor], None]) -> None:
        """Run ``model`` on ``x`` and call ``sink(key, output)`` for each node whose key is in ``wanted``, as soon
        as it is computed (an in-place operation later would change it)."""
        with _Recorder(model, self.leaves, build=False, wanted=wanted, sink=sink) as rec:
            rec.run(x)


def record_graph(model: nn.Module, example_input: Any, *, leaves: tuple[type, ...]) -> Recording:
    """Run ``model`` once on ``example_input`` (no gradients) and record what it computes as an ``fx.Graph``.

    Args:
        model: the network (its mode is not changed: put it in eval mode first).
        example_input: a tensor, a tuple of the forward's arguments, or a dict of keyword arguments.
        leaves: module types recorded as one ``call_module`` node each.

    Returns:
        The :class:`Recording`.
    """
    with _Recorder(model, leaves, build=True) as rec:
        rec.run(example_input)
    return Recording(rec.graph, rec.keys, leaves, rec.unknown)


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, leaves: tuple[type, ...], *, build: bool,
                 wanted: Mapping[str, Any] | None = None, sink: Callable[[str, Tensor], None] | None = None):
        super().__init__()
        self.model, self.leaves, self.build = model, leaves, build
        self.wanted, self.sink = wanted or {}, sink
        self.graph = fx.Graph()
        self.keys: dict[str, str] = {}
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> the node that made it
        self.alive: list[Any] = []  # every tensor seen stays alive, so no id is reused during the run
        self.names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        self.attrs: dict[str, fx.Node] = {}
        self.scope: list[str] = []
        self.counts: Counter[str] = Counter()
        self.inside = 0  # > 0 while a leaf runs: its own operations are not recorded
        self.constants = {id(v) for m in model.modules() for v in vars(m).values() if isinstance(v, Tensor)}
        self.started = False  # once the inputs are known, any other tensor nobody recorded is of unknown origin
        self.unknown: list[str] = []
        self.handles: list[Any] = []

    # hooks: the module scope, and leaves as single nodes
    def __enter__(self) -> _Recorder:
        for name, mod in self.model.named_modules():
            # torch.nn's own classes only (as fx's leaves): a subclass elsewhere (a LoRA linear) may compute more
            if isinstance(mod, self.leaves) and type(mod).__module__.startswith("torch.nn"):
                self.handles.append(mod.register_forward_pre_hook(self._leaf_pre(name), with_kwargs=True))
                self.handles.append(mod.register_forward_hook(self._leaf_post(name), with_kwargs=True))
            else:
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave()))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.alive.clear()

    def _enter(self, name: str) -> Callable:
        def hook(_mod: nn.Module, _args: Any) -> None:
            self.scope.append(name)
        return hook

    def _leave(self) -> Callable:
        def hook(_mod: nn.Module, _args: Any, _out: Any) -> None:
            self.scope.pop()
        return hook

    def _leaf_pre(self, name: str) -> Callable:
        def hook(_mod: nn.Module, _args: Any, _kwargs: Any) -> None:
            self.inside += 1
        return hook

    def _leaf_post(self, name: str) -> Callable:
        def hook(_mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            self.inside -= 1
            if self.inside == 0:
                self.add("call_module", name, tuple(args), dict(kwargs), out, key=name)
        return hook

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out  # a leaf's own operations
        name = getattr(func, "__name__", str(func))
        result = out
        if name == "__iter__":
            out = tuple(out)  # the rows, each its own getitem node of the iteration (an unknown method)
            result = iter(out)
        elif not _tensors(out):
            if name in _METADATA or not _tensors((args, kwargs)):
                return out  # sizes, dtypes and flags: concrete values, constants of the graph
            # A tensor written in place (x[i] = v) or read out of torch (x.tolist()): a node the rules do not know, so
            # the units of its inputs stay in place; what was written in place is that node's output from now on.
            out = args[0] if isinstance(args[0], Tensor) and (name == "__setitem__" or name.endswith("_")) else None
        if getattr(torch.Tensor, name, None) is func or getattr(torch._C.TensorBase, name, None) is func:
            kind, target, swap = _DUNDERS.get(name, ("method", name, False))
            if swap:
                args = (args[1], args[0], *args[2:])
            op = "call_method" if kind == "method" else "call_function"
        else:
            op, target = "call_function", func
        scope = self.scope[-1] if self.scope else ""
        self.add(op, target, tuple(args), kwargs, out, key=f"{scope}:{getattr(target, '__name__', target)}")
        return result

    # nodes
    def node_of(self, t: Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is not None:
            return node
        self.alive.append(t)
        name = self.names.get(id(t))
        if name is not None:
            if name not in self.attrs:
                self.attrs[name] = self.graph.get_attr(name)
                self.attrs[name].meta["tensor_meta"] = SimpleNamespace(shape=tuple(t.shape))
            node = self.attrs[name]
        else:
            node = self.graph.placeholder(f"input_{len(self.nodes)}")
            node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(t.shape))
            if not self.started or id(t) in self.constants:
                pass  # an input of the model, or a tensor a module holds as a plain attribute: a constant
            else:
                # Made by something no hook or torch function saw (a custom op, a copy through numpy): it may hold
                # any permuted units, so nothing can be permuted soundly.
                self.unknown.append(node.name)
        self.nodes[id(t)] = node
        return node

    def arg(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            return self.node_of(a)
        if isinstance(a, (tuple, list)):
            return tuple(self.arg(v) for v in a)
        if isinstance(a, Mapping):
            return {k: self.arg(v) for k, v in a.items()}
        if a is None or isinstance(a, (bool, int, float, str, slice, torch.dtype, torch.device)):
            return a
        return repr(a)  # an object the rules never read (an enum, a module): kept as its name

    def add(self, op: str, target: Any, args: tuple, kwargs: dict, out: Any, *, key: str) -> None:
        self.counts[key] += 1
        key = f"{key}#{self.counts[key] - 1}"
        if key in self.wanted and isinstance(out, Tensor) and self.sink is not None:
            self.sink(key, out)
        if not self.build:
            return
        node = self.graph.create_node(op, target, tuple(self.arg(a) for a in args),
                                      {k: self.arg(v) for k, v in kwargs.items()})
        self.keys[node.name] = key
        if isinstance(out, Tensor):
            node.meta["tensor_meta"] = SimpleNamespace(shape=tuple(out.shape))
            self.alive.append(out)
            self.nodes[id(out)] = node
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["tensor_meta"] = SimpleNamespace(shape=tuple(t.shape))
                    self.keys[item.name] = f"{key}[{i}]"
                    self.alive.append(t)
                    self.nodes[id(t)] = item

    def run(self, x: Any) -> None:
        if self.build:
            inputs = _tensors(x)
            for t in inputs:
                self.node_of(t)
        self.started = True
        with torch.no_grad():
            out = call_model(self.model, x)
        if self.build:
            self.graph.output(tuple(self.node_of(t) for t in _tensors(out)))
