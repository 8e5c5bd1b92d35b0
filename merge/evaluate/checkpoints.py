"""Checkpoints rebuilt for evaluation: the model and the data split their metadata records.

:class:`CheckpointEvaluator` rebuilds the architecture of ``papa_merge.model`` and the split of
``papa_merge.data`` once and scores any number of state dicts on it; :func:`recompute_bn_checkpoint`
rewrites a soup with BatchNorm statistics recomputed on the members' training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from merge import bn
from merge.data import load_dataset, load_dataset_from_spec
from merge.data.datasets import canonical_dataset_name
from merge.engine import resolve_device
from merge.errors import DefaultSplitWarning, InvalidArgumentError, MergeError, MismatchError, MissingMetadataError, \
    SameInputOutputError
from merge.evaluate.inference import StateDictScore, load_into, predict
from merge.evaluate.lm import causal_lm_architecture
from merge.evaluate.measures import metrics
from merge.io.formats import SAFETENSORS_SUFFIX
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.io.writer import AtomicOutput, check_output_free, write_state_dict
from merge.keys import DATA_KEY, MODEL_KEY, RECIPE_KEY
from merge.models import forward_logits, make_loader, model_spec, rebuild_model
from merge.soups import MergeResult, soup

__all__ = ["checkpoint_metadata", "resolve_eval_data", "eval_model_spec", "CheckpointEvaluator", "evaluator_for",
           "recompute_bn_checkpoint", "soup_recompute_bn"]


def checkpoint_metadata(path: str | os.PathLike, *, need_data: bool = True,
                        need_model: bool = True) -> tuple[dict | None, dict | None, dict]:
    """The ``papa_merge.model`` and ``papa_merge.data`` specs of a checkpoint, and its raw metadata.

    Checkpoints papa-merge did not write (a ``.pth`` state dict, a plain safetensors file) have no
    metadata: their specs are None when not needed.

    Raises:
        MissingMetadataError: the checkpoint has no ``papa_merge.model`` (when ``need_model``) or no
            ``papa_merge.data`` (when ``need_data``), or the entry is not valid JSON; the message says
            how to fix it.
    """
    meta = read_safetensors_metadata(path)
    specs = []
    for key, needed, what in ((MODEL_KEY, need_model, "the architecture to rebuild the model"),
                              (DATA_KEY, need_data, "the dataset and split seed to rebuild the data")):
        text = meta.get(key)
        if text is None:
            if needed and key == MODEL_KEY and (arch := causal_lm_architecture(path)) is not None:
                raise MissingMetadataError(f"{path}: is a causal language model ({arch}), scored by perplexity on a "
                                           "held-out text, not by accuracy on a dataset; name the text",
                                           path=path, option="eval_text")
            if needed:
                hint = ("name the dataset" if key == DATA_KEY else
                        "name the architecture (small_cnn, timm:<name>, hf:<folder>), write members with "
                        "papa-merge train / merge.train (which record it), or call merge.greedy_soup(paths, "
                        "score=...) from Python with your own evaluate callback")
                raise MissingMetadataError(f"{path}: has no {key!r} metadata ({what}), which greedy soup and "
                                           f"evaluation need; {hint}", path=path,
                                           option="data" if key == DATA_KEY else "model")
            specs.append(None)
            continue
        try:
            specs.append(json.loads(text))
        except ValueError:
            raise MissingMetadataError(f"{path}: its {key!r} metadata is not valid JSON ({text[:60]!r}); "
                                       "the checkpoint was not written by papa-merge") from None
    return specs[0], specs[1], meta


def _split_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    # Fields left unset (None) mean the same as absent ones: specs written by older versions lack them.
    return {k: v for k, v in spec.items() if v is not None}


def resolve_eval_data(data: Any, specs: Sequence[tuple[str, dict | None]]) -> Any:
    """The splits to evaluate checkpoints on: always the members' own split when they record one.

    The split (seed, val fraction, limit, preprocessing) comes from the checkpoints' ``papa_merge.data``
    metadata, so val and test are never rows the members trained on, however ``data`` is spelled
    (``csv:d.csv`` and ``csv:/abs/d.csv`` are one dataset). ``data`` only names the dataset: for
    checkpoints that record none (trained elsewhere), it is loaded with the default split.

    Args:
        data: None, a dataset name, or a ``Splits`` object (used as given).
        specs: ``(path, data spec or None)`` of each checkpoint.

    Returns:
        A ``Splits``.

    Raises:
        MismatchError: the checkpoints record different splits.
        InvalidArgumentError: ``data`` names another dataset than the one the checkpoints record.
        MissingMetadataError: no checkpoint records its data and ``data`` is None.

    Warns:
        DefaultSplitWarning: no checkpoint records its data, so ``data`` is loaded with the default split.
    """
    known = [(p, s) for p, s in specs if s is not None]
    if known:
        p0, s0 = known[0]
        for p, s in known[1:]:
            a, b = _split_fields(s0), _split_fields(s)
            if a != b:
                diff = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                 if a.get(k) != b.get(k))
                raise MismatchError(f"{p} and {p0} were trained on different data splits ({diff}); their val and "
                                    "test rows differ, so evaluate the checkpoints of one split at a time",
                                    path=p)
    if data is not None and not isinstance(data, str):
        return data  # the caller's own Splits, as given
    if known:
        p0, s0 = known[0]
        if data is not None and canonical_dataset_name(data) != s0.get("dataset"):
            raise InvalidArgumentError(
                f"data {data!r} is not the dataset {p0} was trained on ({s0.get('dataset')!r}); val and test "
                "come from the members' own split, which exists only for their dataset",
                path=p0, option="data", choices=(s0.get("dataset"),))
        return load_dataset_from_spec(s0)
    if data is None:
        p0 = specs[0][0] if specs else "the checkpoints"
        raise MissingMetadataError(f"{p0}: has no {DATA_KEY!r} metadata (the dataset and split seed to rebuild "
                                   "the data), which greedy soup and evaluation need; name the dataset",
                                   path=p0, option="data")
    splits = load_dataset(data)
    warnings.warn(f"the checkpoints record no data split, so val and test are papa-merge's default split of {data!r} "
                  f"(seed {splits.spec.get('seed')}, val fraction {splits.spec.get('val_fraction')}); if they were "
                  "trained on this dataset elsewhere, these rows may include their training rows", DefaultSplitWarning,
                  stacklevel=2)
    return splits


def eval_model_spec(model: str | Mapping[str, Any], splits: Any, *, num_classes: int | None = None,
                    in_chans: int | None = None, image_size: int | None = None) -> dict:
    """The model spec to evaluate checkpoints trained elsewhere: an architecture sized to the data.

    Args:
        model: ``small_cnn``, ``timm:<name>``, ``hf:<folder>``, or a full model spec dict.
        splits: the data (its class count, channels and image size are the defaults).
        num_classes, in_chans, image_size: override what the data implies.

    Raises:
        UnknownNameError: an unknown architecture.
    """
    if not isinstance(model, str):
        return dict(model)
    classes = int(num_classes if num_classes is not None else splits.num_classes)
    if model.startswith("hf:"):
        return model_spec(model, classes)
    chans = in_chans if in_chans is not None else (splits.in_chans if splits.kind == "image" else None)
    size = image_size if image_size is not None else (splits.image_size if splits.kind == "image" else None)
    return model_spec(model, classes, in_chans=chans, image_size=size)


def _bar(iterable: Iterable[Any], *, enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """``iterable`` behind a transient progress bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


