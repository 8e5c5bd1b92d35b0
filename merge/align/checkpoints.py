"""Alignment of checkpoints: members permuted onto a reference member, written out or merged, then REPAIR.

The members' architecture and data come from their metadata (``papa_merge.model``, ``papa_merge.data``,
as ``papa-merge train`` writes them); the model is traced once (:func:`merge.align.permute.permutation_spec`)
on a training batch, and activation matching runs on ``num_batches`` fixed, seeded, unaugmented training
batches (:meth:`merge.evaluate.CheckpointEvaluator.bn_loader`, the batches BatchNorm recalibration uses).

After a merge of aligned members the statistics are fixed as :func:`merge.repair.fix_statistics` decides
(Ainsworth et al. reset BatchNorm after merging; Jordan et al.'s REPAIR corrects the convolutions that
feed no BatchNorm): ``batchnorm`` recomputes the running statistics, ``repair`` rescales those
convolutions to the average of the aligned members' statistics, ``none`` leaves the network as merged.

Example:
    >>> write_aligned(["run/member-00.safetensors", "run/member-01.safetensors"], out="aligned/")  # doctest: +SKIP
    >>> soup_aligned(["run/member-00.safetensors", "run/member-01.safetensors"], out="soup.safetensors",
    ...              align="weight", repair=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge.align.permute import ALIGN_METHODS, AlignResult, align
from merge.bn import inputs_of
from merge.errors import DifferentStartsWarning, InvalidArgumentError
from merge.evaluate.checkpoints import CheckpointEvaluator, checkpoint_metadata, evaluator_for
from merge.io.folder import carry_folder_files
from merge.io.formats import SAFETENSORS_SUFFIX, SINGLE_FILE
from merge.io.schemes import public_name
from merge.io.sources import StateDictSource, open_checkpoint
from merge.io.writer import AtomicOutput, check_output_free, write_state_dict
from merge.keys import MEMBER_ONLY_KEYS, RECIPE_KEY, version
from merge.models import forward_logits
from merge.repair import REPAIR_CITATION, channel_stats, fix_statistics, repair_targets, statistics_fix
from merge.soups import MergeResult, soup

__all__ = ["AlignedMembers", "align_checkpoints", "write_aligned", "soup_aligned", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = 8


@dataclass
class AlignedMembers:
    """Members aligned in memory: the :class:`AlignResult`, each member's metadata, the model traced, and the
    evaluator whose model and training batches were used (None for Hugging Face folders without papa-merge's
    metadata, aligned by weight matching on the model their ``config.json`` describes)."""

    paths: list[str]
    result: AlignResult
    metadata: list[dict[str, str]]
    evaluator: CheckpointEvaluator | None
    batches: list[Any]
    model: nn.Module | None = None

    @property
    def state_dicts(self) -> list[dict[str, Tensor]]:
        return self.result.state_dicts

    def record(self) -> dict:
        """The alignment's provenance for a recipe: method, reference, permutations, what stayed in place."""
        rec = self.result.record()
        rec["members"] = [public_name(p) for p in self.paths]
        rec["batches"] = {"count": len(self.batches), "batch_size": self.evaluator.batch_size, "split": "train",
                          "seed": self.evaluator.bn_seed} \
            if self.result.method == "activation" and self.evaluator is not None else None
        return rec


