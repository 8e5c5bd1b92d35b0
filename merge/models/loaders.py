"""Batches shaped for a model: image batches adapted to its input, text batches tokenised by its tokeniser.

The datasets in :mod:`merge.data` yield model-agnostic examples (a normalised image at its native size,
or a string); :func:`make_loader` turns them into what one model spec eats, so the same splits feed a
small CNN at 28x28, an EfficientNet at 224x224 with 3 channels, or a MiniLM.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from merge.errors import InvalidArgumentError
from merge.models.builders import DEFAULT_MAX_LENGTH, check_arch, resolve_hf_folder

__all__ = ["make_loader", "forward_logits", "to_device", "augment_images", "AUGMENT_KEYS"]

AUGMENT_KEYS = ("crop", "flip", "random_erasing")
Inputs = Tensor | dict[str, Tensor]


def _spec(model_meta: Mapping[str, Any] | str) -> dict:
    if isinstance(model_meta, str):
        model_meta = json.loads(model_meta)
    if not isinstance(model_meta, Mapping) or "arch" not in model_meta:
        raise InvalidArgumentError("model_meta must be a model spec (merge.models.model_spec) with an 'arch'")
    return dict(model_meta)


def _dataset_kind(dataset: Dataset) -> str:
    kind = getattr(dataset, "kind", None)
    if kind in ("image", "text"):
        return kind
    x, _ = dataset[0]
    return "text" if isinstance(x, str) else "image"


def augment_images(x: Tensor, *, crop: bool = False, flip: bool = False, random_erasing: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Per-example random crop (pad by 1/8 of the size, crop back), horizontal flip and random erasing.

    Args:
        x: a batch ``[B, C, H, W]`` of normalised images.
        crop: pad each side by ``max(1, H // 8)`` pixels (replicating the border, the background of
            digit images) and cut a random ``H x W`` window, as in the CIFAR recipes.
        flip: mirror each image left-right with probability 1/2.
        random_erasing: probability of zeroing (the mean pixel after normalisation) one random rectangle
            of 2-33% of the area and aspect ratio 0.3-3.3 (Zhong et al., 2020; the values PAPA draws
            members from are 0, 0.15, 0.35).
        generator: the random source (seeded for reproducible runs).

    Returns:
        A new tensor of the same shape.
    """
    b, _, h, w = x.shape
    out = x.clone()
    if crop:
        pad = max(1, h // 8)
        padded = F.pad(out, [pad, pad, pad, pad], mode="replicate")
        offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
        for i in range(b):
            oy, ox = int(offs[i, 0]), int(offs[i, 1])
            out[i] = padded[i, :, oy:oy + h, ox:ox + w]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    if random_erasing > 0:
        hit = torch.rand(b, generator=generator) < random_erasing
        for i in torch.nonzero(hit).flatten().tolist():
            for _ in range(10):  # rejection sampling of a rectangle that fits, as torchvision does
                area = h * w * float(torch.empty(1).uniform_(0.02, 0.33, generator=generator))
                log_r = float(torch.empty(1).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator))
                eh, ew = round(math.sqrt(area * math.exp(log_r))), round(math.sqrt(area / math.exp(log_r)))
                if 0 < eh < h and 0 < ew < w:
                    top = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
                    left = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
                    out[i, :, top:top + eh, left:left + ew] = 0.0
                    break
    return out


class _ImageCollate:
    """Stacks images, adapts channels and size to the model, then augments (training loaders only)."""

    def __init__(self, in_chans: int, image_size: int | None, augment: Mapping[str, Any] | None, seed: int):
        self.in_chans, self.image_size = in_chans, image_size
        self.augment = {k: v for k, v in (augment or {}).items() if v}
        self.generator = torch.Generator().manual_seed(seed) if self.augment else None

    def __call__(self, batch: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch], dtype=torch.long)
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.expand(-1, self.in_chans, -1, -1).contiguous()  # grey to RGB
            elif self.in_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise InvalidArgumentError(f"the model takes {self.in_chans}-channel images but the data has {c}; "
                                           "build it with in_chans matching the data")
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            shrink = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        if self.augment:
            x = augment_images(x, generator=self.generator, **self.augment)
        return x, y


@functools.lru_cache(maxsize=4)
def _tokenizer(ref: str) -> Any:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_hf_folder(ref)))


class _TextCollate:
    """Tokenises a batch of strings with the model folder's tokeniser (padded to the longest, truncated)."""

    def __init__(self, ref: str, max_length: int):
        self.ref, self.max_length = ref, max_length

    def __call__(self, batch: Sequence[tuple[str, int]]) -> tuple[dict[str, Tensor], Tensor]:
        tok = _tokenizer(self.ref)
        enc = tok([b[0] for b in batch], padding=True, truncation=True, max_length=self.max_length,
                  return_tensors="pt")
        return dict(enc), torch.tensor([b[1] for b in batch], dtype=torch.long)


def make_loader(dataset: Dataset, model_meta: Mapping[str, Any] | str, *, batch_size: int, shuffle: bool = False,
                seed: int = 0, augment: Mapping[str, Any] | None = None, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` of ``(inputs, labels)`` shaped for the model ``model_meta`` describes.

    Args:
        dataset: a split from :func:`merge.data.load_dataset` (or any dataset of ``(x, label)``).
        model_meta: the model spec (:func:`merge.models.model_spec`, or its JSON string).
        batch_size: examples per batch.
        shuffle: reshuffle every epoch, in an order fixed by ``seed`` (the data-order seed).
        seed: seeds the shuffle and the augmentations.
        augment: image augmentations ``{"crop": bool, "flip": bool, "random_erasing": p}``; ignored
            for text. Reproducible with ``num_workers=0`` (workers each draw from a copy).
        num_workers: loader worker processes.
        drop_last: drop a last incomplete batch (training: BatchNorm cannot take a batch of one).

    Returns:
        A ``DataLoader``: inputs are a float tensor ``[B, C, H, W]`` (images, resized and channel-adapted
        to the spec's ``image_size``/``in_chans``) or a dict of tensors (tokenised text); labels ``[B]``.

    Raises:
        InvalidArgumentError: the data kind does not fit the model (text for an image model, ...).
    """
    spec = _spec(model_meta)
    if batch_size <= 0:
        raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}")
    unknown = set(augment or {}) - set(AUGMENT_KEYS)
    if unknown:
        raise InvalidArgumentError(f"unknown augmentation(s) {sorted(unknown)}; valid: {', '.join(AUGMENT_KEYS)}")
    family, name = check_arch(spec["arch"])
    kind = _dataset_kind(dataset)
    if family == "hf":
        if kind != "text":
            raise InvalidArgumentError(f"{spec['arch']} is a text model but the data is {kind}s; use small_cnn or "
                                       "timm:<name> for images")
        collate: Any = _TextCollate(name, int((spec.get("kwargs") or {}).get("max_length", DEFAULT_MAX_LENGTH)))
    else:
        if kind != "image":
            raise InvalidArgumentError(f"{spec['arch']} is an image model but the data is {kind}; use "
                                       "hf:<folder> (e.g. hf:all-minilm-l6-v2-pypi) for text")
        collate = _ImageCollate(int(spec.get("in_chans") or 3), spec.get("image_size"), augment, seed)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate,
                      num_workers=num_workers, drop_last=drop_last and len(dataset) > batch_size)


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """Move a batch's inputs (a tensor or a dict of tensors) to ``device``."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def forward_logits(model: nn.Module, inputs: Inputs) -> Tensor:
    """Logits ``[B, C]`` of any of our model kinds (plain modules, timm, Hugging Face classifiers)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