class CheckpointEvaluator:
    """Scores checkpoints on the splits their metadata names, with one rebuilt model per architecture.

    Built by :meth:`from_checkpoints`; it caches the loaders, so scoring many candidate soups (greedy
    soup) rebuilds nothing. With ``progress``, every pass over data (evaluation, BatchNorm
    recalibration) shows a transient bar on stderr.
    """

    def __init__(self, model_meta: dict, splits: Any, *, batch_size: int = 256, device: str | torch.device = "cpu",
                 n_bins: int = 15, bn_seed: int = 0, progress: bool = False):
        self.model_meta, self.splits = model_meta, splits
        self.batch_size, self.n_bins, self.bn_seed = batch_size, n_bins, bn_seed
        self.progress = progress
        self.device = resolve_device(device)
        self.model = rebuild_model({MODEL_KEY: json.dumps(model_meta)}).to(self.device)
        self._loaders: dict[str, Any] = {}

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | os.PathLike], *, data: Any = None,
                         model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                         in_chans: int | None = None, image_size: int | None = None, batch_size: int = 256,
                         device: str | torch.device = "cpu", n_bins: int = 15,
                         progress: bool = False) -> CheckpointEvaluator:
        """The model and the data of ``paths``: from their metadata, or from ``model`` and ``data``.

        The split always comes from the checkpoints' ``papa_merge.data`` when they record it
        (:func:`resolve_eval_data`); ``model`` names the architecture of checkpoints that record none
        (:func:`eval_model_spec`), e.g. a timm state dict saved with ``torch.save``.

        Raises:
            MissingMetadataError: a checkpoint lacks the architecture (without ``model``), or no
                checkpoint records its data (without ``data``); checked for every path up front.
            MismatchError: the checkpoints describe different architectures or splits.
            InvalidArgumentError: ``data`` names another dataset than the checkpoints' own.
        """
        if not paths:
            raise InvalidArgumentError("no checkpoints given")
        metas = [checkpoint_metadata(p, need_data=False, need_model=model is None) for p in paths]
        model_meta = metas[0][0]
        if model is None:
            for p, (m, _d, _r) in zip(paths[1:], metas[1:]):
                if m != model_meta:
                    raise MismatchError(f"{p} is a {m.get('arch')!r} model {m}, but {paths[0]} is "
                                        f"{model_meta.get('arch')!r} {model_meta}; evaluate one architecture "
                                        "at a time")
        splits = resolve_eval_data(data, [(str(p), d) for p, (_m, d, _r) in zip(paths, metas)])
        if model is not None:
            model_meta = eval_model_spec(model, splits, num_classes=num_classes, in_chans=in_chans,
                                         image_size=image_size)
        return cls(model_meta, splits, batch_size=batch_size, device=device, n_bins=n_bins, progress=progress)

    def loader(self, split: str) -> Any:
        """The (cached) loader of ``split`` (``val`` or ``test``), in dataset order."""
        if split not in self._loaders:
            self._loaders[split] = make_loader(getattr(self.splits, split), self.model_meta,
                                               batch_size=self.batch_size)
        return self._loaders[split]

    def bn_loader(self, num_batches: int) -> Any:
        """``num_batches`` unaugmented training batches, the same ones on every call.

        A fixed, seeded subset rather than a reshuffling loader: every candidate soup of a greedy
        search, and the soup finally written, is recalibrated on exactly the same examples.
        """
        key = f"train:{num_batches}"
        if key not in self._loaders:
            train = self.splits.train
            g = torch.Generator().manual_seed(self.bn_seed)
            rows = torch.randperm(len(train), generator=g)[: num_batches * self.batch_size].tolist()
            subset = Subset(train, rows)
            subset.kind = getattr(train, "kind", None)  # make_loader reads the data kind from the dataset
            self._loaders[key] = make_loader(subset, self.model_meta, batch_size=self.batch_size)
        return self._loaders[key]

    def bn_batches(self, num_batches: int) -> int:
        """How many batches :meth:`bn_loader` yields for ``num_batches``: fewer when the training split is smaller."""
        return min(num_batches, len(self.bn_loader(num_batches))) if num_batches > 0 else 0

    def model_with(self, state_dict: Mapping[str, Tensor], *, recompute_bn: int = 0) -> nn.Module:
        """The evaluator's model holding ``state_dict``, BatchNorm recalibrated on ``recompute_bn`` train batches."""
        load_into(self.model, state_dict)
        if recompute_bn:
            loader = self.bn_loader(recompute_bn)
            batches = _bar(loader, enabled=self.progress, desc="BatchNorm statistics",
                           total=min(recompute_bn, len(loader)))
            bn.recompute_bn(self.model, batches, num_batches=recompute_bn, device=self.device, forward=forward_logits)
        return self.model

    def predict_split(self, split: str) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of the evaluator's model as it now is, on ``split``."""
        loader = self.loader(split)
        return predict(self.model, _bar(loader, enabled=self.progress, desc=f"evaluate on {split}",
                                        total=len(loader)), device=self.device)

    def logits(self, state_dict: Mapping[str, Tensor], split: str, *, recompute_bn: int = 0) -> tuple[Tensor, Tensor]:
        """``(logits, labels)`` of a state dict on ``split``."""
        self.model_with(state_dict, recompute_bn=recompute_bn)
        return self.predict_split(split)

    def scorer(self, *, split: str = "val", metric: str = "acc", recompute_bn: int = 0) -> StateDictScore:
        """``score(state_dict)`` on ``split``: ``acc``, or ``-nll`` for ``nll`` (higher is better)."""
        if metric not in ("acc", "nll"):
            raise InvalidArgumentError(f"metric must be 'acc' or 'nll', got {metric!r}")

        def score(state_dict: Mapping[str, Tensor]) -> float:
            logits, labels = self.logits(state_dict, split, recompute_bn=recompute_bn)
            m = metrics(logits, labels, n_bins=self.n_bins)
            return m["acc"] if metric == "acc" else -m["nll"]

        return score