def model_folders(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether every path is a Hugging Face model folder (``config.json`` beside the weights) whose weights carry
    no ``papa_merge.model`` metadata (saved with ``save_pretrained``, or a sentence-transformers folder)."""
    return all(Path(p).is_dir() and (Path(p) / "config.json").is_file()
               and checkpoint_metadata(p, need_data=False, need_model=False)[0] is None for p in paths)


def folder_model(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Tensor]]:
    """The model a Hugging Face folder's ``config.json`` describes (its ``architectures`` class, else ``AutoModel``:
    a sentence-transformers folder's encoder), with fresh weights, and a tokenised example to trace it with.

    The example is two rows of 8 token ids, the second padded after 5 (so the padding mask is traced too).

    Raises:
        InvalidArgumentError: the config names no text model (no ``vocab_size``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a download
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise InvalidArgumentError(f"{folder}: its config.json describes no text model (no vocab_size), and only text "
                                   "models are aligned from a bare Hugging Face folder; train members with papa-merge "
                                   "train, which records the architecture", path=folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    model = cls(config) if isinstance(cls, type) and issubclass(cls, nn.Module) else AutoModel.from_config(config)
    ids = torch.randint(0, min(vocab, 1000), (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


def align_checkpoints(paths: Sequence[str | os.PathLike], *, method: str = "weight", reference: int = 0,
                      data: Any = None, num_batches: int = DEFAULT_BATCHES, batch_size: int = 256, seed: int = 0,
                      max_iter: int = 100, device: str | torch.device = "cpu",
                      progress: bool = False) -> AlignedMembers:
    """Permute every member's hidden units onto member ``reference``'s (Git Re-Basin), in memory.

    Args:
        paths: two or more papa-merge checkpoints of one architecture.
        method: ``weight`` (weight matching) or ``activation`` (activation matching on training batches).
        reference: the member the others are aligned onto.
        data: a dataset name for members that record none.
        num_batches: training batches of ``batch_size`` for activation matching (and REPAIR after a merge).
        seed, max_iter: of weight matching.
        device, progress: where activation matching runs; progress bars.

    Returns:
        :class:`AlignedMembers`.

    Raises:
        InvalidArgumentError: fewer than 2 members, an unknown method, a reference out of range, a model that
            cannot be traced.
        MissingMetadataError, MismatchError: as :meth:`merge.evaluate.CheckpointEvaluator.from_checkpoints`.
    """
    if len(paths) < 2:
        raise InvalidArgumentError(f"alignment needs at least 2 members (a reference and one to align), got "
                                   f"{len(paths)}")
    if method not in ALIGN_METHODS:
        raise InvalidArgumentError(f"unknown alignment method {method!r}; choose one of {', '.join(ALIGN_METHODS)}",
                                   option="align", choices=list(ALIGN_METHODS))
    if num_batches < 1:
        raise InvalidArgumentError(f"alignment needs at least one training batch, got {num_batches}",
                                   option="align_batches")
    ev: CheckpointEvaluator | None = None
    if model_folders(paths):
        # Hugging Face folders (save_pretrained, sentence-transformers): the architecture is in config.json; no data
        if method == "activation":
            raise InvalidArgumentError(f"{paths[0]}: activation matching runs the members on their training data, "
                                       "which a Hugging Face folder does not record; align it by weight matching, or "
                                       "train the members with papa-merge train (which records it)", option="align",
                                       choices=["weight"])
        model, example = folder_model(paths[0])
        batches = [example]
    else:
        ev = evaluator_for(list(paths), purpose="alignment (the model is traced from its architecture)",
                           instead="align state dicts of a model you build with merge.align.align", data=data,
                           batch_size=batch_size, device=device, progress=progress)
        model, batches = ev.model, [inputs_of(b) for b in ev.bn_loader(num_batches)]
    sds, metas = [], []
    for p in paths:
        with open_checkpoint(p) as src:
            sds.append(src.state_dict())
            metas.append(dict(src.metadata))
    result = align(model, sds, method=method, example_input=batches[0], batches=batches,
                   reference=reference, seed=seed, max_iter=max_iter, device=ev.device if ev else device)
    return AlignedMembers([str(p) for p in paths], result, metas, ev, batches, model)


def _out_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    names = []
    for p in paths:
        name = Path(str(p).rstrip("/")).name
        if Path(p).is_dir():
            names.append(name)  # a model folder is written as a folder of the same name
            continue
        names.append(name if name.endswith(SAFETENSORS_SUFFIX) else Path(name).stem + SAFETENSORS_SUFFIX)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        names = [f"member-{i:02d}-{n}" for i, n in enumerate(names)]
    return names


def write_aligned(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, force: bool = False,
                  **options: Any) -> tuple[list[Path], AlignedMembers]:
    """Write every member, permuted onto the reference, into the folder ``out`` (one ``.safetensors`` each).

    Each written member computes the same function as its input (its units are only reordered) and keeps
    its metadata; its recipe records the alignment. The folder appears only when every member is in it.

    Args:
        paths: the members (the reference among them, written unchanged).
        out: the folder to write.
        force: replace an existing folder papa-merge wrote.
        options: those of :func:`align_checkpoints`.

    Returns:
        ``(files, aligned)``.

    Raises:
        OutputExistsError: ``out`` exists and not ``force``.
        As :func:`align_checkpoints`.

    Example:
        >>> files, _ = write_aligned(["a.safetensors", "b.safetensors"], out="aligned/")  # doctest: +SKIP
    """
    out = Path(out)
    check_output_free(out, force=force)
    aligned = align_checkpoints(paths, **options)
    record = aligned.record()
    files = []
    with AtomicOutput(out, folder=True, force=force) as atomic:
        for i, (name, sd, meta) in enumerate(zip(_out_names(paths), aligned.state_dicts, aligned.metadata)):
            meta = {k: v for k, v in meta.items() if k != "format"}
            recipe = {"method": "align", "member": public_name(paths[i]), "index": i, "align": record,
                      "papa_merge_version": version()}
            meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
            if Path(paths[i]).is_dir():
                # a model folder stays one: its config and tokenizer files beside the permuted weights
                sub = _Subfolder(atomic, name)
                carry_folder_files(Path(paths[i]), sub)  # type: ignore[arg-type]
                write_state_dict(sd, sub.file(SINGLE_FILE), metadata=meta)
            else:
                write_state_dict(sd, atomic.file(name), metadata=meta)
            files.append(out / name)
        atomic.commit()
    return files, aligned


class _Subfolder:
    """A subfolder of a folder output, for writers that take an output and name its files."""

    def __init__(self, atomic: AtomicOutput, name: str):
        self.root = atomic.file(name)
        self.root.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.root / name


def soup_aligned(members: Sequence[str | os.PathLike], *, out: str | os.PathLike, align: str = "weight",
                 repair: bool = True, reference: int = 0, data: Any = None, num_batches: int = DEFAULT_BATCHES,
                 batch_size: int = 256, align_seed: int = 0, device: str | torch.device = "cpu",
                 force: bool = False, progress: bool = False, **soup_options: Any) -> MergeResult:
    """:func:`merge.soup` of the members aligned onto member ``reference``, then REPAIR or the BatchNorm reset.

    Args:
        members: papa-merge checkpoints of one architecture, trained from different initialisations.
        out: the soup; with ``repair``, a ``.safetensors`` file.
        align: ``weight`` or ``activation`` (:func:`align_checkpoints`).
        repair: fix the merged network's statistics (:func:`merge.repair.fix_statistics`) on the same
            training batches, before the soup appears under its name.
        reference, data, num_batches, batch_size, align_seed, device, progress: as :func:`align_checkpoints`.
        force: replace an existing output.
        soup_options: the other options of :func:`merge.soup` (``method``, ``weights``, ``params``, ...).

    Returns:
        The :class:`merge.soups.MergeResult`; its recipe records ``align`` (the permutations' provenance) and,
        with ``repair``, ``statistics`` (what was fixed, on how many batches).

    Raises:
        InvalidArgumentError: ``repair`` with an output that is not a ``.safetensors`` file; as
            :func:`align_checkpoints` and :func:`merge.soup`.

    Example:
        >>> soup_aligned(paths, out="soup.safetensors", align="activation")  # doctest: +SKIP
    """
    out = Path(out)
    # Hugging Face folders hold no BatchNorm to fix (statistics_fix is "none" for LayerNorm encoders): any output
    if repair and out.suffix != SAFETENSORS_SUFFIX and not model_folders(members):
        raise InvalidArgumentError(f"{out}: a repaired soup is written as one .safetensors file; end the path in "
                                   ".safetensors", path=out, option="out")
    check_output_free(out, force=force)
    aligned = align_checkpoints(members, method=align, reference=reference, data=data, num_batches=num_batches,
                                batch_size=batch_size, seed=align_seed, device=device, progress=progress)
    meta = {k: v for k, v in aligned.metadata[reference].items() if k not in MEMBER_ONLY_KEYS}
    extra = {**(soup_options.pop("recipe_extra", None) or {}), "align": aligned.record()}
    options = dict(soup_options, metadata={**meta, **(soup_options.get("metadata") or {})}, recipe_extra=extra)
    with warnings.catch_warnings():
        # Aligned members still lie far apart in weight space; the alignment is the remedy the warning names.
        warnings.simplefilter("ignore", DifferentStartsWarning)
        return _soup_and_fix(aligned, out=out, repair=repair, device=device, force=force, progress=progress,
                             options=options)


def _soup_and_fix(aligned: AlignedMembers, *, out: Path, repair: bool, device: str | torch.device, force: bool,
                  progress: bool, options: dict[str, Any]) -> MergeResult:
    ev = aligned.evaluator
    if repair and ev is None and statistics_fix(aligned.model) != "none":
        raise InvalidArgumentError(f"{aligned.paths[0]}: the merged network's statistics are fixed on training data, "
                                   "which a Hugging Face folder does not record; merge without fixing them",
                                   option="repair")
    if not repair or ev is None:
        # Sources named after the members: a folder output carries the first member's config and tokenizer files.
        members = [StateDictSource(sd, path=p, metadata=m)
                   for sd, p, m in zip(aligned.state_dicts, aligned.paths, aligned.metadata)]
        return soup(members, out=out, device=device, force=force, progress=progress, **options)
    with AtomicOutput(out, folder=False, force=force) as final, AtomicOutput(out, folder=True, force=force) as work:
        inner = work.file(out.name)
        result = soup(aligned.state_dicts, out=inner, device=device, progress=progress, **options)
        with open_checkpoint(inner) as src:
            merged, meta = src.state_dict(), dict(src.metadata)
        kind = statistics_fix(ev.model)
        targets = None
        if kind == "repair":
            weights = _weights(options.get("weights"), len(aligned.state_dicts))
            stats = []
            for sd in aligned.state_dicts:
                stats.append(channel_stats(ev.model_with(sd), aligned.batches, device=ev.device,
                                           forward=forward_logits))
            targets = repair_targets(stats, weights)
        model = ev.model_with(merged)
        fix_statistics(model, aligned.batches, device=ev.device, targets=targets, forward=forward_logits)
        fixed = model.state_dict()
        recipe = json.loads(meta.get(RECIPE_KEY, "{}"))
        recipe["statistics"] = {"fix": kind, "batches": len(aligned.batches), "batch_size": ev.batch_size,
                                "split": "train", "seed": ev.bn_seed,
                                "citation": REPAIR_CITATION if kind == "repair" else None}
        meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
        meta.pop("format", None)
        write_state_dict({k: fixed[k] if k in fixed else merged[k] for k in merged}, final.file(out.name),
                         metadata=meta)
        path = final.commit()
    return dataclasses.replace(result, path=path, files=[path], recipe=recipe)


def _weights(weights: Any, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    total = sum(w)
    return [x / total for x in w]
