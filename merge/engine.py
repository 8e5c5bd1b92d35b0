"""The streaming merge loop: sources x operator -> sink, one tensor (and one chunk) at a time.

For every tensor name, in storage order, a kernel reduces the members' chunks (read ahead by
:class:`merge.reader.ChunkReader`) and hands the result to the sink, chunk by chunk:

- ``linear`` operators (uniform, weighted): one pass; each member's chunk is converted to the
  accumulator dtype (float32, or float64 on request or for float64 members) and folded into the
  accumulator with its coefficient (the weights normalised in float64 first), then cast once;
- ``gram`` operators (SLERP, multi-SLERP, Karcher, model stock): a first pass computes the float64
  Gram matrix of the members, unit by unit, holding at most :data:`GRAM_TILE` members' chunks at
  once; the operator turns it into coefficients; a second pass is a linear combination;
- ``task`` operators (task arithmetic, TIES, DARE, breadcrumbs, DELLA): passes over each member,
  one at a time, find its magnitude thresholds (exact radix selection) or rescale factor; then one
  pass folds every member's sparsified task vector into a fixed set of running sums;
- ``tensor`` operators (TSV-M, Iso-C, Iso-CTS): every member's whole copy of one tensor (and the
  base's, and each member's auxiliary tensor of that name) is read, chunk by chunk, into the compute
  dtype on the merge device; the operator's function returns the merged tensor, which is emitted
  chunk by chunk; everything is freed before the next tensor.

Peak memory is the reader's pool plus a fixed number of chunks (stated per operator by
:attr:`MergePlan.buffer_bytes` before anything is read): it does not depend on the number of
members or on the size of the model. The ``tensor`` path is the exception: it holds about
(members + base + the operator's ``scratch``) copies of the largest tensor, which
:attr:`MergePlan.memory_note` states.

NaN and infinity: a chunk whose sum is not finite makes the engine look, once the tensor is done,
for the member that holds a NaN or an infinity; it is reported as a :class:`NonFiniteWarning`
naming the member and the tensor (``strict=True``: a :class:`NonFiniteError`). ``linear`` and
``task`` operators carry such values into the elements they touch; ``gram`` operators take norms
and angles of whole tensors, so the whole output tensor is NaN (and the warning says so). A
non-finite result from finite members (an overflow) is always an error: in the accumulator, and at
the cast to the output dtype (a float16 or bfloat16 output of values beyond its range).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from merge.errors import (DeviceUnavailableError, InvalidArgumentError, MergeError, MismatchError, NonFiniteWarning,
                          PartialBufferWarning)
from merge.backend.arrays import HOST, NUMPY, ArrayDType, arrays_for, arrays_of
from merge.io.dtypes import dtype_name, is_float
from merge.io.sources import Source, StateDictSource, TensorInfo
from merge.io.writer import Sink
from merge.ops import Combination, Operator, Resolved, resolve_params
from merge.ops.registry import path_of
from merge.ops.rng import spread, torch_on_one_thread
from merge.ops.task import TaskTensor
from merge.ops.apply import (UNIT, apply_tensor, check_combination, coefficient_option, combination_from_gram,
                             compute_dtype, fold_combination, gram_pairs, gram_vectors, GramSums,
                             single_thread, unit_dots)
from merge.backend.lazy import lazy_torch
from merge.reader import POOL_BUFFERS, ChunkReader, Read

# The linear and copy kernels run on the array backend of the plan's dtypes (merge.backend.arrays): torch, or numpy for
# merges that need no torch. The other kernels use torch, imported on first use.
torch = lazy_torch(__name__)

__all__ = ["TensorPlan", "MergePlan", "plan_merge", "run_merge", "resolve_device", "Sink", "MemorySink",
           "ON_MISMATCH", "NonFiniteWarning", "NonFiniteError", "MergeStats"]

ON_MISMATCH = ("error", "skip", "first")
# Accumulator chunk. On the CPU, 2 MiB stays in cache (the sweet spot measured with bench_soup.py);
# on a GPU, larger chunks amortise the per-chunk launch and host synchronisation.
DEFAULT_CHUNK_BYTES = 2 << 20
GPU_CHUNK_BYTES = 64 << 20
# Members whose chunks the Gram pass holds at once; more members are taken in tiles (re-reading).
GRAM_TILE = 8
CPU_GRAM_UNITS = 8  # UNITs per read in the CPU's Gram pass
# Elements per chunk of the Gram pass on a GPU (a tile of GRAM_TILE + 2 float64 rows: 320 MB of device memory).
GPU_GRAM_CHUNK = 1 << 22
# A task-vector merge's magnitude selection (TIES, breadcrumbs) holds one member's whole tensor of magnitudes,
# up to this size, to run its radix levels from one read instead of one read per level.
WHOLE_SELECT_BYTES = 256 << 20
# The numpy lane's task kernels split a chunk's elements across threads in parts of at least this many (the default
# chunk of 2 MiB of float32 is two parts): smaller parts would cost more in dispatch than they save.
SPLIT_GRAIN = 1 << 18


class NonFiniteError(MergeError, ValueError):
    """A member holds NaN or infinite values (with ``strict``), or the merge overflowed."""


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one output tensor: ``reduce`` over the members, or ``copy`` from one source.

    ``in_dtypes`` lists the members' dtypes (then the base's, when the operator uses a base);
    ``resolved`` holds the operator's parameters for this tensor; ``copy_from`` is the source a copy
    comes from (0: member 0; ``len(members)``: the base).
    """

    name: str
    action: str  # "reduce" | "copy"
    in_dtypes: tuple[torch.dtype, ...]
    out: TensorInfo
    resolved: Resolved | None = None
    copy_from: int = 0


@dataclass
class MergePlan:
    """Everything decided before the first byte is read: validated, with memory known in advance."""

    sources: list[Source]
    operator: Operator
    weights: list[float]
    tensors: list[TensorPlan]
    accumulate: torch.dtype
    device: torch.device
    chunk_elems: int
    base: Source | None = None
    params: dict = field(default_factory=dict)
    seed: int = 0
    strict: bool = False
    skipped: list[str] = field(default_factory=list)
    copied_mismatched: list[str] = field(default_factory=list)
    combination: Combination | None = None
    aux: list[Source | None] | None = None

    @property
    def all_sources(self) -> list[Source]:
        """Members, then the base (when there is one)."""
        return self.sources + ([self.base] if self.base is not None else [])

    @property
    def read_sources(self) -> list[Source]:
        """The reader's source indices: members, the base, then the members' auxiliary sources that are given."""
        return self.all_sources + [a for a in (self.aux or ()) if a is not None]

    def aux_index(self, member: int) -> int | None:
        """The reader's index of member ``member``'s auxiliary source (None: that member has none)."""
        if self.aux is None or self.aux[member] is None:
            return None
        return len(self.all_sources) + sum(a is not None for a in self.aux[:member])

    def aux_of(self, member: int, name: str) -> dict[str, TensorInfo]:
        """Member ``member``'s auxiliary tensors for tensor ``name``: kind -> the stored ``NAME:KIND`` tensor."""
        if self.aux is None or self.aux[member] is None:
            return {}
        tables = self.__dict__.get("_aux_tables")
        if tables is None:  # built once per plan (a plan split over processes builds its own)
            tables = self.__dict__["_aux_tables"] = [_aux_table(a) if a is not None else {} for a in self.aux]
        return tables[member].get(name, {})

    @property
    def memory_note(self) -> str:
        """How the working memory scales: independent of the member count, except on the ``tensor`` path."""
        ks = [k for k in self.kernels() if isinstance(k, _TensorKernel)]
        if not ks:
            return "independent of member count"
        top = max(ks, key=lambda k: k.work_bytes())
        copies = top.copies()
        return (f"grows with the member count: {copies} whole copies of the largest tensor, {top.name!r} "
                f"{list(top.tp.out.shape)}, in {dtype_name(top.dtype)}: members + base + {self.operator.scratch} "
                f"for {self.operator.name}'s working space")

    @property
    def coefficients(self) -> list[float]:
        return list(self.combination.coefficients) if self.combination is not None else []

    def kernels(self) -> list[_Kernel]:
        return [_make_kernel(self, t) for t in self.tensors]

    @property
    def read_bytes(self) -> int:
        """Bytes the merge reads (every pass of every operator counted)."""
        return sum(r.nbytes for k in self.kernels() for r in k.reads())

    @property
    def out_bytes(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)

    @property
    def buffer_bytes(self) -> int:
        """Peak working memory the loop allocates: the reader's pool and the largest kernel's buffers."""
        ks = self.kernels()
        pool = POOL_BUFFERS * max((k.max_read_bytes() for k in ks), default=1)
        return pool + max((k.work_bytes() for k in ks), default=0)