def evaluator_for(paths: Sequence[str | os.PathLike], *, purpose: str, instead: str, option: str | None = None,
                  choices: tuple = (), data: Any = None, batch_size: int = 256, device: str | torch.device = "cpu",
                  progress: bool = False) -> CheckpointEvaluator:
    """:meth:`CheckpointEvaluator.from_checkpoints` for operations that take no ``model``.

    Such an operation cannot be told the architecture, so a checkpoint that records none is refused
    with what to do instead (``instead``) and the option of that operation that avoids the need
    (``option``, ``choices``), never the ``model`` option it does not have.

    Args:
        paths: the checkpoints (one architecture and split).
        purpose: what needs the model and data, for the message (``"BatchNorm recomputation"``).
        instead: what the caller can do instead, for the message.
        option, choices: the caller's own option that avoids the need, if it has one.
        data, batch_size, device, progress: as in :meth:`CheckpointEvaluator.from_checkpoints`.

    Raises:
        MissingMetadataError: a checkpoint records no architecture, or none records its data and ``data`` is None.
        MismatchError, InvalidArgumentError: as :meth:`CheckpointEvaluator.from_checkpoints`.
    """
    try:
        return CheckpointEvaluator.from_checkpoints(paths, data=data, batch_size=batch_size, device=device,
                                                    progress=progress)
    except MissingMetadataError as e:
        if e.option == "model":
            raise MissingMetadataError(f"{e.path}: has no {MODEL_KEY!r} metadata (the architecture to rebuild the "
                                       f"model), which {purpose} needs; only checkpoints written by papa-merge train "
                                       f"(merge.train) record it: {instead}", path=e.path, option=option,
                                       choices=choices) from None
        if e.option == "data":
            raise MissingMetadataError(f"{e.path}: has no {DATA_KEY!r} metadata (the dataset and split seed to "
                                       f"rebuild the data), which {purpose} needs; name the dataset", path=e.path,
                                       option="data") from None
        raise


