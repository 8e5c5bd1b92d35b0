"""Train diverse members, merge them (uniform and greedy soup, BatchNorm recalibrated), compare on held-out data;
then PAPA.

Run from the repository root (a few minutes on 2 CPU cores; the same as `papa-merge quickstart`):

    python examples/quickstart.py                      # MNIST, 4 members
    python examples/quickstart.py --data digits --members 3 --limit 500 --out runs/qs-digits   # seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import merge
from merge.evaluate import evaluate_checkpoints, format_table, recompute_bn_checkpoint, summarize_members
from merge.greedy import greedy_soup_checkpoints
from merge.train import TrainJob, run_method, train_members

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", default="mnist")
parser.add_argument("--members", type=int, default=4)
parser.add_argument("--limit", type=int, default=20000)
parser.add_argument("--out", default="runs/quickstart-example")
args = parser.parse_args()
out = Path(args.out)

# 1. One shared start, then members that continue from it with their own data order (one basin).
#    (The start is the members' warm start, so it needs none of its own: warm_start=0.)
start = train_members(1, model="small_cnn", data=args.data, out_dir=out / "start", limit=args.limit, progress=False,
                      warm_start=0)[0]
members = train_members(args.members, model="small_cnn", data=args.data, out_dir=out / "members", diversity="order",
                        seed=1, init=start, limit=args.limit, progress=False)

# 2. The uniform soup, with BatchNorm statistics recomputed on 20 training batches.
uniform = merge.soup(members, out=out / "uniform.safetensors", force=True).path
recompute_bn_checkpoint(uniform, num_batches=20)

# 3. The greedy soup: members sorted by val accuracy, each kept only if it strictly improves the soup.
result, greedy = greedy_soup_checkpoints(members, out=out / "greedy.safetensors", recompute_bn=20, force=True)
print(f"greedy soup kept members {result.selected}")

# 4. Members, their prediction ensemble and both soups, on val and test.
rows = evaluate_checkpoints([*members, uniform, greedy])
print(format_table([*summarize_members(rows), *rows]))

# 5. PAPA: members from their own initialisations, each with its own regularisation (diversity="augment"),
#    pulled toward their average every step; then its final model (papa.safetensors, greedy soup, one table).
job = TrainJob(model="small_cnn", data=args.data, out_dir=out / "papa", members=args.members, diversity="augment",
               limit=args.limit, progress=False)
papa = run_method("papa", job, every=1, alpha=0.95)
print(papa.report["table"])
