"""Each member's model and data, resolved as ``papa-merge eval`` resolves them, and the batches it is run on.

Members that record the same architecture and data (``papa_merge.model``, ``papa_merge.data``) share
one :class:`merge.evaluate.CheckpointEvaluator` (one rebuilt model, one loaded split); members of a
multi-task pool, each fine-tuned on its own task, each get their own, so every member is run on its
own data. ``model`` and ``data`` name what members trained elsewhere do not record, exactly as for
``eval`` (:meth:`CheckpointEvaluator.from_checkpoints`).

Batches are unaugmented and fixed (the same ones on every call):

- ``train``: ``num_batches`` batches of a seeded subset of the training split (the rows BatchNorm
  recalibration uses): RegMean's Gram matrices and the Fisher are computed on the data the member
  was trained on, as the references do;
- ``val``: the first ``num_batches`` batches of the validation split, labels unused: AdaMerging's
  unlabeled held-out data (never the test split).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merge.bn import inputs_of
from merge.errors import InvalidArgumentError, MissingMetadataError
from merge.evaluate.checkpoints import CheckpointEvaluator
from merge.io.sources import read_safetensors_metadata
from merge.keys import DATA_KEY, MODEL_KEY

__all__ = ["MemberData", "resolve_members", "DEFAULT_BATCHES", "SPLITS"]

DEFAULT_BATCHES = 8
SPLITS = ("train", "val")


@dataclass
class MemberData:
    """The members' evaluators (``evaluators[i]`` is member ``i``'s, shared within a group) and batch cache."""

    paths: list[str]
    evaluators: list[CheckpointEvaluator]
    num_batches: int
    _batches: dict[tuple[int, str], list[Any]]

    def batches(self, member: int, split: str) -> list[Any]:
        """Member ``member``'s fixed batches of ``split`` (``train`` or ``val``): model inputs, labels dropped.

        Raises:
            InvalidArgumentError: the split holds no rows.
        """
        ev = self.evaluators[member]
        key = (id(ev), split)
        if key not in self._batches:
            loader = ev.bn_loader(self.num_batches) if split == "train" else ev.loader(split)
            got = [inputs_of(b) for b in itertools.islice(loader, self.num_batches)]
            if not got:
                raise InvalidArgumentError(f"{self.paths[member]}: its {split} split holds no rows to run the model on",
                                           path=self.paths[member], option="data")
            self._batches[key] = got
        return self._batches[key]

    def groups(self) -> list[list[int]]:
        """Members grouped by shared evaluator (one model and one split per group), in member order."""
        seen: dict[int, list[int]] = {}
        for i, ev in enumerate(self.evaluators):
            seen.setdefault(id(ev), []).append(i)
        return list(seen.values())

    def record(self, split: str) -> dict:
        """The data the merge ran on, for the recipe."""
        evs = {id(e): e for e in self.evaluators}.values()
        datasets = sorted({str(e.splits.spec.get("dataset")) for e in evs})
        first = self.evaluators[0]
        rec = {"split": split, "batches": self.num_batches, "batch_size": first.batch_size,
               "datasets": datasets}
        if split == "train":
            rec["seed"] = first.bn_seed
        return rec


def _group_key(path: str | os.PathLike) -> tuple[str | None, str | None]:
    meta = read_safetensors_metadata(path)
    return meta.get(MODEL_KEY), meta.get(DATA_KEY)


def resolve_members(paths: Sequence[str | os.PathLike], *, purpose: str, data: Any = None,
                    model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                    in_chans: int | None = None, image_size: int | None = None, num_batches: int = DEFAULT_BATCHES,
                    batch_size: int = 256, device: str | torch.device = "cpu") -> MemberData:
    """Every member's model and data, from its metadata or from ``model`` and ``data``, checked before any work.

    Args:
        paths: the members.
        purpose: what runs them, for messages (``"regmean"``).
        data, model, num_classes, in_chans, image_size: as :meth:`CheckpointEvaluator.from_checkpoints`.
        num_batches, batch_size: how many batches of how many examples each member is run on.
        device: where the models run.

    Raises:
        MissingMetadataError: a member records no architecture and ``model`` is None (``option="model"``), or
            records no data and ``data`` is None (``option="data"``).
        MismatchError, InvalidArgumentError, UnknownNameError: as :meth:`CheckpointEvaluator.from_checkpoints`
            (``data`` naming another dataset than a member's own, an architecture that cannot be built).
    """
    if num_batches < 1:
        raise InvalidArgumentError(f"{purpose} runs each member on at least one batch, got {num_batches}",
                                   option="batches")
    groups: dict[tuple[str | None, str | None], list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(_group_key(p), []).append(i)
    evaluators: list[CheckpointEvaluator | None] = [None] * len(paths)
    for idx in groups.values():
        try:
            ev = CheckpointEvaluator.from_checkpoints([paths[i] for i in idx], data=data, model=model,
                                                      num_classes=num_classes, in_chans=in_chans,
                                                      image_size=image_size, batch_size=batch_size, device=device)
        except MissingMetadataError as e:
            raise _needs(e, purpose) from None
        for i in idx:
            evaluators[i] = ev
    return MemberData([str(p) for p in paths], evaluators, num_batches, {})  # type: ignore[arg-type]


def _needs(e: MissingMetadataError, purpose: str) -> MissingMetadataError:
    """The refusal said for this merge: what it needs the model or the data for."""
    if e.option == "data":
        return MissingMetadataError(f"{e.path}: has no {DATA_KEY!r} metadata (the dataset and split to run it on), "
                                    f"which {purpose} needs: it runs every member on a few batches; name the dataset",
                                    path=e.path, option="data")
    if e.option == "model":
        return MissingMetadataError(f"{e.path}: has no {MODEL_KEY!r} metadata (the architecture to rebuild it), which "
                                    f"{purpose} needs: it runs every member's model on a few batches; name the "
                                    "architecture (small_cnn, timm:<name>, hf:<folder>)", path=e.path, option="model")
    return e