def recompute_bn_checkpoint(path: str | os.PathLike, *, num_batches: int, data: Any = None, batch_size: int = 256,
                            device: str | torch.device = "cpu", state_dict: Mapping[str, Tensor] | None = None,
                            evaluator: CheckpointEvaluator | None = None, progress: bool = False) -> Path:
    """Rewrite a soup checkpoint in place with BatchNorm statistics recomputed on training batches.

    The model and the data are rebuilt from the checkpoint's metadata (``data`` overrides the data);
    the statistics come from :meth:`CheckpointEvaluator.bn_loader` (``num_batches`` fixed, seeded,
    unaugmented training batches). The weights are unchanged, the file is replaced atomically, and the
    recorded recipe gains ``bn_recomputed: {"batches", "batch_size", "split"}`` (``batches``: those used,
    fewer than ``num_batches`` when the training split holds fewer). To write a soup whose statistics are
    recomputed before it appears under its name, use :func:`soup_recompute_bn`.

    Args:
        path: a ``.safetensors`` checkpoint with ``papa_merge.model`` (and ``papa_merge.data``) metadata.
        num_batches: training batches to recompute the statistics on.
        data, batch_size, device: as in :func:`merge.evaluate.evaluate_checkpoints`.
        state_dict: the tensors to recalibrate, if already in memory (default: read from ``path``).
        evaluator: reuse this evaluator (its data, batch size and recalibration subset).
        progress: a transient progress bar on stderr over the batches.

    Returns:
        ``path``.

    Raises:
        MissingMetadataError: the checkpoint lacks the model (or data) metadata.
        InvalidArgumentError: ``path`` is not a single ``.safetensors`` file, or ``num_batches`` < 1.

    Example:
        >>> merge.soup(paths, out="soup.safetensors")  # doctest: +SKIP
        >>> recompute_bn_checkpoint("soup.safetensors", num_batches=20)  # doctest: +SKIP
    """
    path = Path(path)
    if num_batches < 1:
        raise InvalidArgumentError(f"recompute_bn needs a positive number of batches, got {num_batches}")
    if path.suffix != ".safetensors" or not path.is_file():
        raise InvalidArgumentError(f"{path}: BatchNorm recalibration rewrites a single .safetensors file; "
                                   "write the soup with -o NAME.safetensors")
    ev = evaluator or CheckpointEvaluator.from_checkpoints([path], data=data, batch_size=batch_size, device=device,
                                                           progress=progress)
    with open_checkpoint(path) as src:
        meta = dict(src.metadata)
        if state_dict is None:
            state_dict = src.state_dict()
    model = ev.model_with(state_dict, recompute_bn=num_batches)
    new = model.state_dict()
    if RECIPE_KEY in meta:
        recipe = json.loads(meta[RECIPE_KEY])
        # The batches the statistics were computed on: fewer than asked when the training split is smaller.
        recipe["bn_recomputed"] = {"batches": ev.bn_batches(num_batches), "batch_size": ev.batch_size,
                                   "split": "train", "seed": ev.bn_seed}
        meta[RECIPE_KEY] = json.dumps(recipe, sort_keys=True)
    meta.pop("format", None)
    # Same tensor names and order as the file; only BatchNorm buffers differ from what was there.
    write_state_dict({k: new[k] if k in new else state_dict[k] for k in state_dict}, path, metadata=meta, force=True)
    return path


