"""Members in the form their library loads: a transformers or timm model folder beside the weights.

A member of an ``hf:`` or ``timm:`` model is written as a folder (``member-00/``)::

    member-00/model.safetensors     the weights, with papa-merge's metadata (model, data, train, metrics)
    member-00/config.json           transformers: the trained head (num_labels, id2label), architectures
                                    timm: architecture, num_classes, label_names, model_args (in_chans),
                                          pretrained_cfg (input_size, mean, std, interpolation, crop_pct)
    member-00/tokenizer*.json ...   transformers: the tokenizer files of the model it was fine-tuned from

A ``small_cnn`` belongs to no library: its members are single ``.safetensors`` files that load with
:func:`merge.models.load_member`. Written as a folder (any path without a suffix), it gets a
``config.json`` too (:func:`small_cnn_config`): the architecture and its sizes, the class names, and
the call that loads it, so the folder says what it holds without papa-merge's metadata reader.

so ``AutoModelForSequenceClassification.from_pretrained("member-00")`` and
``timm.create_model("local-dir:member-00", pretrained=True)`` load it with nothing else, a soup of such
members (``papa-merge soup ckpts/member-* -o soup/``) carries member 0's files and loads the same way,
and ``papa-merge push soup/ org/name`` makes a repo that ``pipeline(...)`` or ``timm.create_model(
"hf-hub:org/name", pretrained=True)`` loads. ``small_cnn`` belongs to no library: its members stay
single ``.safetensors`` files and load with :func:`merge.models.load_member`.

Example:
    >>> from merge.models.export import write_member
    >>> write_member(net.state_dict(), "ckpts/member-00", spec=spec, metadata=meta,
    ...              classes=splits.classes)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.io.formats import SAFETENSORS_SUFFIX, SINGLE_FILE
from merge.io.writer import AtomicOutput, write_state_dict
from merge.models.builders import build_architecture, check_arch, resolve_hf_folder, timm_takes_img_size

__all__ = ["member_form", "write_member", "library_files", "hf_config", "timm_config", "small_cnn_config",
           "TOKENIZER_FILES"]

# The files a transformers tokenizer may be saved as (copied verbatim from the model a member came from).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Preprocessing papa-merge's loaders apply (merge.models.loaders): bilinear resize to the model's size, no crop.
_INTERPOLATION, _CROP_PCT = "bilinear", 1.0


def member_form(arch: str) -> str:
    """``"folder"`` for models a library loads from a folder (``hf:``, ``timm:``), ``"file"`` for ``small_cnn``.

    Example:
        >>> member_form("timm:resnet18"), member_form("small_cnn")
        ('folder', 'file')
    """
    family, _ = check_arch(arch)
    return "file" if family == "small_cnn" else "folder"


def _float_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def hf_config(spec: Mapping[str, Any], classes: Sequence[str] | None = None, *,
              dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of an ``hf:`` member: its base model's config with the trained head.

    ``num_labels`` and ``id2label``/``label2id`` (the dataset's class names), ``architectures`` (the
    sequence-classification class, so pipelines and the Hub know the task), ``problem_type`` and
    ``dtype``; the rest is the config of the folder the member was fine-tuned from.

    Raises:
        CheckpointNotFoundError: the base model folder is not there.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never trigger a download
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    _, ref = check_arch(spec["arch"])
    n = int(spec["num_classes"])
    names = [str(c) for c in classes] if classes is not None and len(classes) == n else [f"LABEL_{i}" for i in range(n)]
    opts = {k: v for k, v in (spec.get("kwargs") or {}).items() if k != "max_length"}
    config = AutoConfig.from_pretrained(str(resolve_hf_folder(ref)), num_labels=n, **opts)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.problem_type = "single_label_classification"
    head = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if head:
        config.architectures = [head]
    out = config.to_diff_dict()  # what save_pretrained writes
    out["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in out:  # an older transformers' spelling: keep the two in agreement
        out["torch_dtype"] = out["dtype"]
    return out


def _tokenizer_files(spec: Mapping[str, Any]) -> dict[str, bytes]:
    """The base model's tokenizer files, with ``model_max_length`` set to the length the member was trained with."""
    _, ref = check_arch(spec["arch"])
    folder = resolve_hf_folder(ref)
    max_length = (spec.get("kwargs") or {}).get("max_length")
    files = {}
    for name in TOKENIZER_FILES:
        f = folder / name
        if not f.is_file():
            continue
        data = f.read_bytes()
        if name == "tokenizer_config.json" and max_length:
            # So pipeline(..., truncation=True) cuts text where papa-merge's training and evaluation did.
            cfg = json.loads(data)
            cfg["model_max_length"] = int(max_length)
            data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        files[name] = data
    return files


