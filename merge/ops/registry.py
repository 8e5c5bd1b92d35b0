"""The operator contract and its registry.

An operator is registered once under a name that works the same in the CLI (``--method``), in
recipe files (``merge_method``), in Python and in the tests, which are generated from this registry.
Besides its name and paper, an operator declares:

- its typed parameters, each with a default (or required), a domain, and whether it may differ per
  member (``weight``, ``density``, ``epsilon``, ``gamma``) or is shared (``lambda``, ``t``,
  ``normalize``, ``rescale``);
- whether it needs a base model (``required``), may use one (``optional``) or takes none;
- how the engine streams it (``path``):

  * ``linear``: the result is a fixed linear combination of the members (and base), with
    coefficients that depend only on the parameters: one pass, members folded one at a time into an
    accumulator (uniform and weighted soups);
  * ``gram``: a first pass computes the Gram matrix of the members (dot products, norms), chunk by
    chunk with a bounded tile of members in memory; the operator turns it into coefficients; a
    second pass is a linear combination (SLERP, multi-SLERP, Karcher mean, model stock);
  * ``task``: task vectors ``x_i - base`` are sparsified (magnitude thresholds found by exact
    streaming selection, or keyed random masks), optionally sign-elected, and summed, one member at
    a time (task arithmetic, TIES, DARE, breadcrumbs, DELLA);
  * ``tensor``: the operator's ``tensor_fn`` sees every member's whole copy of one tensor at once
    (and the base's, and each member's auxiliary tensor of that name), in float32 (float64 on
    request) on the merge device: peak memory grows with the member count, about (members + base +
    ``scratch``) copies of the largest tensor, and ``--dry-run`` says so (TSV-M, Iso-C, Iso-CTS, and
    any method that needs a decomposition or a solve over whole tensors);

- whether it is random (DARE, DELLA): a generator keyed by seed, tensor name, member and element
  position, so a chunked run equals a whole-tensor run and reruns are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from merge.errors import InvalidArgumentError, UnknownNameError
from merge.params import REQUIRED, Gradient, Param

__all__ = ["REQUIRED", "Param", "Combination", "Operator", "Resolved", "register", "get_operator", "path_of",
           "list_operators", "OPERATORS", "ALIASES", "resolve_params", "check_weights", "normalised_weights"]

Path_ = Literal["linear", "gram", "task", "tensor"]
AuxPolicy = Literal["none", "optional", "required"]
BasePolicy = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class Resolved:
    """Parameter values for one tensor: ``shared`` by all members, and one dict per member."""

    shared: dict[str, object]
    members: list[dict[str, object]]

    def member(self, name: str) -> list:
        return [m[name] for m in self.members]


@dataclass(frozen=True)
class Combination:
    """A linear combination of the members and the base, the output pass of ``linear`` and ``gram``.

    ``delta=False``: ``out = base_coefficient * base + sum_i c_i x_i``;
    ``delta=True``: ``out = base + sum_i c_i (x_i - base)`` (task vectors, summed as the papers do).
    Members whose coefficient is exactly 0 are not read.
    """

    coefficients: list[float]
    base_coefficient: float = 0.0
    delta: bool = False
    note: str = ""


@dataclass(frozen=True)
class Operator:
    """A registered merge operator (see the module docstring).

    Attributes:
        name: registry key.
        citation: the paper (and code) it follows.
        summary: one line.
        path: ``linear``, ``gram`` or ``task``: how the engine streams it.
        base: ``none``, ``optional`` or ``required``.
        params: its typed parameters.
        random: draws random masks (keyed by seed, tensor, member, position).
        min_members, max_members: how many members (besides the base) it takes.
        combine: ``linear`` path: ``combine(resolved) -> Combination``.
        gram_of: ``gram`` path: ``"raw"`` vectors or ``"delta"`` (``x_i - base``).
        from_gram: ``gram`` path: ``from_gram(gram, resolved, has_base) -> Combination`` with the float64
            Gram matrix of the members' vectors (raw: the base first when the operator uses one).
        task: ``task`` path: the task-vector recipe (:class:`merge.ops.task.TaskSpec`).
        tensor_fn: ``tensor`` path: ``tensor_fn(tensors, base, resolved, *, name, aux) -> Tensor``: the members'
            whole tensors of one name (fresh copies in the compute dtype, on the merge device, the function's to
            overwrite), the base's (or None), the resolved parameters, the tensor's name and ``aux``: None when
            no auxiliary tensors were given, else one dict per member, ``{kind: tensor}`` for that member's
            auxiliary tensors stored as ``NAME:KIND`` (``fc.weight:gram``), empty when it has none for this
            tensor. Returns the merged tensor, of the members' shape. ``seed=`` is passed too when the
            operator is ``random``.
        aux: ``tensor`` path: whether the operator takes per-member auxiliary tensors (``none``, ``optional``,
            ``required``), such as each member's input Gram matrices (RegMean) or diagonal Fisher (Fisher).
        scratch: ``tensor`` path: whole-tensor temporaries ``tensor_fn`` holds besides its inputs (decompositions,
            sums), counted in the memory stated before the merge.
        data: what data the operator needs besides the checkpoints ("" for a data-free operator), for
            ``--list-methods`` and errors.
        path_for: the path for given parameters, where it depends on them (None: always ``path``).
        aliases: other names that resolve to this operator (``linear`` for ``weighted``).
        differences: deliberate differences from the reference code, for ``--list-methods`` and docs.
    """

    name: str
    citation: str
    summary: str
    path: Path_
    base: BasePolicy = "none"
    params: tuple[Param, ...] = ()
    random: bool = False
    min_members: int = 1
    max_members: int | None = None
    combine: Callable[[Resolved], Combination] | None = None
    gram_of: Literal["raw", "delta"] | None = None
    from_gram: Callable[..., Combination] | None = None
    task: object = None
    tensor_fn: Callable[..., object] | None = None
    aux: AuxPolicy = "none"
    scratch: int = 4
    data: str = ""
    path_for: Callable[[Resolved], str] | None = None
    aliases: tuple[str, ...] = ()
    differences: str = ""

    @property
    def scope(self) -> str:
        """The streaming path (kept for callers of the first registry)."""
        return self.path

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise UnknownNameError(f"parameter of method {self.name!r}", name, [p.name for p in self.params])

    def __call__(self, tensors: Sequence, weights: Sequence[float] | None = None, *, base: object = None,
                 seed: int = 0, name: str = "", aux: Sequence | None = None, **params: object):
        """The operator on whole tensors: the definition the streaming engine is tested against.

        Args:
            tensors: the members' tensors of one name (float32 or float64; the result has their dtype).
            weights: per-member weights (the ``weight`` parameter), where the operator takes one.
            base: the base model's tensor, for operators that use one.
            seed: seed of random operators.
            name: the tensor's name (keys the random masks; ``tensor`` operators may read it).
            aux: ``tensor`` operators that take auxiliary tensors: one ``{kind: tensor}`` dict per member.
            **params: parameter values (a scalar, or one value per member for per-member ones).
        """
        if _WHOLE_TENSOR is None:  # merge.ops (and so merge.ops.apply) is imported with any of its modules
            raise RuntimeError("merge.ops.apply, which defines operators on whole tensors, is not imported")
        if weights is not None:
            params = {**params, "weight": list(weights)}
        resolved = resolve_params(self, len(tensors), params)
        return _WHOLE_TENSOR(self, list(tensors), base, resolved, seed=seed, name=name, aux=aux)


def path_of(op: Operator, resolved: Resolved | None) -> str:
    """The streaming path ``op`` takes with these parameters (``path_for`` where the operator has one)."""
    return op.path_for(resolved) if op.path_for is not None and resolved is not None else op.path


# The whole-tensor definition (merge.ops.apply.apply_whole) needs this module's types, so it installs itself
# here when imported rather than being imported from here: the imports run one way, apply -> registry.
_WHOLE_TENSOR: Callable[..., object] | None = None


def set_whole_tensor(fn: Callable[..., object]) -> None:
    """Install the function :meth:`Operator.__call__` applies (``merge.ops.apply`` calls this on import)."""
    global _WHOLE_TENSOR
    _WHOLE_TENSOR = fn


OPERATORS: dict[str, Operator] = {}
ALIASES: dict[str, str] = {}


def register(op: Operator) -> Operator:
    """Add ``op`` (and its aliases) to the registry."""
    for key in (op.name, *op.aliases):
        if key in OPERATORS or key in ALIASES:
            raise ValueError(f"operator {key!r} registered twice")
    if op.path == "tensor" and op.tensor_fn is None:
        raise ValueError(f"operator {op.name!r}: the tensor path needs tensor_fn")
    if op.aux != "none" and op.tensor_fn is None:
        raise ValueError(f"operator {op.name!r}: only tensor-path operators take auxiliary tensors")
    OPERATORS[op.name] = op
    for alias in op.aliases:
        ALIASES[alias] = op.name
    return op


def get_operator(name: str) -> Operator:
    """The operator registered as ``name`` (or one of its aliases).

    Raises:
        UnknownNameError: no such operator; the message lists the valid names.
    """
    key = ALIASES.get(name, name)
    try:
        return OPERATORS[key]
    except KeyError:
        raise UnknownNameError("method", name, list(OPERATORS) + list(ALIASES), option="method") from None


def list_operators() -> list[str]:
    return sorted(OPERATORS)


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-member weights as floats (ones when None), checked against the member count."""
    if weights is None:
        return [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"weights must be numbers, got {list(weights)!r}", option="weights") from None
    if len(w) != n:
        raise InvalidArgumentError(f"got {len(w)} weights for {n} members; give one weight per member "
                                   "(a file listed twice needs two weights)", option="weights")
    if any(not math.isfinite(x) for x in w):
        raise InvalidArgumentError(f"weights must be finite numbers, got {w}", option="weights")
    return w


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one, computed in float64 before any tensor sees them.

    Dividing by the largest weight first keeps the sum finite (``1e308, 1e308``) and away from
    underflow (``1e-320, 1e-320``); each coefficient is then at most 1, so a weighted mean of
    finite members cannot overflow, whatever the weights.

    Raises:
        InvalidArgumentError: a negative weight, or no positive weight.
    """
    w = [float(x) for x in weights]
    if any(x < 0 for x in w):
        raise InvalidArgumentError(f"weights of an average must be non-negative, got {w}", option="weights")
    top = max(w, default=0.0)
    if not top > 0:
        raise InvalidArgumentError(f"weights must have a positive sum, got {w}", option="weights")
    scaled = [x / top for x in w]
    total = math.fsum(scaled)
    return [x / total for x in scaled]


def resolve_params(op: Operator, n_members: int, given: Mapping[str, object] | None = None,
                   member_params: Sequence[Mapping[str, object] | None] | None = None) -> Resolved:
    """Check and resolve an operator's parameters for ``n_members`` members.

    Args:
        op: the operator.
        n_members: members besides the base.
        given: name -> value; a per-member parameter takes a scalar (all members) or one value per member.
        member_params: per-member overrides (a recipe's ``models[i].parameters``), winning over ``given``.

    Raises:
        InvalidArgumentError: unknown parameter (the message lists the valid ones), a missing required
            one, a value out of its domain, or a list of the wrong length.
    """
    given = dict(given or {})
    valid = {p.name: p for p in op.params}
    unknown = [k for k in given if k not in valid]
    for m in member_params or ():
        unknown += [k for k in (m or {}) if k not in valid]
    if unknown:
        names = ", ".join(sorted(valid)) or "none"
        # No ``option``: the fix is to drop or rename the parameter, not to set it.
        raise InvalidArgumentError(f"method {op.name!r} has no parameter {unknown[0]!r}; its parameters: {names}")
    shared: dict[str, object] = {}
    members: list[dict[str, object]] = [{} for _ in range(n_members)]
    for p in op.params:
        value = given.get(p.name, p.default)
        if isinstance(value, Gradient):  # evaluated per tensor by merge.soups (plan_soup); never one per member
            raise InvalidArgumentError(f"method {op.name!r}: parameter {p.name} is a gradient over the layers "
                                       f"{list(value)}, which a whole-model plan cannot take; give one value",
                                       option=p.name)
        if not p.per_member:
            if isinstance(value, (list, tuple)):
                raise InvalidArgumentError(f"method {op.name!r}: parameter {p.name} is shared by all members; "
                                           f"give one value, got {list(value)}", option=p.name)
            if value is REQUIRED:
                raise InvalidArgumentError(f"method {op.name!r} needs parameter {p.name} ({p.help})", option=p.name)
            shared[p.name] = p.check(value, method=op.name)
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n_members
        if len(values) != n_members:
            raise InvalidArgumentError(f"method {op.name!r}: got {len(values)} values of {p.name} for {n_members} "
                                       "members; give one, or one per member", option=p.name)
        for i in range(n_members):
            v = values[i]
            if member_params is not None and i < len(member_params) and p.name in (member_params[i] or {}):
                v = member_params[i][p.name]
            if v is REQUIRED:
                raise InvalidArgumentError(f"method {op.name!r} needs parameter {p.name} for member {i} ({p.help})",
                                           member=i, option=p.name)
            members[i][p.name] = p.check(v, method=op.name, member=i)
    return Resolved(shared, members)


# Shared parameter definitions (the names and defaults are mergekit's, so its recipes read the same).
def weight_param(default: object = 1.0, help: str = "weight of each member") -> Param:
    return Param("weight", default, float, per_member=True, help=help)

