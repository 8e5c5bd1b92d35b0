"""Members from one shared start vs members from their own initialisations: their soup, and their distance.

Two things are measured on real data, in the same run:

1. The README's workflow (``papa-merge train ... --diversity augment`` then ``papa-merge soup``) with the
   default shared start, against the same recipes with ``--independent-init`` (the baseline, the old
   default): members' val accuracy, their uniform soup's, with and without BatchNorm recomputed.
2. The relative weight distance ``||a - b|| / sqrt((||a||^2 + ||b||^2) / 2)`` of each member to member 0
   (:func:`merge.lineage.relative_distance`), which ``soup`` uses to spot members trained from different
   starts when their metadata does not say: the threshold :data:`merge.lineage.INDEPENDENT_DISTANCE` is
   calibrated on these numbers. Fine-tunes of one pretrained model (EfficientNet-Lite0 on digits, MiniLM
   on BBC News) are measured too (one seed each: they cost minutes on a CPU).

Run from the repository root (about 10 minutes on 2 cores; ``--quick`` skips the fine-tunes):

    python benchmarks/bench_shared_start.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import merge
from merge.evaluate import evaluate_checkpoints, recompute_bn_checkpoint
from merge.io.sources import open_checkpoint
from merge.lineage import INDEPENDENT_DISTANCE, relative_distance
from merge.train import Recipe, default_recipe, train_members
from benchlib import machine

RESULTS = Path(__file__).resolve().parent / "results" / "shared_start.md"


def distances(paths: list[Path]) -> list[float]:
    with open_checkpoint(paths[0]) as ref:
        out = []
        for p in paths[1:]:
            with open_checkpoint(p) as src:
                out.append(relative_distance(ref, src))
    return out


def measure(name: str, regime: str, seed: int, paths: list[Path], soup_dir: Path, *, bn: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the independent regime warns, as it should
        soup = merge.soup(paths, out=soup_dir / f"{regime}-{seed}.safetensors", force=True).path
    rows = evaluate_checkpoints([*paths, soup], split="val", ensemble=False)
    accs = [r.metrics["val"]["acc"] for r in rows[:-1]]
    soup_bn = None
    if bn:
        recompute_bn_checkpoint(soup, num_batches=20)
        soup_bn = evaluate_checkpoints([soup], split="val", ensemble=False)[0].metrics["val"]["acc"]
    return {"task": name, "regime": regime, "seed": seed, "members": accs, "soup": rows[-1].metrics["val"]["acc"],
            "soup_bn": soup_bn, "dist": distances(paths)}


def run(args: argparse.Namespace) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-shared-start-"))
    rows = []
    tasks = [("small_cnn digits", dict(model="small_cnn", data="digits"), 1.0, True),
             ("small_cnn mnist 10k", dict(model="small_cnn", data="mnist", limit=10_000), 1.0, True)]
    for name, kw, epochs, bn in tasks:
        for seed in args.seeds:
            for regime in ("independent init", "shared start"):
                t0 = time.perf_counter()
                folder = out / f"{name.replace(' ', '-')}-{regime.split()[0]}-{seed}"
                paths = train_members(3, out_dir=folder, diversity="augment", seed=seed, split_seed=0,
                                      base=dataclasses.replace(default_recipe("small_cnn"), epochs=epochs),
                                      progress=False, independent_init=regime == "independent init", **kw)
                row = measure(name, regime, seed, list(paths), out, bn=bn)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(fmt(row), flush=True)
    if not args.quick:
        finetunes = [("EfficientNet-Lite0 digits 32px", dict(model={"arch": "timm:tf_efficientnet_lite0", "num_classes": 10,
                                                                  "in_chans": 1, "image_size": 32},
                                                           data="digits", pretrained="efficientnet-lite0-pypi"),
                      Recipe(lr=0.01, weight_decay=1e-4, epochs=1.0, batch_size=32), True),
                     ("EfficientNet-Lite0 digits 32px lr 0.001", dict(model={"arch": "timm:tf_efficientnet_lite0",
                                                                          "num_classes": 10, "in_chans": 1,
                                                                          "image_size": 32},
                                                                   data="digits", pretrained="efficientnet-lite0-pypi"),
                      Recipe(lr=0.001, weight_decay=1e-4, epochs=1.0, batch_size=32), True),
                     ("MiniLM bbc 400", dict(model="hf:all-minilm-l6-v2-pypi", data="bbc", limit=400),
                      dataclasses.replace(default_recipe("hf:x"), epochs=1.0, batch_size=16), False)]
        for name, kw, base, bn in finetunes:
            for regime in ("independent init", "shared start"):
                t0 = time.perf_counter()
                folder = out / f"{name.replace(' ', '-')}-{regime.split()[0]}"
                # seed diversity: data orders differ, and with independent init the new heads do too.
                paths = train_members(2, out_dir=folder, diversity="seed", seed=0, base=base, progress=False,
                                      independent_init=regime == "independent init", **kw)
                row = measure(name, regime, 0, list(paths), out, bn=bn)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(fmt(row), flush=True)
    return rows


def fmt(row: dict) -> str:
    m = row["members"]
    bn = f"{100 * row['soup_bn']:.1f}" if row["soup_bn"] is not None else "-"
    d = ", ".join(f"{x:.3f}" for x in row["dist"])
    return (f"| {row['task']} | {row['regime']} | {row['seed']} | {100 * np.mean(m):.1f} ({100 * min(m):.1f}-"
            f"{100 * max(m):.1f}) | {100 * row['soup']:.1f} | {bn} | {d} | {row['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="small CNNs only (no pretrained fine-tunes)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    header = ["| task | members start from | seed | members val acc % mean (min-max) | uniform soup % | "
              "soup, BN recomputed % | relative distance to member 0 | seconds |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = run(args)
    table = "\n".join(header + [fmt(r) for r in rows])
    shared = [x for r in rows if r["regime"] == "shared start" for x in r["dist"]]
    alone = [x for r in rows if r["regime"] == "independent init" and r["task"].startswith("small_cnn")
             for x in r["dist"]]
    summary = (f"Relative distance, shared start: {min(shared):.3f}-{max(shared):.3f}; independent "
               f"initialisations (small CNN): {min(alone):.3f}-{max(alone):.3f}; threshold "
               f"INDEPENDENT_DISTANCE = {INDEPENDENT_DISTANCE}.")
    command = "python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", ""), *sys.argv[1:]])
    text = (f"# Shared start vs independent initialisations\n\nMachine: {machine()}\n\nCommand: `{command}` "
            f"({time.strftime('%Y-%m-%d')})\n\nVal accuracy; 3 members (2 for the fine-tunes), `--diversity augment` "
            f"(`seed` for the fine-tunes: data order, and the new head's initialisation with independent init), "
            f"1 epoch each; the shared start is a warm start of a quarter epoch (small CNN; its members have had "
            f"that much more training) or the pretrained weights with one seeded head (fine-tunes). BatchNorm is "
            f"recomputed on 20 training batches (MiniLM has none).\n\n{table}\n\n{summary}\n")
    print("\n" + summary)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
