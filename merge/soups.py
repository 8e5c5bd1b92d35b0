"""Soups: merge checkpoints on disk (streaming) or state dicts in memory.

``soup`` is the verb behind ``papa-merge soup``; ``uniform_soup`` and ``average`` are its shortcuts.
Greedy soup and the population methods build on these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merge.engine import MemorySink, MergePlan, plan_merge, resolve_device, run_merge
from merge.errors import InvalidArgumentError, SameInputOutputError
from merge.keys import MEMBER_ONLY_KEYS, RECIPE_KEY, TRAIN_KEY, version
from merge.io import schemes
from merge.io.dtypes import ACCUMULATE_DTYPE_NAMES, dtype_name, parse_dtype
from merge.io.sources import Source, StateDictSource, open_checkpoint
from merge.io.folder import carry_folder_files
from merge.io.writer import INDEX_FILE, AtomicOutput, FileSink, parse_size, plan_output
from merge.ops import check_weights, get_operator

__all__ = ["MergeResult", "soup", "uniform_soup", "average", "plan_soup", "RECIPE_KEY", "recipe_of"]



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

    @property
    def gb_per_s(self) -> float:
        return self.read_bytes / self.seconds / 1e9 if self.seconds else float("inf")


def _check_not_an_input(out: Path, sources: Sequence[Source]) -> None:
    """Refuse an output that is, or whose replacement would delete, a file a member reads."""
    out_r = out.resolve()
    for i, src in enumerate(sources):
        for f in [src.path, *src.files]:
            q = f.resolve()
            if q == out_r or q.is_relative_to(out_r):
                raise SameInputOutputError(f"output {out} would overwrite member {i} ({src.path}); "
                                           "write the soup somewhere else")


def recipe_of(plan: MergePlan, *, out_dtype: torch.dtype | None, extra: Mapping[str, object] | None = None) -> dict:
    """The recipe recorded in the output's metadata: method, members, weights, dtypes, tool version."""
    members = []
    for src in plan.sources:
        fp = src.fingerprint()
        source = schemes.describe(src.path)
        if source:
            fp["source"] = source
        train = src.metadata.get(TRAIN_KEY)
        if train:
            try:
                fp["train"] = json.loads(train)
            except ValueError:
                pass
        members.append(fp)
    recipe = {
        "tool": "papa-merge",
        "version": version(),
        "method": plan.operator.name,
        "citation": plan.operator.citation,
        "members": members,
        "weights": plan.weights,
        "coefficients": plan.coefficients,
        "divisor": plan.divisor,
        "dtype": dtype_name(out_dtype) if out_dtype is not None else "as input",
        "accumulate": dtype_name(plan.accumulate),
        "device": plan.device.type,
        "skipped": plan.skipped,
        "copied_from_first": plan.copied_mismatched,
    }
    recipe.update(extra or {})
    return recipe


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
            sources.append(stack.enter_context(open_checkpoint(m, key=key)))
    return sources


def plan_soup(members: Sequence[str | os.PathLike | Source], *, method: str = "uniform",
              weights: Sequence[float] | None = None, dtype: str | torch.dtype | None = None,
              accumulate: str | torch.dtype = "float32", device: str | torch.device | None = "cpu",
              on_mismatch: str = "error", chunk_bytes: int | None = None,
              sources: list[Source] | None = None) -> MergePlan:
    """Validate a soup without writing anything (``papa-merge soup --dry-run``).

    The returned plan's ``out_bytes`` and ``buffer_bytes`` say how much the soup will write and how much
    working memory it will allocate, before any tensor is read.
    """
    op = get_operator(method)
    dev = resolve_device(device)  # before any file is opened: a missing GPU costs nothing
    out_dtype = parse_dtype(dtype)
    acc_dtype = parse_dtype(accumulate, allowed=ACCUMULATE_DTYPE_NAMES, what="accumulate dtype")
    if sources is None:
        with ExitStack() as stack:
            sources = _open_all(members, stack, None)
            return plan_soup(members, method=method, weights=weights, dtype=dtype, accumulate=accumulate,
                             device=dev, on_mismatch=on_mismatch, chunk_bytes=chunk_bytes, sources=sources)
    w = check_weights(weights, len(sources))
    return plan_merge(sources, op, weights=w, dtype=out_dtype, accumulate=acc_dtype, device=dev,
                      on_mismatch=on_mismatch, chunk_bytes=chunk_bytes)


