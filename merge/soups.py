"""Soups: merge checkpoints on disk (streaming) or state dicts in memory.

``soup`` is the verb behind ``papa-merge soup``; ``uniform_soup`` and ``average`` are its shortcuts.
Greedy soup and the population methods build on these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from merge.engine import MemorySink, MergePlan, MergeStats, plan_merge, resolve_device, run_merge
from merge.errors import InvalidArgumentError, SameInputOutputError
from merge.keys import MEMBER_ONLY_KEYS, MODEL_KEY, RECIPE_KEY, TRAIN_KEY, version
from merge.io import schemes
from merge.backend.arrays import HOST, NeedsTorch
from merge.io.dtypes import ACCUMULATE_DTYPE_NAMES, dtype_name, parse_dtype
from merge.lineage import warn_if_different_starts
from merge.io.sources import Source, StateDictSource, open_checkpoint
from merge.lora import is_lora_reference, open_member, split_reference
from merge.io.folder import carry_folder_files
from merge.card import write_card
from merge.io.formats import INDEX_FILE, SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from merge import verify as verify_mod
from merge.verify import DigestSink
from merge.io.atomic import check_output_free, check_output_name
from merge.io.writer import AtomicOutput, FileSink, OutputPlan, parse_size, plan_output
from merge.ops import check_weights, get_operator
from merge.params import Gradient, gradient_value
from merge.slices import layer_position, layout_of
from merge.parallel import (DEFAULT_JOBS, MergeGroup, SingleWriterWarning, WorkerReport, check_jobs,
                            process_group_world, run_split)
from merge.backend.lazy import lazy_torch

torch = lazy_torch(__name__)

__all__ = ["MergeResult", "soup", "uniform_soup", "average", "plan_soup", "RECIPE_KEY", "recipe_of", "output_kind",
           "resolve_method", "LayerGradients", "layer_gradients"]

# Set to 1: every soup runs on torch, also those the numpy backend could run (to compare the two, or to rule it out).
TORCH_ONLY_ENV = "PAPA_MERGE_TORCH_ONLY"
# What the numpy backend (merge.backend.arrays) reduces: float32, float16 and bfloat16 members, float32 accumulator.
# float64 accumulates in float64, where torch's fused multiply-add has no cheap exact emulation.
_NUMPY_FLOATS = ("F32", "F16", "BF16")
_NUMPY_OUT_DTYPES = ("float32", "float16", "bfloat16")

OUTPUT_FORMS = ("NAME.safetensors (one file)", "NAME.pt, NAME.pth or NAME.bin (a torch state-dict file)",
                "a path without a suffix or an existing folder (a Hugging Face model folder)")



@dataclass
class MergeResult:
    """What a soup wrote and how it went."""

    path: Path | None
    files: list[Path]
    tensors: int
    read_bytes: int
    written_bytes: int
    seconds: float
    recipe: dict
    skipped: list[str] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None
    workers: list[WorkerReport] = field(default_factory=list)  # one per process of a split merge (jobs, ranks)
    verified: dict | None = None  # what verify=True checked once the output was published (merge.verify)

    @property
    def gb_per_s(self) -> float:
        return self.read_bytes / self.seconds / 1e9 if self.seconds else float("inf")


def _check_not_an_input(out: Path, sources: Sequence[Source], n_members: int | None = None) -> None:
    """Refuse an output that is an input, holds one (its replacement would delete it), or lies inside an input
    folder (members, then the base: ``sources[n_members:]``)."""
    out_r = out.resolve()
    n = len(sources) if n_members is None else n_members
    for i, src in enumerate(sources):
        who = f"member {i}" if i < n else "the base"
        for f in [src.path, *src.files]:
            q = f.resolve()
            if q == out_r:
                raise SameInputOutputError(f"output {out} would overwrite {who} ({src.path}); write the soup "
                                           "somewhere else",
                                           path=out, member=i if i < n else None)
            if q.is_relative_to(out_r):
                raise SameInputOutputError(f"output {out} is a folder that holds {who} ({src.path}): replacing it "
                                           "would delete it; write the soup to a new path", path=out,
                                           member=i if i < n else None)
        folder = src.path.resolve()
        if folder.is_dir() and out_r.is_relative_to(folder):
            raise SameInputOutputError(f"output {out} lies inside the folder of {who} ({src.path}); write the soup "
                                       "outside it", path=out, member=i if i < n else None)


def _refuse_existing_output_early(out: Path, inputs: Sequence[object], *, force: bool) -> None:
    """An existing output is refused before any member is opened, so hf:// members are not downloaded first.

    An output that is also an input is left to :func:`_check_not_an_input`, which says so.
    """
    if force or not (out.exists() or out.is_symlink()):
        return
    out_r = out.resolve()
    for m in inputs:
        if isinstance(m, (str, os.PathLike)) and not str(m).startswith(schemes.HF_PREFIX):
            p = Path(m).resolve()
            if p == out_r or p.is_relative_to(out_r):
                return
    check_output_free(out, force=False)


def _check_hub_members_first(members: Sequence[object], *, base: object, **plan_args: object) -> None:
    """With ``hf://`` members, check them from their headers (:func:`merge.check.check_members`) before any weight
    is downloaded: an incompatible set is refused before the first shard arrives."""
    given = [*members, *([base] if base is not None else [])]
    paths = all(isinstance(m, (str, os.PathLike)) for m in given)
    if not paths or not any(str(m).startswith(schemes.HF_PREFIX) for m in given):
        return
    from merge.check import check_members

    def headers(m: object) -> object:  # base+adapter: the base's headers (an adapter changes no name or shape)
        parts = split_reference(m) if m is not None else None  # type: ignore[arg-type]
        return parts[0] if parts else m

    check_members([headers(m) for m in members], base=headers(base), **plan_args)  # type: ignore[arg-type]


def _member_record(src: Source) -> dict:
    fp = src.fingerprint()
    source = schemes.describe(src.path)
    if source:  # a Hub member is recorded as hf://org/name@sha, not by its cache folder (a published local path)
        fp["source"] = fp["path"] = source
    train = src.metadata.get(TRAIN_KEY)
    if train:
        try:
            fp["train"] = json.loads(train)
        except ValueError:
            pass
    return fp


def recipe_of(plan: MergePlan, *, out_dtype: torch.dtype | None, extra: Mapping[str, object] | None = None) -> dict:
    """The recipe recorded in the output's metadata: method, members, base, parameters, dtypes, tool version.

    Paths are recorded as :func:`merge.io.schemes.public_name` gives them: never absolute.
    """
    op = plan.operator
    recipe = {
        "tool": "papa-merge",
        "version": version(),
        "method": op.name,
        "citation": op.citation,
        "members": [_member_record(src) for src in plan.sources],
        "weights": plan.weights,
        "dtype": dtype_name(out_dtype) if out_dtype is not None else "as input",
        "accumulate": dtype_name(plan.accumulate),
        "device": plan.device.type,
        "skipped": plan.skipped,
        "copied_from_first": plan.copied_mismatched,
    }
    if plan.combination is not None:
        recipe["coefficients"] = plan.combination.coefficients
    if plan.base is not None:
        recipe["base"] = _member_record(plan.base)
    params = {k: v for k, v in plan.params.items() if k != "weight"}
    if params:
        recipe["parameters"] = params
    if op.random:
        recipe["seed"] = plan.seed
    recipe.update(extra or {})
    # The recipe travels with the output (pushed to the Hub, shared): local paths as given when relative, else
    # relative to the working folder or bare names; hf:// members by reference. No home folder shows.
    return schemes.public_record(recipe)


def output_kind(out: str | os.PathLike) -> str:
    """``safetensors``, ``torch`` or ``folder``: what ``-o`` asks for.

    ``x.safetensors`` is one safetensors file; ``x.pt``/``x.pth``/``x.bin`` a torch state-dict file (as
    timm's ``avg_checkpoints.py`` writes); a path without a suffix, or an existing folder, a Hugging
    Face model folder.

    Raises:
        InvalidArgumentError: any other suffix (the message lists the forms).
    """
    p = Path(out)
    if str(out) == "":
        raise InvalidArgumentError("the output path is empty; write one of: " + "; ".join(OUTPUT_FORMS), option="out")
    check_output_name(out)  # '/', '.', '..': no name to write under
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX and not p.is_dir():
        return "safetensors"
    if suffix in TORCH_SUFFIXES and not p.is_dir():
        return "torch"
    if p.is_dir() or not suffix or str(out).endswith(("/", os.sep)):
        return "folder"
    raise InvalidArgumentError(f"output {out}: cannot tell what to write for suffix {p.suffix!r}; write one of: "
                               + "; ".join(OUTPUT_FORMS), path=out, option="out")


def _carried_metadata(first: Source) -> dict[str, str]:
    return {k: v for k, v in first.metadata.items() if k not in MEMBER_ONLY_KEYS}


def _open_all(members: Sequence[str | os.PathLike | Source | Mapping[str, torch.Tensor]], stack: ExitStack,
              key: str | None) -> list[Source]:
    if not members:
        raise InvalidArgumentError("no members given; pass at least one checkpoint")
    sources: list[Source] = []
    for i, m in enumerate(members):
        if isinstance(m, Source):
            sources.append(m)
        elif isinstance(m, Mapping):
            sources.append(StateDictSource(m, path=f"<state_dict {i}>"))
        else:
            sources.append(stack.enter_context(open_member(m, key=key)))  # base+adapter: LoRA applied
    return sources


def _numpy_eligible(members: Sequence[object], *, method: str, base: object = None, member_params: object = None,
                    resolve: object = None, aux: object = None, dtype: object = None, accumulate: object = "float32",
                    device: object = "cpu", jobs: int = 1, ranks: bool = False, verify: bool = False,
                    kind: str | None = None, weights: Sequence[float] | None = None,
                    params: Mapping[str, object] | None = None) -> bool:
    """Whether a soup's options let it run on the numpy backend, without importing torch: a ``linear`` operator
    (uniform, weighted; per-member parameters only plain-number weights, as a mergekit linear recipe gives them)
    without a base, or a task-vector operator whose sparsification is an exact selection (task_arithmetic, ties,
    breadcrumbs, breadcrumbs_ties; see :func:`_numpy_task_params`) with one; on the CPU, members and base given
    as local paths (no Hub reference, no LoRA adapter), a float32 accumulator, a float32/float16/bfloat16 or
    unchanged output dtype, a safetensors output, one process (``verify`` reads the output back without torch;
    only a model folder's key check builds the model with it). The members' formats and dtypes are checked when
    they are opened (:func:`_open_numpy`)."""
    from merge.errors import MergeError
    from merge.io.dtypes import USER_DTYPE_NAMES

    if os.environ.get(TORCH_ONLY_ENV, "") not in ("", "0"):
        return False
    if kind == "torch" or resolve is not None or aux is not None:
        return False
    try:
        op = get_operator(method)
    except MergeError:
        return False  # the torch path says what is wrong with it
    if op.name in _NUMPY_TASK_METHODS:
        if base is None or not _numpy_task_params(op, len(members), weights, params, member_params):
            return False
    elif op.name not in ("uniform", "weighted") or base is not None:
        return False
    elif member_params is not None and not all(  # a recipe's per-member weights, as plain numbers
            isinstance(mp, Mapping) and set(mp) <= {"weight"} and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in mp.values())
            for mp in member_params):
        return False
    if jobs != 1 or ranks or device not in (None, "cpu"):
        return False
    if not isinstance(accumulate, str) or USER_DTYPE_NAMES.get(accumulate.lower()) != "float32":
        return False
    if dtype is not None and (not isinstance(dtype, str)
                              or USER_DTYPE_NAMES.get(dtype.lower()) not in _NUMPY_OUT_DTYPES):
        return False
    local = [*members, *([base] if base is not None else [])]
    return bool(members) and all(isinstance(m, (str, os.PathLike)) and not str(m).startswith(schemes.HF_PREFIX)
                                 and not is_lora_reference(m) for m in local)


# Task-vector methods the numpy backend runs: elementwise arithmetic and an exact selection of magnitudes.
# DARE and DELLA draw masks and (like any rescale) take float64 L1 sums whose order of additions numpy does not
# reproduce: they stay on torch.
_NUMPY_TASK_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")


def _numpy_task_params(op: object, n: int, weights: Sequence[float] | None, params: Mapping[str, object] | None,
                       member_params: object) -> bool:
    """Whether a task-vector merge's parameters resolve (one value each, no gradient) with ``rescale`` off, and,
    where the task vectors are divided by the sum of the weights (``normalize`` without sign election), that sum
    rounds as torch rounds it in any order (:func:`merge.backend.arrays.sum_is_exact`)."""
    from merge.backend.arrays import sum_is_exact
    from merge.errors import MergeError
    from merge.ops import resolve_params

    import numpy as np

    given = dict(params or {})
    if weights is not None:
        given["weight"] = list(weights)
    try:
        resolved = resolve_params(op, n, given, member_params)
    except (MergeError, TypeError, ValueError):
        return False  # the torch path says what is wrong with it
    if resolved.shared.get("rescale", op.task.rescale):
        return False
    if resolved.shared.get("normalize", op.task.normalize) and not op.task.consensus:
        w32 = [float(np.float32(m["weight"])) for m in resolved.members]
        return sum_is_exact(w32, 4)
    return True


def _open_numpy(members: Sequence[str | os.PathLike], base: str | os.PathLike | None, stack: ExitStack,
                key: str | None) -> tuple[list[Source], Source | None] | None:
    """The members (and the base, if any) opened for the numpy backend, or None (nothing left open) when one
    needs torch: a pickle, or a floating dtype the numpy backend does not reduce (float64, float8)."""
    with ExitStack() as opened:
        sources = []
        for m in [*members, *([base] if base is not None else [])]:
            try:
                src = opened.enter_context(open_checkpoint(m, key=key, numpy=True))
            except NeedsTorch:
                return None
            if any(i.dtype.is_floating_point and i.dtype.st not in _NUMPY_FLOATS for i in src.infos.values()):
                return None
            sources.append(src)
        stack.enter_context(opened.pop_all())
        return sources[:len(members)], (sources[-1] if base is not None else None)


def resolve_method(method: str | None, weights: Sequence[float] | None) -> str:
    """The method a soup runs: weights given with the default (``uniform``, or None) make it ``weighted``.

    Example:
        >>> resolve_method("uniform", [0.7, 0.3]), resolve_method(None, None), resolve_method("ties", [1, 1])
        ('weighted', 'uniform', 'ties')
    """
    method = method or "uniform"
    return "weighted" if weights is not None and method == "uniform" else method


@dataclass
class LayerGradients:
    """Parameters given as gradients over the layers (mergekit's lists), evaluated per tensor.

    ``shared`` and ``members`` hold the parameters as given (per member: ``member_params`` with each member's
    gradients added); ``keys`` names the shared ones that are gradients. A tensor of layer ``i`` of ``n`` sits at
    ``t = i / (n - 1)`` and every tensor outside the layers at ``t = 0``, as a recipe's ``models:`` merge places
    them (:func:`merge.slices.layer_position`, mergekit 0.1.5's ``plan_slice``); each gradient is evaluated there by
    :func:`merge.params.gradient_value`, the recipes' own code.
    """

    shared: dict[str, object]
    members: list[dict[str, object]]
    keys: frozenset[str]
    positions: Mapping[str, float] = field(default_factory=dict)

    def at(self, t: float) -> tuple[dict[str, object], list[dict[str, object]]]:
        """Every parameter's value at position ``t``."""
        shared = {k: gradient_value(v, t) if k in self.keys else v for k, v in self.shared.items()}
        return shared, [{k: gradient_value(v, t) for k, v in m.items()} for m in self.members]

    def __call__(self, name: str) -> tuple[dict[str, object], list[dict[str, object]]]:
        return self.at(self.positions.get(name, 0.0))

    def record(self) -> dict[str, object]:
        """The gradients as the recipe records them: shared ones by name, per-member ones per member."""
        rec: dict[str, object] = {k: list(self.shared[k]) for k in sorted(self.keys)}
        per_member = [{k: list(v) for k, v in m.items() if isinstance(v, list)} for m in self.members]
        if any(per_member):
            rec["per_member"] = per_member
        return rec


def layer_gradients(method: str, n: int, params: Mapping[str, object] | None,
                    member_params: Sequence[Mapping[str, object] | None] | None) -> LayerGradients | None:
    """The gradient parameters of a soup of ``n`` members, or None when every parameter is one value.

    A gradient is a list for a parameter shared by all members (``t``, ``lambda``), a
    :class:`merge.params.Gradient` for any parameter (every member follows it), a list among a per-member
    parameter's per-member values, or a list in ``member_params``.

    Raises:
        InvalidArgumentError: an empty gradient, or one whose values are not numbers, booleans or words.
    """
    op = get_operator(method)
    per_member = {p.name for p in op.params if p.per_member}
    params = dict(params or {})
    members = [dict(m or {}) for m in (member_params or ())] + [{} for _ in range(n - len(member_params or ()))]
    keys, moved = set(), set()
    for k, v in params.items():
        if isinstance(v, Gradient) or (k not in per_member and isinstance(v, (list, tuple))):
            _check_gradient(k, v, None)
            if k in per_member:
                moved.add(k)
                for m in members:
                    m.setdefault(k, list(v))
            else:
                keys.add(k)
                params[k] = list(v)
        elif k in per_member and isinstance(v, (list, tuple)) and len(v) == n and \
                any(isinstance(x, (list, tuple)) for x in v):
            moved.add(k)
            for m, x in zip(members, v):
                m.setdefault(k, x)
    found = bool(keys)
    for i, m in enumerate(members):
        for k, v in m.items():
            if isinstance(v, (list, tuple)):
                _check_gradient(k, v, i)
                m[k] = list(v)
                found = True
    if not found:
        return None
    return LayerGradients({k: v for k, v in params.items() if k not in moved}, members, frozenset(keys))


def _check_gradient(key: str, value: Sequence[object], member: int | None) -> None:
    who = f" of member {member}" if member is not None else ""
    if not value:
        raise InvalidArgumentError(f"parameter {key}{who}: an empty gradient list; give one value or at least one per "
                                   "end", member=member, option=key)
    bad = next((v for v in value if not isinstance(v, (bool, int, float, str))), None)
    if bad is not None:
        raise InvalidArgumentError(f"parameter {key}{who}: a gradient lists numbers (or words), got {bad!r} in it",
                                   member=member, option=key)


def _gradient_positions(gradients: LayerGradients, source: Source) -> LayerGradients:
    """``gradients`` with the layer position of every tensor of ``source`` (the first member)."""
    layout = layout_of(list(source.infos), where=str(source.path))
    if not layout.num_layers:
        shown = ", ".join(sorted({*gradients.keys, *(k for m in gradients.members for k, v in m.items()
                                                     if isinstance(v, list))}))
        raise InvalidArgumentError(f"{source.path}: parameter {shown} is a gradient over the layers, but the tensor "
                                   "names hold no numbered layers (model.layers.N., transformer.h.N., blocks.N., ...); "
                                   "give it one value", path=source.path, option=shown.split(", ")[0])
    count = layout.num_layers
    positions = {layout.name(i, rest): layer_position(i, count) for i, rests in enumerate(layout.layers)
                 for rest in rests}
    return dataclasses.replace(gradients, positions=positions)


def plan_soup(members: Sequence[str | os.PathLike | Source], *, method: str = "uniform",
              weights: Sequence[float] | None = None, base: str | os.PathLike | Source | None = None,
              params: Mapping[str, object] | None = None,
              member_params: Sequence[Mapping[str, object] | None] | None = None, seed: int = 0,
              dtype: str | torch.dtype | None = None, accumulate: str | torch.dtype = "float32",
              device: str | torch.device | None = "cpu", on_mismatch: str = "error", chunk_bytes: int | None = None,
              strict: bool = False, key: str | None = None, sources: list[Source] | None = None,
              base_source: Source | None = None, resolve=None,
              aux: Sequence[Source | Mapping[str, torch.Tensor] | None] | None = None,
              numpy: bool | None = None) -> MergePlan:
    """Validate a soup without writing anything (``papa-merge soup --dry-run``).

    The returned plan's ``out_bytes``, ``read_bytes`` and ``buffer_bytes`` say how much the soup will
    write, read (every pass counted) and allocate, before any tensor is read. Arguments as in :func:`soup`.

    ``numpy``: plan for the numpy backend (``sources`` opened with ``numpy=True``); None: where the members and
    options allow it (:func:`soup` runs such a plan without importing torch), as ``soup`` decides.
    """
    method = resolve_method(method, weights)
    op = get_operator(method)
    with ExitStack() as stack:
        if numpy is None:
            numpy = False
            if sources is None and base_source is None and _numpy_eligible(
                    members, method=method, base=base, member_params=member_params, resolve=resolve, aux=aux,
                    dtype=dtype, accumulate=accumulate, device=device, weights=weights, params=params):
                opened = _open_numpy(members, base, stack, key)
                if opened is not None:
                    numpy, (sources, base_source) = True, opened
        if numpy:
            dev = HOST
            out_dtype = parse_dtype(dtype, numpy=True)
            acc_dtype = parse_dtype(accumulate, allowed=ACCUMULATE_DTYPE_NAMES, what="accumulate dtype", numpy=True)
        else:
            dev = resolve_device(device)  # before any file is opened: a missing GPU costs nothing
            out_dtype = parse_dtype(dtype)
            acc_dtype = parse_dtype(accumulate, allowed=ACCUMULATE_DTYPE_NAMES, what="accumulate dtype")
        if sources is None:
            sources = _open_all(members, stack, key)
            if base is not None and base_source is None:
                base_source = _open_all([base], stack, key)[0]
        w = check_weights(weights, len(sources)) if weights is not None else None
        gradients = layer_gradients(op.name, len(sources), params, member_params) if resolve is None else None
        if gradients is not None:
            resolve = _gradient_positions(gradients, sources[0])
            params, member_params = gradients.at(0.0)
        return plan_merge(sources, op, weights=w, params=params, member_params=member_params, base=base_source,
                          seed=seed, dtype=out_dtype, accumulate=acc_dtype, device=dev, on_mismatch=on_mismatch,
                          chunk_bytes=chunk_bytes, strict=strict, resolve=resolve, aux=aux)


def _warn_if_different_starts(sources: Sequence[Source], base: Source | None) -> None:
    """Members of different starts average to near chance; with a base (task vectors), the base is the
    reference every member is measured against: fine-tunes of it share its start."""
    checked = sources if base is None else [base, *sources]
    labels = None if base is None else [f"{base.path} (base)", *(str(s.path) for s in sources)]
    warn_if_different_starts(checked, names=labels, stacklevel=3, base=base is not None)


def _write_torch_file(plan: MergePlan, out: Path, recipe_json: str, *, force: bool,
                      progress: Callable[[int], None] | None,
                      digests: dict[str, str] | None = None) -> tuple[Path, list[Path], MergeStats]:
    """Run the plan into a torch state-dict file (``x.pt``): the path, the files written, the statistics."""
    from merge.io.torch_writer import TorchFileSink

    with AtomicOutput(out, folder=False, force=force) as atomic:
        sink = TorchFileSink(atomic.file(out.name), [t.out for t in plan.tensors], {RECIPE_KEY: recipe_json})
        if digests is not None:
            sink = DigestSink(sink, digests)
        try:
            stats = run_merge(plan, sink, progress=progress)
        except BaseException:
            sink.abort()
            raise
        final = atomic.commit()
    return final, [final], stats


# Writes a caller's files into an output folder before it is published; returns their paths.
FolderFiles = Callable[[Path], Sequence[Path]]


def _write_index(atomic: AtomicOutput, out_plan: OutputPlan) -> None:
    """The shard index of a folder written in several shards."""
    index = {"metadata": {"total_size": out_plan.nbytes},
             "weight_map": {t.name: f.name for f in out_plan.files for t in f.tensors}}
    atomic.file(INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_safetensors(plan: MergePlan, out: Path, meta: dict[str, str], *, shard_size: int | str,
                       out_dtype: torch.dtype | None, force: bool, progress: Callable[[int], None] | None,
                       digests: dict[str, str] | None = None,
                       folder_files: FolderFiles | None = None) -> tuple[Path, list[Path], MergeStats]:
    """Run the plan into one safetensors file, or a model folder (shards, index, config files, model card).

    Returns:
        The path written, its files and the merge's statistics.
    """
    out_plan = plan_output([t.out for t in plan.tensors], out, shard_size=parse_size(shard_size))
    with AtomicOutput(out, folder=out_plan.folder, force=force) as atomic:
        sink = FileSink(out_plan, atomic, meta)
        stats = run_merge(plan, DigestSink(sink, digests) if digests is not None else sink, progress=progress)
        return (*_finish_output(plan, out, out_plan, atomic, meta, out_dtype, folder_files), stats)


def _finish_output(plan: MergePlan, out: Path, out_plan: OutputPlan, atomic: AtomicOutput, meta: Mapping[str, str],
                   out_dtype: torch.dtype | None, folder_files: FolderFiles | None = None) -> tuple[Path, list[Path]]:
    """Once every tensor is written: a folder's config, tokenizer files, the caller's files, index and card; then
    the commit (so an interrupted merge publishes none of them)."""
    extra_files = []
    if out_plan.folder:
        extra_files = carry_folder_files((plan.base or plan.sources[0]).path, atomic,
                                         dtype=_float_dtype(plan, out_dtype))
        if not atomic.file("config.json").exists():
            extra_files += _describe_small_cnn(meta, atomic)
        if folder_files is not None:
            extra_files += [p for p in folder_files(atomic.file("")) if p not in extra_files]
        if len(out_plan.files) > 1:
            _write_index(atomic, out_plan)
        # The same model card push uploads, once the folder's checkpoint is complete.
        card = write_card(atomic.file(""), shown_as=str(out))
        extra_files += [card] if card is not None else []
    final = atomic.commit()
    if not out_plan.folder:
        return final, [final]
    inside = atomic.file("")
    return final, [final / f.name for f in out_plan.files] + [final / p.relative_to(inside) for p in extra_files]


def _write_split(plan: MergePlan, out: Path, meta: dict[str, str], *, shard_size: int | str,
                 out_dtype: torch.dtype | None, force: bool, progress: Callable[[int], None] | None, jobs: int,
                 spec: dict, folder_files: FolderFiles | None = None
                 ) -> tuple[Path, list[Path], MergeStats, list[WorkerReport]]:
    """:func:`_write_safetensors` split over ``jobs`` local workers or the ranks of the process group
    (:mod:`merge.parallel`): the same files; rank 0 (or this process) finishes and commits the output."""
    import torch.distributed as dist

    out_plan = plan_output([t.out for t in plan.tensors], out, shard_size=parse_size(shard_size))
    if process_group_world() > 1 and dist.get_rank() != 0:
        stats, reports, (final, files) = run_split(plan, out_plan, None, meta, jobs=jobs, progress=progress)
        return final, files, stats, reports
    with ExitStack() as stack:
        try:
            atomic = stack.enter_context(AtomicOutput(out, folder=out_plan.folder, force=force))
        except Exception as e:
            if process_group_world() == 1:
                raise
            atomic = e  # rank 0's refusal (an existing output, no permission) goes to every rank, which waits for it
        stats, reports, (final, files) = run_split(
            plan, out_plan, atomic, meta, jobs=jobs, planner=plan_soup, spec=spec, progress=progress,
            finish=lambda: _finish_output(plan, out, out_plan, atomic, meta, out_dtype, folder_files))
    return final, files, stats, reports


def _worker_spec(members: Sequence[object], sources: Sequence[Source], base: object, base_source: Source | None,
                 **plan_args: object) -> dict:
    """What a local worker needs to plan the same merge: members and base as paths (a Hub member as its local
    copy, already downloaded), and :func:`plan_soup`'s other arguments.

    Raises:
        InvalidArgumentError: a member given as an open source or a state dict (a worker cannot reopen it).
    """
    def path_of(given: object, src: Source) -> str:
        if not isinstance(given, (str, os.PathLike)):
            raise InvalidArgumentError("merging with several jobs needs every member (and the base) given as a path: "
                                       "a worker process reopens it; merge state dicts or open sources with one job",
                                       option="jobs", choices=(1,))
        # A Hub member (or either part of base+adapter) as its cached copy: a worker never asks the Hub again.
        parts = split_reference(given)
        if parts is not None and any(part.startswith(schemes.HF_PREFIX) for part in parts):
            return f"{src.path}+{src.adapter_path}"  # type: ignore[attr-defined]  # a LoraSource
        return str(src.path) if str(given).startswith(schemes.HF_PREFIX) else os.fspath(given)

    paths = [path_of(m, s) for m, s in zip(members, sources)]
    base_path = path_of(base, base_source) if base_source is not None else None
    return {"members": paths, "base": base_path, **plan_args}


def _describe_small_cnn(meta: Mapping[str, str], atomic: AtomicOutput) -> list[Path]:
    """A folder soup of small-CNN file members gets the ``config.json`` a small-CNN member folder has, so the
    folder says what it is (nothing was carried: file members have no folder files)."""
    try:
        spec = json.loads(meta.get(MODEL_KEY, ""))
    except ValueError:
        return []
    if not isinstance(spec, dict) or spec.get("arch") != "small_cnn" or "num_classes" not in spec:
        return []
    from merge.models.export import small_cnn_config

    dst = atomic.file("config.json")
    dst.write_text(json.dumps(small_cnn_config(spec), indent=2, sort_keys=True) + "\n")
    return [dst]


def soup(members: Sequence[str | os.PathLike | Source], *, out: str | os.PathLike, method: str = "uniform",
         weights: Sequence[float] | None = None, base: str | os.PathLike | Source | None = None,
         params: Mapping[str, object] | None = None,
         member_params: Sequence[Mapping[str, object] | None] | None = None, seed: int = 0,
         dtype: str | torch.dtype | None = None,
         accumulate: str | torch.dtype = "float32", device: str | torch.device | None = "cpu",
         shard_size: int | str = "5GB", on_mismatch: str = "error", force: bool = False,
         key: str | None = None, metadata: Mapping[str, str] | None = None,
         recipe_extra: Mapping[str, object] | None = None, progress: bool = False,
         chunk_bytes: int | None = None, strict: bool = False, resolve=None, jobs: int = DEFAULT_JOBS,
         ranks: bool = False, verify: bool = False,
         aux: Sequence[Source | Mapping[str, torch.Tensor] | None] | None = None,
         folder_files: FolderFiles | None = None) -> MergeResult:
    """Merge checkpoints on disk into one, streaming tensor by tensor.

    Args:
        members: checkpoint paths (safetensors files, model folders, shard indexes, ``.bin``/``.pt``
            pickles, ``hf://org/name[@rev]``); a path listed twice counts twice.
        out: ``x.safetensors`` (one file), ``x.pt``/``x.pth``/``x.bin`` (a torch state-dict file, for
            ``torch.load(weights_only=True)``), or a path without a suffix (or an existing folder): a
            Hugging Face model folder, sharded past ``shard_size``, with the first member's config and
            tokenizer files. Any other suffix is refused.
        method: an operator name from :func:`merge.ops.list_operators` (``uniform``, ``weighted`` alias
            ``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
            ``breadcrumbs_ties``, ``della``, ``della_linear``, ``slerp``, ``multislerp``, ``karcher``,
            ``model_stock``).
        weights: one weight per member (per entry, not per file; the ``weight`` parameter); implies
            ``method="weighted"`` when ``method`` is left at ``uniform``. A weighted soup normalises
            them to sum to one, in float64, before any tensor sees them.
        base: the base model, for the methods that take one (task vectors are ``member - base``).
        params: the method's parameters, e.g. ``{"density": 0.5, "lambda": 1.0}`` (a per-member
            parameter takes one value, or a list with one per member). A gradient over the layers, as a
            mergekit recipe's list: a list for a shared parameter (``{"t": [0, 0.5, 1]}``), or
            :class:`merge.params.Gradient` for a per-member one that every member follows (``{"density":
            Gradient([0.3, 0.7])}``); layer ``i`` of ``n`` takes the value at ``i / (n - 1)``, tensors outside
            the layers the first (see :class:`LayerGradients`).
        member_params: per-member overrides, one dict per member (a list there is that member's gradient).
        seed: seed of the random methods (DARE, DELLA); reruns with the same seed are bit-identical.
        dtype: output dtype for floating tensors (default: the inputs' own).
        accumulate: ``float32`` (default) or ``float64``; float64 members always accumulate in float64.
        device: ``cpu`` or ``cuda[:N]`` to reduce on a GPU, streamed chunk by chunk.
        shard_size: largest shard of a folder output, e.g. ``5GB``.
        on_mismatch: ``error`` (default), ``skip`` mismatched tensors, or take member 0's (``first``; not the
            base's). A non-float buffer only some members hold is copied whatever the policy (see
            :func:`merge.engine.plan_merge`).
        force: replace an existing output (only once the new one is complete).
        key: wrapper key for pickled training checkpoints (``ema``, ``state_dict``, ...).
        metadata: extra string pairs stored in the output header.
        recipe_extra: extra fields for the recorded recipe (greedy soup records its selection).
        progress: show a progress bar (bytes read, tensors).
        strict: a NaN or infinity in a member is an error (default: a warning naming member and tensor).
        jobs: local worker processes that split the merge by tensors (:mod:`merge.parallel`); 1 (default):
            this process alone. Workers start with the ``forkserver`` method: a script passing ``jobs``
            needs the usual ``if __name__ == "__main__":`` guard.
        ranks: split the merge over the ranks of the default ``torch.distributed`` process group instead,
            every rank calling ``soup`` with the same arguments (under ``torchrun`` without a group, one is
            set up: gloo, or NCCL for a CUDA device, a bare ``cuda`` being ``cuda:LOCAL_RANK``). Off by
            default, so a soup that rank 0 alone writes inside a group stays one process. Either way
            the tensors written are the bits one process writes, and the recipe records
            ``"processes"``. A ``.pt`` output is written by one process.
        verify: once the output is published, reopen it and check every tensor's sha256 against the bytes the
            writer sent, and a model folder's keys against the ones ``from_pretrained`` expects
            (:func:`merge.verify.verify_output`); the result's ``verified`` says what was checked. A split merge
            (``jobs``, ``ranks``) writes from several processes, so it checks the keys and re-reads every
            tensor but has no checksums to compare.
        aux: for operators that take auxiliary tensors (RegMean's Gram matrices, Fisher's diagonal): one source
            (or dict) per member holding ``NAME:KIND`` tensors; :func:`merge.datamerge.merge_with_data` computes
            them from data and passes them here.
        folder_files: for a folder output, called with the folder before it is published (every tensor and the
            carried config and tokenizer files written): writes more files into it (a recipe's rewritten
            ``config.json``, a merged tokenizer) and returns their paths; they are published with the rest, or not
            at all.

    Returns:
        A :class:`MergeResult` (path, files, sizes, time, the recorded recipe, and one report per process).

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: a member cannot be read.
        MismatchError: members disagree on names, shapes or dtypes.
        InvalidArgumentError: a bad method parameter, weight or output suffix.
        OutputExistsError, SameInputOutputError: the output would overwrite something.
        DeviceUnavailableError: ``device`` is not on this machine.
        NonFiniteError: a member holds NaN/infinity and ``strict``, or the merge overflowed.
        CheckpointFormatError, MismatchError: with ``verify``, the published output does not read back as written.

    Example:
        >>> import merge
        >>> merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
        >>> merge.soup(["ft1/", "ft2/"], base="base/", method="ties", params={"density": 0.5},
        ...            out="ties/")  # doctest: +SKIP
    """
    method = resolve_method(method, weights)
    kind = output_kind(out)
    out = Path(out)
    jobs = check_jobs(jobs)
    _refuse_existing_output_early(out, [*members, *([base] if base is not None else [])], force=force)
    gradients = layer_gradients(method, len(members), params, member_params) if resolve is None else None
    first_params, first_members = gradients.at(0.0) if gradients is not None else (params, member_params)
    _check_hub_members_first(members, method=method, base=base, weights=weights, params=first_params,
                             member_params=first_members, resolve=resolve, dtype=dtype, on_mismatch=on_mismatch,
                             key=key)
    with ExitStack() as stack:
        if ranks:  # under torchrun: the group set up if need be, a bare cuda made cuda:LOCAL_RANK
            device = stack.enter_context(MergeGroup(device)).device
        ranks = process_group_world() if ranks else 1
        if ranks > 1 and jobs > 1:
            raise InvalidArgumentError(f"jobs={jobs} given inside a process group of {ranks} ranks: the ranks already "
                                       "split the merge; leave jobs at 1", option="jobs", choices=(1,))
        if ranks > 1 and kind == "torch":
            raise InvalidArgumentError(f"output {out}: a torch state-dict file is one zip stream that one process "
                                       f"writes, so {ranks} ranks cannot share it; write NAME.safetensors or a folder",
                                       path=out, option="out")
        numpy = gradients is None and _numpy_eligible(
            members, method=method, base=base, member_params=member_params, resolve=resolve, aux=aux, dtype=dtype,
            accumulate=accumulate, device=device, jobs=jobs, ranks=ranks > 1, verify=verify, kind=kind,
            weights=weights, params=params)
        if not numpy:
            resolve_device(device)
        op = get_operator(method)
        if op.data and aux is None and resolve is None:
            raise InvalidArgumentError(f"method {op.name!r} runs the members' model on data ({op.data}) before it "
                                       "merges: call merge.datamerge.merge_with_data, which does that and then "
                                       "streams the merge through soup")
        if aux is not None and jobs > 1:
            raise InvalidArgumentError("a merge with auxiliary tensors runs in one process (its workers could not "
                                       "reopen them); leave jobs at 1", option="jobs", choices=(1,))
        # The numpy backend when the options allow it and every member is a safetensors checkpoint of float32,
        # float16 or bfloat16 tensors: the same bytes, without importing torch (merge.backend.arrays).
        opened = _open_numpy(members, base, stack, key) if numpy else None
        numpy = opened is not None
        if opened is not None:
            sources, base_source = opened
        else:
            sources = _open_all(members, stack, key)
            base_source = _open_all([base], stack, key)[0] if base is not None else None
        plan = plan_soup(members, method=method, weights=weights, base=base, params=params,
                         member_params=member_params, seed=seed, dtype=dtype, accumulate=accumulate, device=device,
                         on_mismatch=on_mismatch, chunk_bytes=chunk_bytes, strict=strict, sources=sources,
                         base_source=base_source, resolve=resolve, aux=aux, numpy=numpy)
        _check_not_an_input(out, plan.all_sources, len(plan.sources))
        _warn_if_different_starts(sources, base_source)
        out_dtype = parse_dtype(dtype, numpy=numpy)
        if jobs > 1 and kind == "torch":
            warnings.warn(SingleWriterWarning(f"output {out}: a torch state-dict file is one zip stream that one "
                                              f"process writes, so it is merged in one process, not {jobs}; write "
                                              "NAME.safetensors or a folder to split the merge"), stacklevel=2)
            jobs = 1
        processes = max(ranks, jobs)
        spec = _worker_spec(members, sources, base, base_source, method=method, weights=weights, params=params,
                            member_params=member_params, seed=seed, dtype=dtype, accumulate=accumulate, device=device,
                            on_mismatch=on_mismatch, chunk_bytes=chunk_bytes, strict=strict, key=key,
                            resolve=resolve) if jobs > 1 else {}
        recipe = recipe_of(plan, out_dtype=out_dtype,
                           extra={**(recipe_extra or {}), **({"processes": processes} if processes > 1 else {})})
        if gradients is not None:  # the plan holds their values at t = 0; the recipe records them whole
            recipe["parameters"] = {**recipe.get("parameters", {}), **{k: gradients.shared[k] for k in gradients.keys}}
            recipe["gradients"] = gradients.record()
        recipe_json = json.dumps(recipe, sort_keys=True)
        bar = stack.enter_context(tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc=f"{plan.operator.name} merge of {len(sources)}", disable=not progress,
                                       dynamic_ncols=True))
        update = bar.update if progress else None
        reports: list[WorkerReport] = []
        digests: dict[str, str] | None = {} if verify and processes == 1 else None
        if kind == "torch":
            final, files, stats = _write_torch_file(plan, out, recipe_json, force=force, progress=update,
                                                    digests=digests)
        else:
            meta = {"format": "pt", **_carried_metadata(plan.base or sources[0]), **(metadata or {}),
                    RECIPE_KEY: recipe_json}
            if processes > 1:
                final, files, stats, reports = _write_split(plan, out, meta, shard_size=shard_size,
                                                            out_dtype=out_dtype, force=force, progress=update,
                                                            jobs=jobs, spec=spec, folder_files=folder_files)
            else:
                final, files, stats = _write_safetensors(plan, out, meta, shard_size=shard_size,
                                                         out_dtype=out_dtype, force=force, progress=update,
                                                         digests=digests, folder_files=folder_files)
        # After publishing: the output as the disk returns it, against what the writer sent.
        speaker = ranks == 1 or torch.distributed.get_rank() == 0  # rank 0 checks for a group
        verified = verify_mod.verify_output(final, digests) if verify and speaker else None
        return MergeResult(final, files, stats.tensors, stats.read_bytes, stats.written_bytes, stats.seconds,
                           recipe, plan.skipped, workers=reports, verified=verified)


def _float_dtype(plan: MergePlan, out_dtype: torch.dtype | None) -> torch.dtype | None:
    """The floating dtype of the output's tensors (written into a carried transformers config), if one."""
    if out_dtype is not None:
        return out_dtype
    found = {t.out.dtype for t in plan.tensors if t.out.dtype.is_floating_point}
    return found.pop() if len(found) == 1 else None


def uniform_soup(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, **options: object) -> MergeResult:
    """The uniform soup (plain average) of checkpoints on disk; options as in :func:`soup`.

    Example:
        >>> merge.uniform_soup(sorted(Path("ckpts").glob("*.safetensors")), out="soup.safetensors")  # doctest: +SKIP
    """
    if options.get("weights") is not None:
        raise InvalidArgumentError("uniform_soup takes no weights; use merge.soup(..., weights=...)")
    return soup(paths, out=out, method="uniform", **options)


def average(state_dicts: Sequence[Mapping[str, torch.Tensor] | str | os.PathLike], *,
            weights: Sequence[float] | None = None, method: str | None = None,
            base: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
            params: Mapping[str, object] | None = None, seed: int = 0,
            dtype: str | torch.dtype | None = None, accumulate: str | torch.dtype = "float32",
            on_mismatch: str = "error", strict: bool = False) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory, with the same numerics and checks as :func:`soup`.

    Floating tensors are accumulated in float32 (or float64) and cast back once; integer and bool
    tensors (``num_batches_tracked``) are copied from the first member (the base, for methods with one).

    Args:
        state_dicts: mappings of name -> tensor (or checkpoint paths).
        weights: one per member; normalised to sum to one. None: uniform.
        method: operator name (default ``weighted`` with weights, else ``uniform``).
        base, params, seed, strict: as in :func:`soup`.

    Returns:
        A new state dict on the CPU.

    Example:
        >>> a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
        >>> average([a, b])["w"]
        tensor([0.5000, 0.5000])
    """
    method = resolve_method(method, weights)
    with ExitStack() as stack:
        sources = _open_all(state_dicts, stack, None)
        base_source = _open_all([base], stack, None)[0] if base is not None else None
        plan = plan_soup(state_dicts, method=method, weights=weights, base=base, params=params, seed=seed,
                         dtype=dtype, accumulate=accumulate, device="cpu", on_mismatch=on_mismatch, strict=strict,
                         sources=sources, base_source=base_source)
        sink = MemorySink()
        run_merge(plan, sink)
        return sink.tensors