def _channel_stats(values: Sequence[float] | None, chans: int, default: Sequence[float]) -> list[float]:
    """Per-channel mean or std for the model's channels (the loaders copy grey to RGB, or average RGB to grey)."""
    if not values:
        return list(default)[:chans] if chans <= len(default) else [float(default[0])] * chans
    vals = [float(v) for v in values]
    if len(vals) == chans:
        return vals
    if len(vals) == 1:
        return vals * chans
    return [sum(vals) / len(vals)] * chans


def timm_config(spec: Mapping[str, Any], classes: Sequence[str] | None = None, *,
                data_spec: Mapping[str, Any] | None = None, model: nn.Module | None = None) -> dict:
    """The ``config.json`` of a ``timm:`` member, in timm's own format (as ``timm.models.push_to_hf_hub`` writes it).

    ``architecture``, ``num_classes``, ``label_names``, ``model_args`` (``in_chans``, and ``img_size`` for
    models built with one) and ``pretrained_cfg`` (``input_size`` = channels and size the member was
    trained at, ``mean``/``std`` of the data's normalisation, ``interpolation`` bilinear and
    ``crop_pct`` 1.0 as papa-merge's loaders resize, ``first_conv``, ``classifier``), so
    ``timm.create_model("local-dir:<folder>" or "hf-hub:<repo>", pretrained=True)`` rebuilds it.

    Args:
        spec: the model spec (``papa_merge.model``).
        classes: class names, indexed by label.
        data_spec: the data spec (``papa_merge.data``), for the normalisation.
        model: the network (default: built from ``spec``, without weights).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    _, name = check_arch(spec["arch"])
    n = int(spec["num_classes"])
    chans = int(spec.get("in_chans") or 3)
    pre = dict((data_spec or {}).get("preprocessing") or {})
    size = spec.get("image_size") or pre.get("image_size")
    if model is None:
        kwargs = dict(spec.get("kwargs") or {})
        model = build_architecture(spec["arch"], num_classes=n, in_chans=chans, image_size=size, pretrained=None,
                       hf_weights=False, **kwargs)
    source = dict(getattr(model, "pretrained_cfg", {}) or {})
    model_args: dict[str, Any] = {k: v for k, v in (spec.get("kwargs") or {}).items()
                                  if not k.endswith("drop_rate") and k != "drop_path_rate"}
    model_args.update(num_classes=n, in_chans=chans)
    if size and timm_takes_img_size(name):
        model_args["img_size"] = int(size)
    input_size = [chans, int(size), int(size)] if size else [chans, *list(source.get("input_size", (3, 224, 224)))[1:]]
    pretrained_cfg = {
        "input_size": input_size,
        "fixed_input_size": bool(source.get("fixed_input_size", False)),
        "interpolation": _INTERPOLATION,
        "crop_pct": _CROP_PCT,
        "crop_mode": "center",
        "mean": _channel_stats(pre.get("mean"), chans, IMAGENET_DEFAULT_MEAN),
        "std": _channel_stats(pre.get("std"), chans, IMAGENET_DEFAULT_STD),
        "num_classes": n,
        "first_conv": source.get("first_conv"),
        "classifier": source.get("classifier"),
        "custom_load": False,
    }
    config: dict[str, Any] = {"architecture": name, "num_classes": n,
                              "num_features": int(getattr(model, "num_features", 0) or 0)}
    pool = getattr(model, "global_pool", None)
    pool_type = getattr(pool, "pool_type", pool)
    if isinstance(pool_type, str) and pool_type:
        config["global_pool"] = pool_type
    if classes is not None and len(classes) == n:
        config["label_names"] = [str(c) for c in classes]
    config["model_args"] = model_args
    config["pretrained_cfg"] = {k: v for k, v in pretrained_cfg.items() if v is not None}
    return config


def small_cnn_config(spec: Mapping[str, Any], classes: Sequence[str] | None = None) -> dict:
    """The ``config.json`` of a ``small_cnn`` folder: what the network is and how to load it.

    ``papa_merge_model`` is the model spec the weights' metadata records (``papa_merge.model``), the
    other fields spell it out. No ``architecture``/``model_type`` key: the folder is neither a timm nor
    a transformers model, and model cards tell libraries apart by those keys.

    Example:
        >>> small_cnn_config({"arch": "small_cnn", "num_classes": 2, "kwargs": {"width": 16}, "in_chans": 1,
        ...                   "image_size": 8}, ["no", "yes"])["num_classes"]
        2
    """
    n = int(spec["num_classes"])
    config: dict[str, Any] = {"library_name": "papa-merge", "arch": str(spec["arch"]), "num_classes": n,
                              "in_chans": spec.get("in_chans"), "image_size": spec.get("image_size"),
                              "kwargs": dict(spec.get("kwargs") or {}), "papa_merge_model": dict(spec),
                              "load_with": "from merge.models import load_member; model, meta = load_member(FOLDER)"}
    if classes is not None and len(classes) == n:
        config["label_names"] = [str(c) for c in classes]
    return config


def library_files(spec: Mapping[str, Any], *, classes: Sequence[str] | None = None,
                  data_spec: Mapping[str, Any] | None = None, model: nn.Module | None = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, bytes]:
    """The files beside ``model.safetensors`` that make a member load with its library (small_cnn: what it is)."""
    family, _ = check_arch(spec["arch"])
    if family == "hf":
        files = {"config.json": _dump(hf_config(spec, classes, dtype=dtype))}
        files.update(_tokenizer_files(spec))
        return files
    if family == "timm":
        return {"config.json": _dump(timm_config(spec, classes, data_spec=data_spec, model=model))}
    return {"config.json": _dump(small_cnn_config(spec, classes))}


def _dump(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_member(state_dict: Mapping[str, torch.Tensor], out: str | os.PathLike, *, spec: Mapping[str, Any],
                 metadata: Mapping[str, str], classes: Sequence[str] | None = None,
                 data_spec: Mapping[str, Any] | None = None, model: nn.Module | None = None,
                 force: bool = False) -> Path:
    """Write a member atomically: one ``.safetensors`` file, or (any other path) a folder its library loads.

    The folder holds ``model.safetensors`` (the same bytes and metadata a file member has) and
    :func:`library_files`; it appears under its final name only when complete.

    Args:
        state_dict: the weights.
        out: ``member.safetensors`` (one file, any model) or ``member-00`` (a folder).
        spec: the model spec (``papa_merge.model``).
        metadata: the safetensors metadata (``papa_merge.*`` entries).
        classes: class names, indexed by label (``id2label`` / ``label_names``).
        data_spec: the data spec, for a timm member's normalisation.
        model: the trained network (spares building one for timm's config).
        force: replace an existing output.

    Returns:
        The path written.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    out = Path(out)
    if out.suffix == SAFETENSORS_SUFFIX:
        return write_state_dict(state_dict, out, metadata=metadata, force=force)
    # Built before anything is written: a missing base folder fails without leaving a temporary folder.
    files = library_files(spec, classes=classes, data_spec=data_spec, model=model, dtype=_float_dtype(state_dict))
    with AtomicOutput(out, folder=True, force=force) as atomic:
        write_state_dict(state_dict, atomic.file(SINGLE_FILE), metadata=metadata)
        for name, data in files.items():
            atomic.file(name).write_bytes(data)
        return atomic.commit()