def _check_not_a_member(out: Path, paths: Sequence[Any]) -> None:
    """Refuse an output that is, or lies inside, a member: replacing it would delete what the soup reads."""
    out_r = out.resolve()
    for i, p in enumerate(paths):
        if isinstance(p, (str, os.PathLike)) and Path(p).exists():
            q = Path(p).resolve()
            if q == out_r or q.is_relative_to(out_r):
                raise SameInputOutputError(f"output {out} would overwrite member {i} ({p}); write the soup somewhere "
                                           "else", path=out, member=i)


def soup_recompute_bn(members: Sequence[str | os.PathLike], *, out: str | os.PathLike, recompute_bn: int,
                      data: Any = None, batch_size: int = 256, device: str | torch.device = "cpu",
                      force: bool = False, progress: bool = False, evaluator: CheckpointEvaluator | None = None,
                      state_dict: Mapping[str, Tensor] | None = None, **soup_options: Any) -> MergeResult:
    """:func:`merge.soup` with BatchNorm statistics recomputed before the soup appears under its name.

    The architecture and the data are checked first (nothing is written when they are missing or
    ``data`` names another dataset); the soup is written to a temporary file, its statistics are
    recomputed there (:func:`recompute_bn_checkpoint`), and only the complete file is renamed to
    ``out``. An error, Ctrl-C or SIGTERM on the way leaves nothing under ``out`` (and an existing
    ``out`` as it was).

    Args:
        members: checkpoint paths, as :func:`merge.soup` takes them.
        out: the soup's ``.safetensors`` path.
        recompute_bn: training batches of ``batch_size`` to recompute the statistics on (0: a plain soup).
        data: a dataset name for members that record none.
        batch_size, device: of the recomputation (``device`` is also the soup's).
        force: replace an existing ``out`` papa-merge wrote (only once the new one is complete).
        progress: progress bars (the merge, the pass over the batches).
        evaluator: reuse this evaluator (its model, data and recalibration subset).
        state_dict: the soup's tensors, if already in memory (greedy soup's kept average).
        soup_options: the other options of :func:`merge.soup` (``weights``, ``method``, ``metadata``, ...).

    Returns:
        The :class:`merge.soups.MergeResult` of the soup at ``out``; its recipe records ``bn_recomputed``.

    Raises:
        MissingMetadataError: the soup's metadata (its base's, else its first member's) records no
            architecture, or no data and ``data`` is None.
        InvalidArgumentError: ``out`` is not a ``.safetensors`` file, ``recompute_bn`` is negative, or
            ``data`` names another dataset than the members'.
        OutputExistsError, SameInputOutputError: as :func:`merge.soup`.

    Example:
        >>> soup_recompute_bn(["a.safetensors", "b.safetensors"], out="soup.safetensors",
        ...                   recompute_bn=20)  # doctest: +SKIP
    """
    out = Path(out)
    if recompute_bn < 0:
        raise InvalidArgumentError(f"recompute_bn must be a number of batches (0: off), got {recompute_bn}",
                                   option="recompute_bn")
    if not recompute_bn:
        return soup(members, out=out, device=device, force=force, progress=progress, **soup_options)
    if out.suffix != SAFETENSORS_SUFFIX:
        raise InvalidArgumentError(f"{out}: BatchNorm recomputation writes a single .safetensors file; end the path "
                                   "in .safetensors", path=out, option="out")
    check_output_free(out, force=force)  # before the data is loaded, not after the merge
    _check_not_a_member(out, [*members, soup_options.get("base")])
    base = soup_options.get("base")
    # The soup's metadata (architecture, data) is its base's, else its first member's: check that one.
    ev = evaluator or evaluator_for(
        [base if base is not None else members[0]], purpose="BatchNorm recomputation",
        instead="soup them without recomputing BatchNorm, or recompute it from Python on a model you build "
                "(merge.bn.recompute_bn)", option="recompute_bn", choices=(0,), data=data, batch_size=batch_size,
        device=device, progress=progress)
    with AtomicOutput(out, folder=False, force=force) as final, AtomicOutput(out, folder=True, force=force) as work:
        inner = work.file(out.name)
        try:
            result = soup(members, out=inner, device=device, progress=progress, **soup_options)
            recompute_bn_checkpoint(inner, num_batches=recompute_bn, evaluator=ev, state_dict=state_dict)
            os.replace(inner, final.file(out.name))
        except OSError as e:
            if e.errno is not None and not isinstance(e, MergeError) and str(e.filename or "").startswith(
                    str(work.tmp)):
                e.filename = str(out)  # the temporary's name means nothing to the user
            raise
        path = final.commit()
    recipe = json.loads(read_safetensors_metadata(path).get(RECIPE_KEY, "{}"))
    return dataclasses.replace(result, path=path, files=[path], recipe=recipe or result.recipe)
