"""Real members for the evaluation, greedy-soup and BatchNorm tests: small CNNs trained on sklearn digits.

Trained here with a plain torch loop (not merge.train), so the evaluation code is tested against
checkpoints it did not produce. Every member starts from one initialisation and sees its own data
order, so the members are different yet average well (as a soup's members should).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from merge.data import load_dataset
from merge.io.writer import write_state_dict
from merge.models import build_model, model_spec

WIDTH = 8


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny convolutions run ~50x slower with 2 threads on a busy 2-core machine; use one, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def digits_splits():
    return load_dataset("digits", seed=0)


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split as one (x, y) pair, read straight from the dataset (no loader involved)."""
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return xs, ys


_TRAINED: dict[tuple[int, int], tuple[list[Path], dict]] = {}
_CACHE_DIR = Path(tempfile.mkdtemp(prefix="papa-merge-digit-members-"))


def train_digit_members(out: Path, k: int = 3, *, epochs: int = 2, init_seed: int = 0) -> tuple[list[Path], dict]:
    """k small_cnn members on digits (same init, different data order); saved with papa-merge metadata.

    Members are trained once per process and copied into ``out`` (several test modules use the same
    ones; member i depends only on ``init_seed``, ``epochs`` and i, so the first k of a larger set are
    the same as a set of k).
    """
    key = (epochs, init_seed)
    if key not in _TRAINED or len(_TRAINED[key][0]) < k:
        _TRAINED[key] = _train_digit_members(_CACHE_DIR / f"k{k}-e{epochs}-s{init_seed}", k, epochs=epochs,
                                             init_seed=init_seed)
    cached, spec = _TRAINED[key]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in cached[:k]:
        shutil.copyfile(p, out / p.name)
        paths.append(out / p.name)
    return paths, spec


def _train_digit_members(out: Path, k: int, *, epochs: int, init_seed: int) -> tuple[list[Path], dict]:
    splits = digits_splits()
    xs, ys = stack(splits.train)
    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8, width=WIDTH)
    torch.manual_seed(init_seed)
    init = build_model("small_cnn", num_classes=10, in_chans=1, width=WIDTH).state_dict()
    paths = []
    for i in range(k):
        torch.manual_seed(100 + i)
        model = build_model("small_cnn", num_classes=10, in_chans=1, width=WIDTH)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05 * (1 + 0.5 * i), momentum=0.9)
        rng = np.random.default_rng(i)
        model.train()
        for _ in range(epochs):
            perm = torch.from_numpy(rng.permutation(len(xs)))
            for b in range(0, len(xs) - 31, 32):
                idx = perm[b:b + 32]
                loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        meta = {"papa_merge.model": json.dumps(spec), "papa_merge.data": json.dumps(splits.spec),
                "papa_merge.train": json.dumps({"member": i})}
        paths.append(write_state_dict(model.state_dict(), out / f"member-{i}.safetensors", metadata=meta))
    return paths, spec
