"""Benchmark: one merge split over processes (``--jobs N`` local workers, ``torchrun`` ranks) against one process.

Run (alone on the machine, holding the shared lock; about 6 minutes on 2 cores):
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --gb 0.25 --methods linear   # a quick look

Members: a base and 4 members of ``--gb`` GB each (bf16, Llama-shaped tensors; member i = base plus
noise), written to ``--dir`` (default /tmp/papa-bench-distributed) and deleted at the end. Each merge
runs in a fresh process (or a fresh ``torchrun``), inputs warm in the page cache, output a sharded
folder (``--shard-size``, so each process writes whole shards) on /dev/shm. For each method (linear:
uniform over the 4 members; TIES with density 0.5 on the base) and each way of running (1 process;
``jobs`` 2 and 4; torchrun with 2 and 4 ranks), the table shows the wall time of the merge (the
parent's ``soup`` call, or rank 0's), the speed-up over one process, the peak RSS of each process
(``VmHWM``; shared pages of the forkserver that started a worker count in each worker), and whether
the tensor bytes equal the one-process output's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIDDEN, INTER = 2048, 5632
METHODS = {"linear": ["--method", "uniform"], "ties": ["--method", "ties", "--density", "0.5"]}


def _layout(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-like layers (bf16) until ``target_bytes``."""
    per_layer = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                 ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                 ("mlp.gate_proj.weight", (INTER, HIDDEN)), ("mlp.up_proj.weight", (INTER, HIDDEN)),
                 ("mlp.down_proj.weight", (HIDDEN, INTER)), ("input_layernorm.weight", (HIDDEN,))]
    shapes, total, layer = [("model.norm.weight", (HIDDEN,))], HIDDEN * 2, 0
    while total < target_bytes:
        for name, s in per_layer:
            shapes.append((f"model.layers.{layer}.{name}", s))
            n = 1
            for d in s:
                n *= d
            total += 2 * n
        layer += 1
    return shapes


def make_members(folder: Path, gb: float) -> tuple[Path, list[Path]]:
    """The base and 4 members, written by a child process (reused when a previous run left them complete): a
    child's peak RSS starts from its parent's at fork, so this process never holds torch or the tensors."""
    paths = [folder / f"member{i}.safetensors" for i in range(4)]
    stamp = folder / f"complete-{gb}"
    if not stamp.exists():
        subprocess.run([sys.executable, __file__, "--child", "make", "--out", str(folder), "--gb", str(gb)], check=True)
        stamp.touch()
    return folder / "base.safetensors", paths


def child_make(folder: Path, gb: float) -> None:
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = _layout(int(gb * 1e9))
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes}
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for i in range(4):
        sd = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        p = folder / f"member{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
        del sd


def child(args: argparse.Namespace) -> None:
    """One merge in this process (or this rank): prints one JSON line with its time and memory."""
    import warnings

    import merge

    warnings.simplefilter("ignore")
    members = args.members.split(",")
    method = "uniform" if args.child == "linear" else "ties"
    options = {"base": args.base, "params": {"density": 0.5}} if method == "ties" else {}
    t0 = time.perf_counter()
    r = merge.soup(members, out=args.out, method=method, shard_size=args.shard_size, jobs=args.jobs, **options)
    seconds = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", "0"))
    hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    # one file per rank: ranks printing at once would interleave their lines
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "seconds": seconds, "self_rss": hwm,
                                                             "workers": [w.__dict__ for w in r.workers]}))


def tensor_bytes(folder: Path) -> dict[str, str]:
    """sha256 of each shard's tensor bytes (the header, which records the number of processes, left out)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            fh.seek(8 + int.from_bytes(fh.read(8), "little"))
            h = hashlib.sha256()
            while block := fh.read(1 << 24):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


def run_one(method: str, how: str, n: int, base: Path, members: list[Path], out: Path, shard_size: str) -> dict:
    for p in [base, *members]:  # warm: read into the page cache right before
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    shutil.rmtree(out, ignore_errors=True)
    common = ["--child", method, "--members", ",".join(map(str, members)), "--base", str(base), "--out", str(out),
              "--shard-size", shard_size]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               __file__, *common, "--jobs", "1"]
    else:
        cmd = [sys.executable, __file__, *common, "--jobs", str(n)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
    reports = sorted(out.parent.glob(f"{out.name}.rank*.json"))
    lines = [json.loads(p.read_text()) for p in reports]
    for p in reports:
        p.unlink()
    main = next(x for x in lines if x["rank"] == 0)
    if how == "torchrun":
        rss = [x["self_rss"] for x in sorted(lines, key=lambda x: x["rank"])]
    elif main["workers"]:
        rss = [w["peak_rss_bytes"] for w in main["workers"]] + [main["self_rss"]]  # workers, then the parent
    else:
        rss = [main["self_rss"]]
    return {"method": method, "how": how, "n": n, "seconds": main["seconds"], "wall": wall, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of each member (and the base) in GB")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--runs", default="1,jobs2,jobs4,torchrun2,torchrun4")
    ap.add_argument("--dir", default="/tmp/papa-bench-distributed")
    ap.add_argument("--out-dir", default="/dev/shm/papa-bench-distributed")
    ap.add_argument("--shard-size", default="250MB")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--members", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "make":
        child_make(Path(args.out), args.gb)
        return
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(HERE))
    from benchlib import machine

    folder, out_dir = Path(args.dir), Path(args.out_dir)
    try:
        t0 = time.perf_counter()
        base, members = make_members(folder, args.gb)
        made = time.perf_counter() - t0
        print(f"# machine: {machine()}")
        print(f"# command: {' '.join(sys.argv)}")
        print(f"# members: base + 4 x {args.gb} GB bf16 ({sum(p.stat().st_size for p in members) / 1e9:.2f} GB of "
              f"members), made in {made:.0f}s; output: a folder in {args.shard_size} shards on {out_dir}")
        print(f"{'method':<7} {'processes':<12} {'merge s':>8} {'x one':>6} {'same bits':>9}  peak RSS per process (MiB)")
        for method in args.methods.split(","):
            ref_bytes, ref_s = None, None
            for spec in args.runs.split(","):
                how = "one" if spec == "1" else spec.rstrip("0123456789")
                n = 1 if spec == "1" else int(spec[len(how):])
                out = out_dir / f"{method}-{spec}"
                r = run_one(method, how, n, base, members, out, args.shard_size)
                got = tensor_bytes(out)
                if ref_bytes is None:
                    ref_bytes, ref_s = got, r["seconds"]
                same = "yes" if got == ref_bytes else "NO"
                label = "1" if how == "one" else f"{how} {n}"
                rss = ", ".join(f"{x / 2**20:.0f}" for x in r["rss"])
                print(f"{method:<7} {label:<12} {r['seconds']:>8.1f} {ref_s / r['seconds']:>6.2f} {same:>9}  {rss}",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