class MemorySink(Sink):
    """Collects the output into CPU tensors (for :func:`merge.average`)."""

    def begin(self, tensors: Sequence[TensorInfo]) -> None:
        self.tensors = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in tensors}
        self._pos = dict.fromkeys(self.tensors, 0)

    def write(self, name: str, data: memoryview) -> None:
        flat = self.tensors[name].view(-1).view(torch.uint8)
        pos = self._pos[name]
        flat[pos: pos + len(data)].copy_(torch.frombuffer(data, dtype=torch.uint8))
        self._pos[name] = pos + len(data)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check a device before any work: CPU always, CUDA only where torch sees that GPU.

    Raises:
        DeviceUnavailableError: CUDA asked for on a machine without it (or a GPU index out of range).
    """
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}; use cpu, cuda or cuda:N", option="device") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InvalidArgumentError(f"device {device!r} is not supported; use cpu, cuda or cuda:N", option="device")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} asked for, but CUDA is not available on this machine (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); reduce on the CPU", option="device", choices=("cpu",))
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {device!r} asked for, but this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s): use cuda:0 .. "
                                     f"cuda:{torch.cuda.device_count() - 1}", option="device")
    return torch.device("cuda", index)


def _check_arguments(op: Operator, n: int, base: Source | None, on_mismatch: str) -> None:
    """What a plan needs before any tensor is looked at: a known mismatch policy, the member count, the base."""
    if on_mismatch not in ON_MISMATCH:
        raise InvalidArgumentError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}",
                                   option="on_mismatch", choices=ON_MISMATCH)
    # The base first: slerp given two members and no base lacks a base, not a member too many.
    if op.base == "required" and base is None:
        raise InvalidArgumentError(f"method {op.name!r} needs a base model (the checkpoint the members were "
                                   "fine-tuned from)", option="base")
    if n < op.min_members:
        raise InvalidArgumentError(f"method {op.name!r} needs at least {op.min_members} member(s) besides the base, "
                                   f"got {n}", option="members")
    if op.max_members is not None and n > op.max_members:
        raise InvalidArgumentError(f"method {op.name!r} takes at most {op.max_members} member(s) besides the base, "
                                   f"got {n}", option="members")
    if op.base == "none" and base is not None:
        raise InvalidArgumentError(f"method {op.name!r} takes no base model; list it as a member instead",
                                   option="base")


def _takes_weights(op: Operator) -> bool:
    return any(p.name == "weight" for p in op.params)


def _operator_params(op: Operator, weights: Sequence[float] | None,
                     params: Mapping[str, object] | None) -> dict[str, object]:
    """The operator's parameters, the weights among them as ``weight`` (``uniform`` ignores weights)."""
    given = dict(params or {})
    if weights is not None:
        given["weight"] = list(weights)
    if "weight" in given and not _takes_weights(op):
        if op.name != "uniform":
            raise InvalidArgumentError(f"method {op.name!r} takes no weights", option="weights")
        given.pop("weight")
    return given


def _params_by_tensor(op: Operator, n: int, default: Resolved, weights: Sequence[float] | None,
                      resolve: Callable[[str], tuple[Mapping[str, object], Sequence[Mapping[str, object]] | None]]
                      | None) -> Callable[[str], Resolved]:
    """``name -> resolved parameters``: the plan's own, or a recipe's for that tensor name."""
    if resolve is None:
        return lambda name: default

    def resolved(name: str) -> Resolved:
        p, mp = resolve(name)
        return resolve_params(op, n, {**p, **({"weight": list(weights)} if weights else {})}, mp)

    return resolved


def _tensor_names(first: Source, everyone: Sequence[Source]) -> list[str]:
    """Every tensor name: ``first``'s in its storage order, then those only the other sources hold."""
    names = list(first.infos)
    seen = set(names)
    for src in everyone:
        for name in src.infos:
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def _plan_tensor(name: str, infos: Sequence[TensorInfo | None], *, copy_from: int, dtype: torch.dtype | None,
                 params_of: Callable[[str], Resolved]) -> TensorPlan | None:
    """The plan of one tensor, or None when the sources disagree on it (missing, shape or dtype)."""
    if any(i is None for i in infos) or len({(i.shape, i.dtype) for i in infos}) != 1:
        return None
    info = infos[copy_from]
    if not is_float(info.dtype):  # integer buffers (num_batches_tracked), bools: copied, never averaged
        return TensorPlan(name, "copy", (info.dtype,), info, None, copy_from)
    out = TensorInfo(name, dtype or info.dtype, info.shape)
    return TensorPlan(name, "reduce", tuple(i.dtype for i in infos), out, params_of(name))


@dataclass
class _TensorPlans:
    """Every output tensor's plan, and the names left out by the mismatch policy."""

    tensors: list[TensorPlan] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # with on_mismatch="error": reported, nothing planned
    skipped: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    partial: list[tuple[str, list[int]]] = field(default_factory=list)  # non-float, missing from these sources


def _plan_partial_buffer(name: str, infos: Sequence[TensorInfo | None], copy_from: int) -> TensorPlan | None:
    """A non-float tensor some sources lack, the others agreeing on its shape and dtype: copied from ``copy_from``
    when it has it, else from the first source that does. None for anything else (a float tensor stays a mismatch)."""
    present = [i for i, info in enumerate(infos) if info is not None]
    if not present or len(present) == len(infos):
        return None
    if any(is_float(infos[i].dtype) for i in present) or len({(infos[i].shape, infos[i].dtype) for i in present}) != 1:
        return None
    src = copy_from if infos[copy_from] is not None else present[0]
    info = infos[src]
    return TensorPlan(name, "copy", (info.dtype,), info, None, src)