def soup(members: Sequence[str | os.PathLike | Source], *, out: str | os.PathLike, method: str = "uniform",
         weights: Sequence[float] | None = None, dtype: str | torch.dtype | None = None,
         accumulate: str | torch.dtype = "float32", device: str | torch.device | None = "cpu",
         shard_size: int | str = "5GB", on_mismatch: str = "error", force: bool = False,
         key: str | None = None, metadata: Mapping[str, str] | None = None,
         recipe_extra: Mapping[str, object] | None = None, progress: bool = False,
         chunk_bytes: int | None = None) -> MergeResult:
    """Merge checkpoints on disk into one, streaming tensor by tensor.

    Args:
        members: checkpoint paths (safetensors files, model folders, shard indexes, ``.bin``/``.pt``
            pickles, ``hf://org/name[@rev]``); a path listed twice counts twice.
        out: a ``.safetensors`` file, or a folder (any other path) written as a Hugging Face model
            folder, sharded past ``shard_size``, with the first member's config and tokenizer files.
        method: an operator name from :func:`merge.ops.list_operators` (``uniform``, ``weighted``).
        weights: one weight per member (per entry, not per file); implies ``method="weighted"``
            when ``method`` is left at ``uniform``.
        dtype: output dtype for floating tensors (default: the inputs' own).
        accumulate: ``float32`` (default) or ``float64``.
        device: ``cpu`` or ``cuda[:N]`` to reduce on a GPU, streamed chunk by chunk.
        shard_size: largest shard of a folder output, e.g. ``5GB``.
        on_mismatch: ``error`` (default), ``skip`` mismatched tensors, or take them from the ``first``.
        force: replace an existing output (only once the new one is complete).
        key: wrapper key for pickled training checkpoints (``ema``, ``state_dict``, ...).
        metadata: extra string pairs stored in the output header.
        recipe_extra: extra fields for the recorded recipe (greedy soup records its selection).
        progress: show a progress bar (bytes read, tensors).

    Returns:
        A :class:`MergeResult` (path, files, sizes, time, and the recorded recipe).

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: a member cannot be read.
        MismatchError: members disagree on names, shapes or dtypes.
        OutputExistsError, SameInputOutputError: the output would overwrite something.
        DeviceUnavailableError: ``device`` is not on this machine.

    Example:
        >>> import merge
        >>> merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
    """
    if weights is not None and method == "uniform":
        method = "weighted"
    out = Path(out)
    with ExitStack() as stack:
        resolve_device(device)
        get_operator(method)
        sources = _open_all(members, stack, key)
        plan = plan_soup(members, method=method, weights=weights, dtype=dtype, accumulate=accumulate,
                         device=device, on_mismatch=on_mismatch, chunk_bytes=chunk_bytes, sources=sources)
        _check_not_an_input(out, sources)
        out_plan = plan_output([t.out for t in plan.tensors], out, shard_size=parse_size(shard_size))
        recipe = recipe_of(plan, out_dtype=parse_dtype(dtype), extra=recipe_extra)
        meta = {"format": "pt", **_carried_metadata(sources[0]), **(metadata or {}),
                RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
        with AtomicOutput(out, folder=out_plan.folder, force=force) as atomic:
            sink = FileSink(out_plan, atomic, meta)
            bar = stack.enter_context(tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"{method} soup of {len(sources)}", disable=not progress,
                                           dynamic_ncols=True))
            stats = run_merge(plan, sink, progress=bar.update if progress else None)
            extra_files = []
            if out_plan.folder:
                extra_files = carry_folder_files(sources[0].path, atomic)
                if len(out_plan.files) > 1:
                    index = {"metadata": {"total_size": out_plan.nbytes},
                             "weight_map": {t.name: f.name for f in out_plan.files for t in f.tensors}}
                    atomic.file(INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            final = atomic.commit()
        files = ([final / f.name for f in out_plan.files] + [final / p.name for p in extra_files]
                 if out_plan.folder else [final])
        return MergeResult(final, files, stats.tensors, stats.read_bytes, stats.written_bytes, stats.seconds,
                           recipe, plan.skipped)


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
            dtype: str | torch.dtype | None = None, accumulate: str | torch.dtype = "float32",
            on_mismatch: str = "error") -> dict[str, torch.Tensor]:
    """Average state dicts in memory, with the same numerics and checks as :func:`soup`.

    Floating tensors are accumulated in float32 (or float64) and cast back once; integer and bool
    tensors (``num_batches_tracked``) are copied from the first member.

    Args:
        state_dicts: mappings of name -> tensor (or checkpoint paths).
        weights: one per member; normalised to sum to one. None: uniform.
        method: operator name (default ``weighted`` with weights, else ``uniform``).

    Returns:
        A new state dict on the CPU.

    Example:
        >>> a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
        >>> average([a, b])["w"]
        tensor([0.5000, 0.5000])
    """
    method = method or ("weighted" if weights is not None else "uniform")
    with ExitStack() as stack:
        sources = _open_all(state_dicts, stack, None)
        plan = plan_soup(state_dicts, method=method, weights=weights, dtype=dtype, accumulate=accumulate,
                         device="cpu", on_mismatch=on_mismatch, sources=sources)
        sink = MemorySink()
        run_merge(plan, sink)
        return sink.tensors
