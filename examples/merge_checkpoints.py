"""Average checkpoints from Python: a uniform soup, a weighted soup, and what the output records.

Run:
    .venv/bin/python examples/merge_checkpoints.py a.safetensors b.safetensors [more ...] [--out DIR]

Any checkpoint papa-merge reads works as a member (safetensors, model folders, .bin/.pt pickles).
"""

import argparse
from pathlib import Path

import merge

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("members", nargs="+")
parser.add_argument("--out", default="soups", help="folder for the two soups")
args = parser.parse_args()
out = Path(args.out)

# 1. Check the members agree and see what the merge will cost before writing anything.
plan = merge.plan_soup(args.members)
print(f"{len(plan.sources)} members, {len(plan.tensors)} tensors, {plan.out_bytes / 1e6:.1f} MB out, "
      f"{plan.buffer_bytes / 1e6:.1f} MB of buffers")

# 2. The uniform soup: the plain average, streamed tensor by tensor.
uniform = merge.uniform_soup(args.members, out=out / "uniform.safetensors", force=True)
print(f"uniform soup -> {uniform.path} in {uniform.seconds:.2f}s")

# 3. A weighted soup that leans on the first member (weights are normalised to sum to one).
weights = [2.0] + [1.0] * (len(args.members) - 1)
weighted = merge.soup(args.members, out=out / "weighted.safetensors", weights=weights, force=True)
print(f"weighted soup {weights} -> {weighted.path}")

# 4. The output records its recipe.
recipe = merge.inspect_checkpoint(weighted.path).metadata["papa_merge.recipe"]
print("recorded:", recipe["method"], recipe["weights"], [m["path"] for m in recipe["members"]])
