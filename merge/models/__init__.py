"""Models by name, their checkpoint metadata, and loaders shaped for them.

Example:
    >>> from merge.models import build_model, model_spec
    >>> spec = model_spec("small_cnn", 10, in_chans=1, image_size=28)
    >>> build_model(spec["arch"], num_classes=10, in_chans=1)(torch.zeros(1, 1, 28, 28)).shape  # doctest: +SKIP
    torch.Size([1, 10])
"""

from merge.models.builders import (
    DATA_KEY,
    HF_FOLDERS,
    METRICS_KEY,
    MODEL_KEY,
    PRETRAINED,
    TRAIN_KEY,
    SmallCNN,
    build_model,
    list_models,
    load_member,
    load_pretrained,
    load_weights,
    model_spec,
    rebuild_model,
    resolve_hf_folder,
)
from merge.models.loaders import AUGMENT_KEYS, augment_images, forward_logits, make_loader, to_device

__all__ = [
    "build_model",
    "model_spec",
    "rebuild_model",
    "load_member",
    "load_weights",
    "load_pretrained",
    "list_models",
    "make_loader",
    "forward_logits",
    "to_device",
    "augment_images",
    "resolve_hf_folder",
    "SmallCNN",
    "MODEL_KEY",
    "DATA_KEY",
    "TRAIN_KEY",
    "METRICS_KEY",
    "PRETRAINED",
    "HF_FOLDERS",
    "AUGMENT_KEYS",
]