def _plan_tensors(everyone: Sequence[Source], *, copy_from: int, dtype: torch.dtype | None, on_mismatch: str,
                  params_of: Callable[[str], Resolved]) -> _TensorPlans:
    """Plan every tensor name; a non-float one some sources lack is copied from one that has it; another
    mismatched one is reported, skipped or taken from member 0 per ``on_mismatch``."""
    plans = _TensorPlans()
    for name in _tensor_names(everyone[copy_from], everyone):
        infos = [src.infos.get(name) for src in everyone]
        tp = _plan_tensor(name, infos, copy_from=copy_from, dtype=dtype, params_of=params_of)
        if tp is None and (tp := _plan_partial_buffer(name, infos, copy_from)) is not None:
            plans.partial.append((name, [i for i, info in enumerate(infos) if info is None]))
        if tp is not None:
            plans.tensors.append(tp)
        elif on_mismatch == "error":
            plans.mismatched.append(name)
        elif on_mismatch == "first" and infos[0] is not None:  # member 0's, as the option says, not the base's
            info = infos[0]
            plans.copied.append(name)
            out = TensorInfo(name, dtype or info.dtype, info.shape) if is_float(info.dtype) else info
            plans.tensors.append(TensorPlan(name, "copy", (info.dtype,), out, None, 0))
        else:
            plans.skipped.append(name)
    return plans


def _warn_partial(partial: Sequence[tuple[str, list[int]]], plans: Sequence[TensorPlan], everyone: Sequence[Source],
                  n: int) -> None:
    """One line per non-float tensor some sources lack: which lack it, and where it was copied from."""
    def who(i: int) -> str:
        return f"{'member ' + str(i) if i < n else 'the base'} ({everyone[i].path})"

    by_name = {t.name: t for t in plans}
    for name, missing in partial:
        tp = by_name[name]
        shown = ", ".join(who(i) for i in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        warnings.warn(PartialBufferWarning(
            f"tensor {name!r} ({dtype_name(tp.out.dtype)} {list(tp.out.shape)}) is missing from {shown}; it is not a "
            f"float tensor, so it is copied, not merged: taken from {who(tp.copy_from)}"), stacklevel=4)


def _describe(src: Source, name: str) -> str:
    info = src.infos.get(name)
    return "missing" if info is None else f"{list(info.shape)} {dtype_name(info.dtype)}"


def _mismatch_error(bad: Sequence[str], everyone: Sequence[Source], n: int) -> MismatchError:
    """Each offending tensor (the first 20) with every member's (and the base's) shape and dtype."""
    shown = bad[:20]
    labels = [f"[{i}]" if i < n else "[base]" for i in range(len(everyone))]
    lines = [f"  {name}: " + "; ".join(f"{lab} {_describe(s, name)}" for lab, s in zip(labels, everyone))
             for name in shown]
    more = f"\n  ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    return MismatchError(f"members disagree on {len(bad)} tensor(s) (name: [member] shape dtype):\n"
                         + "\n".join(lines) + more
                         + "\nfix the inputs, or drop those tensors (skip) or take member 0's (first)",
                         tensor=bad[0], option="on_mismatch", choices=("skip", "first"))


def _aux_sources(op: Operator, n: int, aux: Sequence[Source | Mapping[str, torch.Tensor] | None] | None
                 ) -> list[Source | None] | None:
    """The members' auxiliary sources, checked against what the operator takes (dicts wrapped as sources)."""
    if aux is None:
        if op.aux == "required":
            raise InvalidArgumentError(f"method {op.name!r} needs auxiliary tensors, one source per member",
                                       option="aux")
        return None
    if op.aux == "none":
        raise InvalidArgumentError(f"method {op.name!r} takes no auxiliary tensors", option="aux")
    aux = list(aux)
    if len(aux) != n:
        raise InvalidArgumentError(f"got {len(aux)} auxiliary sources for {n} members; give one per member "
                                   "(None for a member without one)", option="aux")
    out: list[Source | None] = []
    for i, a in enumerate(aux):
        if a is None or isinstance(a, Source):
            out.append(a)
        elif isinstance(a, Mapping):
            out.append(StateDictSource(a, path=f"<aux {i}>", normalise=False))
        else:
            raise InvalidArgumentError(f"auxiliary source of member {i} is a {type(a).__name__}; give an open "
                                       "source, a dict of tensors or None", member=i, option="aux")
        if out[-1] is not None:
            bad = [k for k in out[-1].infos if not _aux_key(k)]
            if bad:
                raise InvalidArgumentError(f"auxiliary tensors of member {i} ({out[-1].path}): key {bad[0]!r} is not "
                                           "NAME:KIND (the tensor it belongs to, a colon, what it is: fc.weight:gram)",
                                           member=i, option="aux")
    return out


def _aux_key(key: str) -> tuple[str, str] | None:
    """``"fc.weight:gram"`` -> ``("fc.weight", "gram")``; None for a key that is not ``NAME:KIND``."""
    name, sep, kind = key.rpartition(":")
    return (name, kind) if sep and name and kind else None


def _aux_table(src: Source) -> dict[str, dict[str, TensorInfo]]:
    """``name -> {kind: info}`` of an auxiliary source."""
    table: dict[str, dict[str, TensorInfo]] = {}
    for key, info in src.infos.items():
        name, kind = _aux_key(key)
        table.setdefault(name, {})[kind] = info
    return table


def _chunk_elems(chunk_bytes: int | None, device: torch.device, accumulate: torch.dtype) -> int:
    """Accumulator elements per chunk (see DEFAULT_CHUNK_BYTES and GPU_CHUNK_BYTES)."""
    if chunk_bytes is None:
        chunk_bytes = GPU_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    return max(1, chunk_bytes // accumulate.itemsize)


def plan_merge(sources: Sequence[Source], operator: Operator, *, weights: Sequence[float] | None = None,
               params: Mapping[str, object] | None = None,
               member_params: Sequence[Mapping[str, object] | None] | None = None,
               base: Source | None = None, seed: int = 0, dtype: torch.dtype | None = None,
               accumulate: torch.dtype | None = None, device: torch.device | None = None,
               on_mismatch: str = "error", chunk_bytes: int | None = None, strict: bool = False,
               resolve: Callable[[str], tuple[Mapping[str, object],
                                              Sequence[Mapping[str, object]] | None]] | None = None,
               aux: Sequence[Source | Mapping[str, torch.Tensor] | None] | None = None,
               ) -> MergePlan:
    """Validate the members (and base) against each other and decide every output tensor.

    Args:
        sources: the members.
        operator: from :func:`merge.ops.get_operator`.
        weights: one per member (the operator's ``weight`` parameter).
        params: the operator's parameters (a scalar, or one value per member for per-member ones).
        member_params: per-member overrides.
        base: the base model, for operators that take one.
        seed: seed of random operators.
        on_mismatch: what to do with a tensor the members (and base) disagree on (missing from some, or of
            another shape or dtype): ``"error"`` (default), ``"skip"`` it, or take member 0's (``"first"``;
            cast to ``dtype`` if it is a float tensor; skipped if member 0 lacks it). Whatever the policy, a
            non-float tensor (an integer buffer such as ``position_ids``) that only some sources hold, all of
            them alike, is copied, as non-float tensors always are: from the base when it has it, else from
            the first member that does, with a :class:`merge.errors.PartialBufferWarning`.
        resolve: for recipes whose parameters depend on the tensor name: ``resolve(name) -> (params,
            member_params)``.
        aux: for ``tensor`` operators that take them: one entry per member, a source (or a dict of tensors)
            holding that member's auxiliary tensors keyed by the tensor name they belong to (RegMean's input
            Gram matrix under the linear layer's weight name), or None for a member without any. Read
            lazily, one tensor at a time, like the members.

    Raises:
        MismatchError: (with ``on_mismatch="error"``) members differ in names, shapes or dtypes (float
            tensors, or non-float ones that differ where present); the message lists each offending tensor
            with every member's shape and dtype.
        InvalidArgumentError: a bad parameter, a missing base, or a member count the operator refuses.
    """
    if accumulate is None:
        accumulate = torch.float32
    if device is None:  # the numpy backend's dtypes (merge.backend.arrays) run on the host, without torch
        device = HOST if isinstance(accumulate, ArrayDType) else torch.device("cpu")
    op, n = operator, len(sources)
    _check_arguments(op, n, base, on_mismatch)
    aux_sources = _aux_sources(op, n, aux)
    given = _operator_params(op, weights, params)
    default_resolved = resolve_params(op, n, given, member_params)
    everyone = list(sources) + ([base] if base is not None else [])
    copy_from = n if base is not None else 0  # copies come from the base when there is one
    plans = _plan_tensors(everyone, copy_from=copy_from, dtype=dtype, on_mismatch=on_mismatch,
                          params_of=_params_by_tensor(op, n, default_resolved, weights, resolve))
    if plans.mismatched:
        raise _mismatch_error(plans.mismatched, everyone, n)
    _warn_partial(plans.partial, plans.tensors, everyone, n)
    if not plans.tensors:
        raise MismatchError("the members share no tensor: nothing to merge")
    combination = op.combine(default_resolved) if path_of(op, default_resolved) == "linear" else None
    member_weights = list(default_resolved.member("weight")) if _takes_weights(op) else [1.0] * n
    plan = MergePlan(list(sources), op, member_weights, plans.tensors, accumulate, device,
                     _chunk_elems(chunk_bytes, device, accumulate), base, given, int(seed), bool(strict),
                     plans.skipped, plans.copied, combination, aux_sources)
    plan.kernels()  # every per-tensor check (e.g. DELLA's epsilon against each density) before any output
    return plan


# ---- kernels: one per output tensor; reads() is the fixed schedule, run() consumes it ----------------------

class _IO:
    """What a kernel sees of the loop: the reader, the sink, and conversion buffers."""

    def __init__(self, plan: MergePlan, reader: ChunkReader, sink: Sink):
        self.plan, self.reader, self.sink = plan, reader, sink
        self.device = plan.device
        self.cuda = self.device.type == "cuda"
        self.xp = arrays_for(plan.accumulate)
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self.written = 0
        self.threads = 1  # the CPU threads the kernels may spread work over (set by the merge loop)

    def take(self, source: int, name: str, start: int, count: int):
        return self.reader.take(source, name, start, count)

    def take_as(self, out: torch.Tensor, source: int, name: str, start: int, count: int) -> torch.Tensor:
        """Read a chunk and convert it into ``out[:count]`` (the compute dtype)."""
        c = self.reader.take(source, name, start, count)
        dst = out[:count]
        self.xp.convert_into(dst, c.tensor)  # converting into a reused buffer is ~3.5x faster than a mixed-dtype add_
        c.release()
        return dst

    def emit(self, name: str, res: torch.Tensor) -> None:
        """Write one chunk of output (already in the output dtype) to the sink."""
        if self.cuda:
            hb = self._host.get(res.dtype)
            if hb is None or hb.numel() < res.numel():
                hb = self._host[res.dtype] = torch.empty(res.numel(), dtype=res.dtype, pin_memory=True)
            hb[: res.numel()].copy_(res)  # synchronous: the bytes are on the host when this returns
            res = hb[: res.numel()]
        data = self.xp.memoryview(res)
        if len(data):
            self.sink.write(name, data)
        self.written += len(data)


def _chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, also for the float8 dtypes torch has no isfinite of (and numpy arrays)."""
    return arrays_of(t).all_finite(t)


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (a sum first: the exact check only when it is not)."""
    xp = arrays_of(t)
    if not xp.numel(t):
        return True
    if t.dtype.itemsize > 1 and xp.sum_is_finite(t):
        return True
    return xp.all_finite(t)


class _Kernel:
    def __init__(self, plan: MergePlan, tp: TensorPlan):
        self.plan, self.tp = plan, tp
        self.name = tp.name
        self.numel = tp.out.numel
        self.n = len(plan.sources)
        self.base_index = self.n if plan.base is not None else None
        self.dtype = compute_dtype(*tp.in_dtypes, accumulate=plan.accumulate)
        self.chunk = min(max(1, plan.chunk_elems), max(1, self.numel))
        self.suspect = False     # a statistic or an output chunk was not finite: look for the member
        self.overflow = False    # the output itself was not finite
        self.cast_overflow: float | None = None  # largest |value| of a finite result the output dtype turned to inf
        self.whole = False       # a gram operator saw a non-finite member: the whole tensor is NaN

    def dt(self, source: int) -> torch.dtype:
        return self.tp.in_dtypes[source] if source < len(self.tp.in_dtypes) else self.tp.in_dtypes[0]

    def read(self, source: int, start: int, count: int) -> Read:
        return Read(source, self.name, start, count, self.dt(source))

    def max_read_bytes(self) -> int:
        return max(self.chunk * max(d.itemsize for d in self.tp.in_dtypes), 1)

    def work_bytes(self) -> int:
        return 0

    def reads(self) -> Iterator[Read]:
        raise NotImplementedError

    def run(self, io: _IO) -> None:
        raise NotImplementedError

    def _emit(self, io: _IO, acc: torch.Tensor, out_buf: dict) -> None:
        finite = _finite(acc)
        if not finite:
            self.suspect = self.overflow = True
        res = acc
        xp = io.xp
        if self.tp.out.dtype != (self.dtype if xp is NUMPY else acc.dtype):  # numpy holds bfloat16 as uint16
            res = self._out_view(xp, acc, out_buf)
            xp.convert_into(res, acc)
            if finite:
                self._check_cast(acc, res)
        io.emit(self.name, res)

    def _emit_parts(self, io: _IO, acc: torch.Tensor, out_buf: dict, each: Callable[[Callable], None],
                    first: Callable[[int, int], None]) -> None:
        """:meth:`_emit` of a chunk that ``first(lo, hi)`` computes part by part, with every pass over the elements run
        by ``each`` (``fn(lo, hi)`` over the parts, see _TaskKernel._each): each part is computed, checked finite,
        converted to the output dtype and its cast checked. Every check is exact (a float sum is finite only where
        every element is), so the flags, the bytes and what is noted are those of :meth:`_emit`."""
        xp = io.xp
        if self.tp.out.dtype.itemsize == 1:  # float8: torch's saturation check
            each(first)
            self._emit(io, acc, out_buf)
            return
        convert = self.tp.out.dtype != self.dtype
        res = self._out_view(xp, acc, out_buf) if convert else acc
        finite: dict[int, bool] = {}
        cast: dict[int, bool] = {}

        def part(lo: int, hi: int) -> None:
            first(lo, hi)
            finite[lo] = _finite(acc[lo:hi])
            if convert:
                xp.convert_into(res[lo:hi], acc[lo:hi])
                cast[lo] = _finite(res[lo:hi])

        each(part)
        if not all(finite.values()):
            self.suspect = self.overflow = True
        elif not all(cast.values()):
            self._check_cast(acc, res)  # the overflow's largest magnitude, from the whole chunk as _emit takes it
        io.emit(self.name, res)

    def _out_view(self, xp, acc: torch.Tensor, out_buf: dict) -> torch.Tensor:
        """The first ``len(acc)`` elements of the kernel's output-dtype buffer (``out_buf["out"]``, made once)."""
        ob = out_buf.get("out")
        if ob is None:
            ob = out_buf["out"] = xp.empty(self.chunk, self.tp.out.dtype, getattr(acc, "device", None))
        return ob[: xp.numel(acc)]

    def _check_cast(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Note a finite chunk that the cast to the output dtype overflowed (float16 past 65504)."""
        xp = arrays_of(after)
        if not xp.numel(after):
            return
        if after.dtype.itemsize == 1:  # float8: torch saturates float8_e4m3fn at 448 instead of overflowing
            big = float(before.abs().max())
            fi = torch.finfo(after.dtype)
            bad = big >= fi.max + fi.eps * 2.0 ** math.floor(math.log2(fi.max)) / 2 or not _all_finite(after)
        else:
            bad = not _finite(after)  # a sum first (one pass, no mask); the exact check only when it is not finite
            big = xp.abs_max(before) if bad else 0.0
        if bad:
            self.suspect = True
            self.cast_overflow = max(self.cast_overflow or 0.0, big)


class _CopyKernel(_Kernel):
    def __init__(self, plan: MergePlan, tp: TensorPlan):
        super().__init__(plan, tp)
        self.chunk = min(max(1, plan.chunk_elems), max(1, self.numel))

    def reads(self) -> Iterator[Read]:
        for start, count in _chunks(self.numel, self.chunk):
            yield Read(self.tp.copy_from, self.name, start, count, self.tp.in_dtypes[0])

    def run(self, io: _IO) -> None:
        for start, count in _chunks(self.numel, self.chunk):
            c = io.take(self.tp.copy_from, self.name, start, count)
            x = c.tensor
            if self.tp.out.dtype != c.dtype:  # a mismatched float tensor taken from one source and cast to dtype
                y = io.xp.convert(x, self.tp.out.dtype)
                if _finite(x):
                    self._check_cast(x, y)
                x = y
            io.emit(self.name, x)
            c.release()


class _LinearKernel(_Kernel):
    """Output pass of ``linear`` and ``gram`` operators: a fixed combination folded member by member."""

    def __init__(self, plan: MergePlan, tp: TensorPlan, comb: Combination | None = None):
        super().__init__(plan, tp)
        self.comb = comb
        if comb is not None:
            check_combination(comb, self.dtype, method=plan.operator.name, option=coefficient_option(plan.operator))

    def work_bytes(self) -> int:
        return self.chunk * (3 * self.dtype.itemsize + self.tp.out.dtype.itemsize)

    def _needs_base(self) -> bool:
        return self.base_index is not None and (self.comb is None or self.comb.delta or self.comb.base_coefficient != 0)

    def _members(self) -> list[int]:
        if self.comb is None:  # decided after a first pass: read every member
            return list(range(self.n))
        return [i for i, c in enumerate(self.comb.coefficients) if c != 0]

    def reads(self) -> Iterator[Read]:
        members = self._members()
        for start, count in _chunks(self.numel, self.chunk):
            if self._needs_base():
                yield self.read(self.base_index, start, count)
            for i in members:
                yield self.read(i, start, count)

    def run(self, io: _IO, comb: Combination | None = None) -> None:
        comb = comb or self.comb
        members = self._members()
        needs_base = self._needs_base()
        dev, xp = io.device, io.xp
        acc = xp.empty(self.chunk, self.dtype, dev)
        tmp = xp.empty(self.chunk, self.dtype, dev)
        xbuf = xp.empty(self.chunk, self.dtype, dev)
        bbuf = xp.empty(self.chunk, self.dtype, dev) if needs_base else None
        out_buf: dict = {}
        held: list = []  # the chunk whose pool buffer the fold is reading (CPU: used in place)

        def member(i: int, start: int, count: int, pending: Iterator[int]) -> torch.Tensor:
            # members come in schedule order; scheduled ones with coefficient 0 are read and skipped
            for c in held:
                c.release()
            held.clear()
            for j in pending:
                c = io.take(j, self.name, start, count)
                if j != i:
                    c.release()
                    continue
                x = c.tensor
                if c.dtype != self.dtype:
                    # converting into a reused buffer is ~3.5x faster than a mixed-dtype add_
                    dst = xbuf[:count]
                    xp.convert_into(dst, x)
                    c.release()
                    return dst
                held.append(c)
                return x
            raise RuntimeError(f"member {i} is not scheduled")

        for start, count in _chunks(self.numel, self.chunk):
            b = io.take_as(bbuf, self.base_index, self.name, start, count) if needs_base else None
            pending = iter(members)
            fold_combination(comb, lambda i, s=start, c=count, p=pending: member(i, s, c, p), b, acc[:count],
                             tmp[:count])
            for c in held:
                c.release()
            held.clear()
            for j in pending:  # scheduled members after the last non-zero coefficient
                io.take(j, self.name, start, count).release()
            self._emit(io, acc[:count], out_buf)


class _GramKernel(_LinearKernel):
    """A first pass for the Gram matrix, then the linear output pass."""

    def __init__(self, plan: MergePlan, tp: TensorPlan):
        super().__init__(plan, tp, None)
        op = plan.operator
        self.mode = gram_vectors(op, plan.base is not None)
        if self.mode == "delta":
            self.vectors = list(range(self.n))
        else:
            self.vectors = ([self.base_index] if self.base_index is not None and op.base == "required" else []) \
                + list(range(self.n))
        # On the CPU the Gram pass goes unit by unit (torch.dot of UNIT elements, added in order), so a chunked
        # merge equals a whole-tensor one bit for bit. On a GPU, one dot per unit costs a kernel launch and a
        # device-to-host sync each: chunks of GPU_GRAM_CHUNK elements are multiplied as one tile matrix and
        # the Gram matrix stays on the device until the tensor is done.
        # The CPU reads CPU_GRAM_UNITS units at a time and takes each unit's dot products on views of them: the
        # same dots added in the same order, with a fraction of the reads, conversions and calls.
        self.on_gpu = self.device_gram(plan)
        self.gchunk = min(GPU_GRAM_CHUNK if self.on_gpu else UNIT * CPU_GRAM_UNITS, max(1, self.numel))

    @staticmethod
    def device_gram(plan: MergePlan) -> bool:
        """Whether the Gram pass takes the device path (large chunks, tile products): on any GPU."""
        return plan.device.type != "cpu"

    def max_read_bytes(self) -> int:
        return max(super().max_read_bytes(), self.gchunk * max(d.itemsize for d in self.tp.in_dtypes))

    def work_bytes(self) -> int:  # the same for any member count: a full tile's rows
        return max(super().work_bytes(), (GRAM_TILE + 2) * self.gchunk * 8)

    def _tile_rows(self) -> int:
        return min(GRAM_TILE, len(self.vectors))

    def _tiles(self) -> list[list[int]]:
        m = len(self.vectors)
        return [list(range(k, min(k + GRAM_TILE, m))) for k in range(0, m, GRAM_TILE)]

    def reads(self) -> Iterator[Read]:
        tiles = self._tiles()
        m = len(self.vectors)
        for start, count in _chunks(self.numel, self.gchunk):
            for t in tiles:
                if self.mode == "delta":
                    yield self.read(self.base_index, start, count)
                for a in t:
                    yield self.read(self.vectors[a], start, count)
                for j in range(t[-1] + 1, m):
                    yield self.read(self.vectors[j], start, count)
        yield from super().reads()

    def run(self, io: _IO) -> None:
        gram = self._gram(io)
        if not bool(torch.isfinite(gram).all()):
            self.suspect = self.whole = True
        op = self.plan.operator
        try:
            comb = combination_from_gram(op, gram, self.tp.resolved, self.plan.base is not None, self.n)
            check_combination(comb, self.dtype, method=op.name, option=coefficient_option(op))
        except MergeError as e:
            e.tensor = e.tensor or self.name
            e.message = f"tensor {self.name!r}: {e.message}"
            raise
        self.combination = comb
        super().run(io, comb)

    def _gram(self, io: _IO) -> torch.Tensor:
        """The float64 Gram matrix of the vectors, tile by tile over the chunks (see ``__init__`` for the two paths)."""
        m = len(self.vectors)
        dev = io.device
        gram = torch.zeros(m, m, dtype=torch.float64, device=dev) if self.on_gpu else None
        sums = None if self.on_gpu else GramSums(m)
        tile_buf = torch.empty(self._tile_rows() + 1, self.gchunk, dtype=torch.float64, device=dev)
        slot_j = self._tile_rows()  # the row of a vector read against a tile
        base_buf = torch.empty(self.gchunk, dtype=torch.float64, device=dev)

        def take(slot: int, vector: int, start: int, count: int, base: torch.Tensor | None) -> torch.Tensor:
            v = io.take_as(tile_buf[slot], self.vectors[vector], self.name, start, count)
            return v.sub_(base) if base is not None else v

        for start, count in _chunks(self.numel, self.gchunk):
            for t in self._tiles():
                b = io.take_as(base_buf, self.base_index, self.name, start, count) if self.mode == "delta" else None
                held = [take(slot, a, start, count, b) for slot, a in enumerate(t)]
                lo, hi = t[0], t[-1] + 1
                rows = tile_buf[: len(t), :count]
                if self.on_gpu:
                    block = rows @ rows.T
                    gram[lo:hi, lo:hi] += block.triu() + block.triu(1).T  # symmetric by construction
                else:
                    _add_units(sums, held, count, gram_pairs(t), io.threads)
                for j in range(hi, m):
                    v = take(slot_j, j, start, count, b)
                    if self.on_gpu:
                        d = rows @ v
                        gram[lo:hi, j] += d
                        gram[j, lo:hi] += d
                    else:
                        _add_units(sums, held + [v], count, gram_pairs(t, [j]), io.threads)
        return gram.cpu() if self.on_gpu else sums.tensor()


def _add_units(sums: GramSums, vectors: list[torch.Tensor], count: int, pairs: list[tuple[int, int, int, int]],
               threads: int) -> None:
    """Each unit's dot products of one CPU chunk of ``vectors``, added to ``sums`` in unit order.

    The units' dots run on up to ``threads`` threads, each holding torch to one thread (a ``ddot``'s rounding
    depends on its split), and are added here in unit order: the floats of one unit after another.
    """
    units = range(0, count, UNIT)
    values: list[list[float]] = [[] for _ in units]

    def part(lo: int, hi: int) -> None:
        with single_thread():
            for k in range(lo, hi):
                u = units[k]
                values[k] = unit_dots([v[u: u + UNIT] for v in vectors], pairs)

    spread(part, len(units), grain=1, threads=threads)
    for v in values:
        sums.add(pairs, v)


class _TaskKernel(_Kernel):
    """Statistics passes over each member, then one pass folding every member's task vector."""

    def __init__(self, plan: MergePlan, tp: TensorPlan):
        super().__init__(plan, tp)
        try:
            self.task = plan.operator.task.tensor(tp.resolved, tp.out.shape, self.dtype, seed=plan.seed,
                                                  name=self.name, method=plan.operator.name)
        except MergeError as e:
            e.tensor = e.tensor or self.name
            raise
        unit = self.task.unit
        self.chunk = max(unit, (max(1, plan.chunk_elems) // unit) * unit)
        self.chunk = min(self.chunk, max(1, self.numel))
        self.passes = self.task.stat_passes()
        # The magnitude selection's levels all run from one read of each member when its magnitudes fit in
        # WHOLE_SELECT_BYTES (one tensor in memory); beyond that, one chunked pass per level.
        self.whole_select = (any(kind.startswith("radix") for kind, _ in self.passes)
                             and self.numel * self.dtype.itemsize <= WHOLE_SELECT_BYTES)

    def _stat_passes(self) -> Iterator[tuple[str, list[int]]]:
        """The statistics passes as run: the radix levels as one ``select`` pass in whole-tensor mode."""
        for kind, members in self.passes:
            if self.whole_select and kind.startswith("radix"):
                if kind == "radix0":
                    yield "select", members
            else:
                yield kind, members

    def work_bytes(self) -> int:
        whole = self.numel * self.dtype.itemsize if self.whole_select else 0
        return whole + self._chunk_work_bytes()

    def _chunk_work_bytes(self) -> int:
        per = 12 * self.dtype.itemsize + 4  # base, delta, |delta|, five sums, temporaries, mask
        if self.task.spec.sparsify == "della_magprune":
            per += 3 * 8 + 2 * 4  # argsort order and ranks (int64), uniforms, probabilities
        elif self.task.spec.sparsify == "random":
            per += 4
        hist = (1 << 20) * 8 if self.dtype.itemsize == 8 else (1 << 16) * 8  # float64: 20-bit levels
        return self.chunk * per + hist + getattr(self.task, "extra_bytes", 0)  # whole-tensor state of some specs

    def reads(self) -> Iterator[Read]:
        for _, members in self._stat_passes():
            for i in members:
                for start, count in _chunks(self.numel, self.chunk):
                    yield self.read(self.base_index, start, count)
                    yield self.read(i, start, count)
        for start, count in _chunks(self.numel, self.chunk):
            yield self.read(self.base_index, start, count)
            for i in range(self.n):
                yield self.read(i, start, count)

    def run(self, io: _IO) -> None:
        if io.device.type == "cpu" and self.plan.operator.random:
            with torch_on_one_thread():  # numpy's draws and sorts take the cores (merge.ops.rng)
                self._run(io)
        else:
            self._run(io)

    def _run(self, io: _IO) -> None:
        dev, xp = io.device, io.xp
        bbuf = xp.empty(self.chunk, self.dtype, dev)
        xbuf = xp.empty(self.chunk, self.dtype, dev)
        task = self.task
        for kind, members in self._stat_passes():
            if kind == "select":
                self._select_whole(io, members, bbuf, xbuf)
                continue
            for i in members:
                task.stat_begin(kind, i)
                for start, count in _chunks(self.numel, self.chunk):
                    b = io.take_as(bbuf, self.base_index, self.name, start, count)
                    x = io.take_as(xbuf, i, self.name, start, count)
                    if not task.stat_chunk(kind, i, xp.sub_(x, b), start):
                        self.suspect = True
                task.stat_end(kind, i)
        out_buf: dict = {}
        if self._splits(io):
            self._combine_parts(io, bbuf, xbuf)
            return
        for start, count in _chunks(self.numel, self.chunk):
            b = io.take_as(bbuf, self.base_index, self.name, start, count)
            state = task.begin_chunk(count, dev)
            for i in range(self.n):
                x = io.take_as(xbuf, i, self.name, start, count)
                task.add_member(state, i, xp.sub_(x, b), start)
            self._emit(io, task.finish_chunk(state, b), out_buf)

    def _splits(self, io: _IO) -> bool:
        """Whether the combination runs in parts on the numpy lane's threads (see _combine_parts)."""
        task = self.task
        if io.xp is not NUMPY or not isinstance(task, TaskTensor) or not task.splits():
            return False
        # A plain sum of task vectors (task arithmetic) is bound by the reads: split, it measured slower (3.5 s instead
        # of 3.2 s for 4 x 1 GB on 2 cores), so only masks and sign elections take the lane's threads.
        return task.spec.consensus or any(m.sparse for m in task.members)

    def _combine_parts(self, io: _IO, bbuf: torch.Tensor, xbuf: torch.Tensor) -> None:
        """The combination pass with each step over a chunk's elements in parts on the numpy lane's threads (see
        _each): the base's and each member's conversion and fold, then the result, its checks and its cast."""
        task, out_buf = self.task, {}
        for start, count in _chunks(self.numel, self.chunk):
            state = task.begin_chunk(count, io.device, zero=False)
            self._take_each(io, self.base_index, start, count, bbuf, partial(self._zero_part, state))
            for i in range(self.n):
                self._take_each(io, i, start, count, xbuf, partial(self._add_part, state, i, start, bbuf))
            self._emit_parts(io, state["S"], out_buf, partial(self._each, count),
                             partial(self._finish_part, state, bbuf))

    # the combination's steps on elements [lo, hi) of a chunk (see _each)
    def _zero_part(self, state: dict, lo: int, hi: int, b: torch.Tensor) -> None:
        self.task.zero_sums(self.task.part(state, lo, hi))

    def _add_part(self, state: dict, i: int, start: int, bbuf: torch.Tensor, lo: int, hi: int, x: torch.Tensor) -> None:
        self.task.add_member(self.task.part(state, lo, hi), i, self.task.xp.sub_(x, bbuf[lo:hi]), start + lo)

    def _finish_part(self, state: dict, bbuf: torch.Tensor, lo: int, hi: int) -> None:
        self.task.finish_chunk(self.task.part(state, lo, hi), bbuf[lo:hi])

    def _each(self, count: int, fn: Callable[[int, int], None]) -> None:
        """``fn(lo, hi)`` over a chunk's elements ``[0, count)`` cut into parts of at least SPLIT_GRAIN elements on the
        numpy lane's threads (numpy's ufuncs release the GIL). Every step is per element (positions passed as
        ``start + lo``), so the bits do not depend on the cut; each part writes only its own slices and uses its own
        thread's scratch (merge.backend.arrays)."""
        spread(fn, count, grain=SPLIT_GRAIN, threads=NUMPY.threads())

    def _take_each(self, io: _IO, source: int, start: int, count: int, buf: torch.Tensor,
                   fn: Callable[[int, int, torch.Tensor], None]) -> None:
        """Read one chunk of ``source``, then for each part ``[lo, hi)`` (see _each) convert it into ``buf[lo:hi]``
        (the compute dtype) and call ``fn(lo, hi, buf[lo:hi])``."""
        c = io.take(source, self.name, start, count)

        def part(lo: int, hi: int) -> None:
            dst = buf[lo:hi]
            io.xp.convert_into(dst, c.tensor[lo:hi])
            fn(lo, hi, dst)

        self._each(count, part)
        c.release()

    def _select_whole(self, io: _IO, members: list[int], bbuf: torch.Tensor, xbuf: torch.Tensor) -> None:
        """Each member's magnitudes gathered chunk by chunk into one buffer, then every selection level.

        The gathering stays on one thread on the numpy lane too: it is bound by the reads and by writing the whole
        buffer, and measured slower split (3.9 s instead of 3.2 s of TIES of 4 x 1 GB on 2 cores)."""
        xp = io.xp
        a = xp.empty(self.numel, self.dtype, io.device)
        for i in members:
            for start, count in _chunks(self.numel, self.chunk):
                b = io.take_as(bbuf, self.base_index, self.name, start, count)
                x = io.take_as(xbuf, i, self.name, start, count)
                xp.abs_into(a[start: start + count], xp.sub_(x, b))
            if not _finite(a):
                self.suspect = True
            self.task.select_whole(i, a)
        del a


class _TensorKernel(_Kernel):
    """Every member's whole tensor (the base's, each member's auxiliary one) in memory, the operator's
    function over them, the result emitted chunk by chunk; all of it freed before the next tensor."""

    def __init__(self, plan: MergePlan, tp: TensorPlan):
        super().__init__(plan, tp)
        self.inputs = list(range(self.n)) + ([self.base_index] if self.base_index is not None else [])
        # per member: (reader index, {kind: info of the stored NAME:KIND tensor}); None without auxiliary sources
        self.aux: list[tuple[int | None, dict[str, TensorInfo]]] | None = None
        if plan.aux is not None:
            self.aux = [(plan.aux_index(i), plan.aux_of(i, self.name)) for i in range(self.n)]

    def _aux_infos(self) -> list[TensorInfo]:
        return [info for _, kinds in self.aux or () for info in kinds.values()]

    def copies(self) -> int:
        """Whole copies of this tensor held at once (auxiliary tensors counted by their own size)."""
        return len(self.inputs) + self.plan.operator.scratch

    def max_read_bytes(self) -> int:
        sizes = [super().max_read_bytes()]
        sizes += [min(self.plan.chunk_elems, max(1, a.numel)) * a.dtype.itemsize for a in self._aux_infos()]
        return max(sizes)

    def work_bytes(self) -> int:
        item = self.dtype.itemsize
        aux = sum(a.numel for a in self._aux_infos()) * item
        return self.copies() * self.numel * item + aux + self.chunk * self.tp.out.dtype.itemsize

    def _aux_chunk(self, info: TensorInfo) -> int:
        return min(max(1, self.plan.chunk_elems), max(1, info.numel))

    def reads(self) -> Iterator[Read]:
        for i in self.inputs:
            for start, count in _chunks(self.numel, self.chunk):
                yield self.read(i, start, count)
        for index, kinds in self.aux or ():
            for info in kinds.values():
                for start, count in _chunks(info.numel, self._aux_chunk(info)):
                    yield Read(index, info.name, start, count, info.dtype)

    def _whole(self, io: _IO, source: int, name: str, numel: int, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(numel, dtype=self.dtype, device=io.device)
        for start, count in _chunks(numel, chunk):
            io.take_as(t[start:], source, name, start, count)
        return t.reshape(shape)

    def run(self, io: _IO) -> None:
        shape = self.tp.out.shape
        xs = [self._whole(io, i, self.name, self.numel, self.chunk, shape) for i in range(self.n)]
        base = None
        if self.base_index is not None:
            base = self._whole(io, self.base_index, self.name, self.numel, self.chunk, shape)
        aux = None
        if self.aux is not None:
            aux = []
            for i, (index, kinds) in enumerate(self.aux):
                aux.append({kind: self._whole(io, index, info.name, info.numel, self._aux_chunk(info), info.shape)
                            for kind, info in kinds.items()})
                bad = [info.name for kind, info in kinds.items() if not _finite(aux[-1][kind])]
                if bad:
                    path = self.plan.aux[i].path
                    raise NonFiniteError(f"auxiliary tensor {bad[0]!r} of member {i} ({path}) holds NaN or infinite "
                                         "values; recompute it", path=path, tensor=self.name, member=i)
        if not all(_finite(t) for t in [*xs, *([base] if base is not None else [])]):
            self.suspect = self.whole = True
        op = self.plan.operator
        try:
            out = apply_tensor(op, xs, base, self.tp.resolved, name=self.name, aux=aux, seed=self.plan.seed)
        except MergeError as e:
            e.tensor = e.tensor or self.name
            e.message = f"tensor {self.name!r}: {e.message}"
            raise
        del xs, base, aux
        flat = out.reshape(-1)
        del out
        out_buf: dict = {}
        for start, count in _chunks(self.numel, self.chunk):
            self._emit(io, flat[start: start + count], out_buf)


def _make_kernel(plan: MergePlan, tp: TensorPlan) -> _Kernel:
    if tp.action == "copy":
        return _CopyKernel(plan, tp)
    path = path_of(plan.operator, tp.resolved)
    if path == "linear":
        comb = plan.combination if plan.combination is not None and tp.resolved is None else \
            plan.operator.combine(tp.resolved)
        return _LinearKernel(plan, tp, comb)
    if path == "gram":
        return _GramKernel(plan, tp)
    if path == "tensor":
        return _TensorKernel(plan, tp)
    return _TaskKernel(plan, tp)


@dataclass
class MergeStats:
    seconds: float
    read_bytes: int
    written_bytes: int
    tensors: int
    nonfinite: list[tuple[int | str, str]] = field(default_factory=list)


def _scan_nonfinite(plan: MergePlan, name: str) -> list[int]:
    """Indices of the sources (members, then the base) whose tensor ``name`` holds NaN or infinity."""
    bad = []
    for i, src in enumerate(plan.all_sources):
        info = src.infos.get(name)
        if info is None or not is_float(info.dtype):
            continue
        xp = arrays_for(info.dtype)
        step = max(1, (4 << 20) // info.dtype.itemsize)
        buf = xp.bytes_buffer(min(step, max(1, info.numel)) * info.dtype.itemsize)
        for start in range(0, info.numel, step):
            count = min(step, info.numel - start)
            view = buf[: count * info.dtype.itemsize]
            src.read_into(name, start * info.dtype.itemsize, xp.memoryview(view))
            if not _all_finite(xp.view(view, info.dtype)):
                bad.append(i)
                break
    return bad


def _check_nonfinite(plan: MergePlan, kernel: _Kernel, found: list) -> None:
    bad = _scan_nonfinite(plan, kernel.name)
    n = len(plan.sources)
    method = plan.operator.name
    for i in bad:
        who = "the base" if i == n else f"member {i}"
        src = plan.all_sources[i]
        found_msg = f"{who} ({src.path}) holds NaN or infinite values in tensor {kernel.name!r}"
        if plan.strict:
            raise NonFiniteError(found_msg, path=src.path, tensor=kernel.name, member=i if i < n else None)
        if kernel.whole:
            what = "decomposes whole tensors" if isinstance(kernel, _TensorKernel) else \
                "takes norms and angles of whole tensors"
            msg = f"{found_msg}; {method} {what}, so the whole output tensor {kernel.name!r} is NaN"
        else:
            msg = f"{found_msg}; the merge carries them into the result"
        found.append(("base" if i == n else i, kernel.name))
        warnings.warn(NonFiniteWarning(msg), stacklevel=3)
    if kernel.cast_overflow is not None:
        out = kernel.tp.out.dtype
        name = dtype_name(out)
        wider = "float64" if name == "float32" else "float32"
        top = arrays_for(out).finfo_max(out)
        raise NonFiniteError(f"tensor {kernel.name!r}: the result reaches {kernel.cast_overflow:.6g}, beyond the "
                             f"largest {name} ({top:.6g}), so writing it as {name} would give "
                             "infinity (or its largest value) although every member is finite; write a wider dtype",
                             tensor=kernel.name, option="dtype", choices=(wider,))
    if not bad and kernel.whole:
        raise NonFiniteError(f"tensor {kernel.name!r}: the members' dot products overflow float64 although every "
                             f"member is finite, so {method} has no angle to take; scale the members down",
                             tensor=kernel.name)
    if not bad and kernel.overflow:
        raise NonFiniteError(f"tensor {kernel.name!r}: the result overflowed {dtype_name(kernel.dtype)} although every "
                             "member is finite; lower the weights (or merge in float64)", tensor=kernel.name,
                             option="accumulate", choices=("float64",))


def run_merge(plan: MergePlan, sink: Sink, *, progress: Callable[[int], None] | None = None) -> MergeStats:
    """Execute a plan: stream every member's chunks through the operator into the sink.

    Args:
        plan: from :func:`plan_merge`.
        sink: receives each output tensor's bytes in plan order.
        progress: called with the number of input bytes just consumed.

    Raises:
        NonFiniteError: a member holds NaN or infinity and ``plan.strict``, or the result overflowed.
    """
    t0 = time.perf_counter()
    cuda = plan.device.type == "cuda"
    kernels = plan.kernels()
    buffer_bytes = max((k.max_read_bytes() for k in kernels), default=1)

    def schedule() -> Iterator[Read]:
        for i in range(len(kernels)):  # by index: the consumer drops each kernel once it is done
            yield from kernels[i].reads()

    sink.begin([t.out for t in plan.tensors])
    found: list = []
    read_bytes = 0

    def count(nbytes: int) -> None:
        nonlocal read_bytes
        read_bytes += nbytes
        if progress:
            progress(nbytes)

    # One compute thread beside the reader thread: on small machines torch's own pool would fight the
    # reader for cores (and its idle workers spin), which measured 1.5-2x slower on 2 cores for the
    # read-bound paths. The task path (TIES and kin) is compute-bound and keeps torch's threads (10 s
    # instead of 16 s for TIES of 4 x 0.5 GB on 2 cores); its results do not depend on the thread count:
    # its elementwise operations are exact per element and its sums run on one thread (merge.ops.task).
    xp = arrays_for(plan.accumulate)
    threads = xp.threads()
    if not cuda and plan.operator.path != "task":
        xp.set_threads(1)
    try:
        with ChunkReader(plan.read_sources, schedule(), buffer_bytes=buffer_bytes, device=plan.device,
                         progress=count, arrays=xp) as reader:
            io = _IO(plan, reader, sink)
            io.threads = threads
            for i, k in enumerate(kernels):
                k.run(io)
                if k.suspect:
                    _check_nonfinite(plan, k, found)
                kernels[i] = None  # its statistics are done with (the reader is past its reads)
            reader.finish()
        sink.finish()
    finally:
        xp.set_threads(threads)
    return MergeStats(time.perf_counter() - t0, read_bytes, io.written, len(plan.tensors), found)
