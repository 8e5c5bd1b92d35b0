"""Benchmark: streaming soup of synthetic Llama-like checkpoints against this machine's floor and a naive merge.

Run:
    .venv/bin/python benchmarks/bench_soup.py                      # N = 2, 4, 8; fp32 and bf16; ~1 GB members
    .venv/bin/python benchmarks/bench_soup.py --sizes 2 --gb 0.2   # a quick look

For each dtype and member count N it runs, each in a fresh process, with the inputs read into the
page cache right before (warm), and reports wall time of the whole process, time of the work alone
(less interpreter start and imports), peak RSS of the process (``ru_maxrss`` from ``wait4``, the
number ``/usr/bin/time -v`` prints: touched pages of memory-mapped files count), and input GB/s:

- floor:  read every input once into a reused buffer + write one output of the soup's size
          (the least any merge can do);
Each method runs ``--repeat`` times, interleaved with the others; the table shows the best and the
median work time (this machine's page cache and cores are shared, and single runs vary by up to 2x),
the median wall time, and the largest peak RSS.
- papa:   ``merge.soup`` (this project), writing a .safetensors (on numpy, without importing torch, where it can:
          merge.backend.arrays);
- papa-torch: the same with ``PAPA_MERGE_TORCH_ONLY=1``: on torch, as before issue 22 part 2;
- naive:  load every checkpoint fully (``safetensors.torch.load_file``), average in fp32, ``save_file``;
- mergekit's linear merge, when ``mergekit-yaml`` is on PATH.

The output goes to ``--out-dir`` (default /dev/shm, as the floor in shared/reference/perf-facts.md).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def _layout(target_bytes: int, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-shaped tensor names and shapes whose total is about ``target_bytes``."""
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
              ("model.norm.weight", (HIDDEN,))]
    per_layer = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                 ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                 ("mlp.gate_proj.weight", (INTER, HIDDEN)), ("mlp.up_proj.weight", (INTER, HIDDEN)),
                 ("mlp.down_proj.weight", (HIDDEN, INTER)), ("input_layernorm.weight", (HIDDEN,)),
                 ("post_attention_layernorm.weight", (HIDDEN,))]

    def numel(s: tuple[int, ...]) -> int:
        n = 1
        for d in s:
            n *= d
        return n

    total = sum(numel(s) for _, s in shapes) * itemsize
    layer = 0
    while total < target_bytes:
        for name, s in per_layer:
            shapes.append((f"model.layers.{layer}.{name}", s))
            total += numel(s) * itemsize
        layer += 1
    return shapes


def make_members(folder: Path, n: int, dtype_name: str, gb: float) -> list[Path]:
    """Write n members (member i = base * (1 + i/100)); reused when they already exist."""
    paths = [folder / f"member{i}.safetensors" for i in range(n)]
    stamp = folder / f"layout-{gb}.json"
    if not (stamp.exists() and all(p.exists() for p in paths)):
        # In a child process, so that this (measuring) process never holds torch or the tensors:
        # a child's peak RSS starts from its parent's at fork.
        subprocess.run([sys.executable, __file__, "--child", "make", "--child-out", str(folder),
                        "--out-bytes", str(n), "--dtype", dtype_name, "--gb", str(gb)], check=True)
    return paths


def child_make(folder: Path, n: int, dtype_name: str, gb: float) -> None:
    import torch

    from merge.io.writer import write_state_dict

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"member{i}.safetensors" for i in range(n)]
    stamp = folder / f"layout-{gb}.json"
    for p in folder.glob("member*.safetensors"):
        p.unlink()
    layout = _layout(int(gb * 1e9), dtype.itemsize)
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) for name, shape in layout}
    for i, p in enumerate(paths):
        write_state_dict({k: v * (1 + 0.01 * i) for k, v in base.items()}, p)
    stamp.write_text(json.dumps({"n": n, "gb": gb}))


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---- children: each prints one JSON line {"work": seconds} ----

def child_floor(inputs: list[str], out: str, out_bytes: int) -> float:
    t0 = time.perf_counter()
    buf = bytearray(2 << 20)  # cache-sized: larger buffers copy out of the page cache more slowly here
    view = memoryview(buf)
    for p in inputs:
        fd = os.open(p, os.O_RDONLY)
        while os.readv(fd, [view]):
            pass
        os.close(fd)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = out_bytes
    while left:
        left -= os.write(fd, view[: min(left, len(view))])
    os.close(fd)
    return time.perf_counter() - t0


def child_papa(inputs: list[str], out: str, device: str) -> float:
    import merge

    if device != "cpu":  # start CUDA before the clock, as a long-lived process would have
        import torch

        torch.zeros(1, device=device)
    t0 = time.perf_counter()
    merge.soup(inputs, out=out, force=True, device=device)
    return time.perf_counter() - t0


def child_naive(inputs: list[str], out: str) -> float:
    import torch
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    sds = [load_file(p) for p in inputs]
    avg = {}
    for k, v in sds[0].items():
        acc = torch.zeros(v.shape, dtype=torch.float32)
        for sd in sds:
            acc += sd[k].float()
        avg[k] = (acc / len(sds)).to(v.dtype)
    save_file(avg, out)
    return time.perf_counter() - t0


def run_child(kind: str, inputs: list[Path], out: Path, out_bytes: int, device: str = "cpu") -> dict:
    if out.exists():
        out.unlink()
    if kind == "mergekit":
        cfg = out.with_suffix(".yml")
        cfg.write_text("merge_method: linear\ndtype: " + ("bfloat16" if "bf16" in str(inputs[0]) else "float32")
                       + "\nmodels:\n" + "".join(f"  - model: {p.parent}\n    parameters: {{weight: 1.0}}\n"
                                                   for p in inputs))
        cmd = [shutil.which("mergekit-yaml"), str(cfg), str(out.with_suffix("")), "--lazy-unpickle"]
    else:
        child = "papa" if kind == "papa-torch" else kind
        cmd = [sys.executable, __file__, "--child", child, "--out-bytes", str(out_bytes), "--child-out", str(out),
               "--device", device, *map(str, inputs)]
    env = {**os.environ, **({"PAPA_MERGE_TORCH_ONLY": "1"} if kind == "papa-torch" else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{kind} failed:\n{stderr[-2000:]}")
    work = json.loads(stdout.strip().splitlines()[-1])["work"] if kind != "mergekit" else wall
    return {"wall": wall, "work": work, "rss_gb": usage.ru_maxrss * 1024 / 1e9}


def main() -> None:
    table: list[str] = []
    _print = builtins.print

    def print(*a, **k):  # shadows print: every line of the table also goes to benchmarks/results/bench_soup.md
        table.append(" ".join(str(x) for x in a))
        _print(*a, **k)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--gb", type=float, default=1.0, help="size of each member in GB")
    ap.add_argument("--dir", default="benchmarks/out/members", help="where the synthetic members live")
    ap.add_argument("--out-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else "benchmarks/out")
    ap.add_argument("--methods", default="floor,papa,naive,mergekit")
    ap.add_argument("--verbose", action="store_true", help="print every run, not only the medians")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each method (best and median are shown)")
    ap.add_argument("--device", default="cpu", help="papa-merge's --device (cuda:0 to stream to a GPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--out-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "make":
        child_make(Path(args.child_out), args.out_bytes, args.dtype, args.gb)
        return
    if args.child:
        fn = {"floor": lambda: child_floor(args.inputs, args.child_out, args.out_bytes),
              "papa": lambda: child_papa(args.inputs, args.child_out, args.device),
              "naive": lambda: child_naive(args.inputs, args.child_out)}[args.child]
        print(json.dumps({"work": fn()}))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m != "mergekit" or shutil.which("mergekit-yaml")]
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"{os.uname().release}")
    print(f"# command: {' '.join(sys.argv)}")
    if "mergekit" in args.methods and "mergekit" not in methods:
        print("# mergekit: not installed (mergekit-yaml not on PATH), skipped")
    print(f"# inputs warm in page cache before every run; output to {args.out_dir}; papa on {args.device}; "
          f"{args.repeat} interleaved runs each")
    header = (f"{'dtype':5} {'N':>2} {'method':10} {'wall s':>7} {'work best':>9} {'work med':>8} {'peak RSS GB':>11} "
              f"{'in GB/s':>7} {'x floor best':>12} {'x floor med':>11} {'wall/naive':>10} {'wall x floor':>12}")
    print(header)
    print("-" * len(header))
    out_dir = Path(args.out_dir)
    for dtype in args.dtypes.split(","):
        members = make_members(Path(args.dir) / dtype, max(sizes), dtype, args.gb)
        member_bytes = members[0].stat().st_size
        for n in sizes:
            inputs = members[:n]
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every method
                for m in methods:
                    warm(inputs)
                    runs[m].append(run_child(m, inputs, out_dir / f"bench-soup-{m}.safetensors", member_bytes,
                                             args.device))
            med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
            best = {m: min(r["work"] for r in rs) for m, rs in runs.items()}
            if args.verbose:
                for m, rs in runs.items():
                    print(f"#   {dtype} N={n} {m}: work " + ", ".join(f"{r['work']:.2f}" for r in rs), flush=True)
            for m in methods:
                gbs = n * member_bytes / 1e9 / best[m]
                floor_best = best[m] / best["floor"] if "floor" in best else float("nan")
                floor_med = med[m]["work"] / med["floor"]["work"] if "floor" in med else float("nan")
                vs_naive = med[m]["wall"] / med["naive"]["wall"] if "naive" in med else float("nan")
                wall_floor = med[m]["wall"] / med["floor"]["wall"] if "floor" in med else float("nan")
                print(f"{dtype:5} {n:>2} {m:10} {med[m]['wall']:7.2f} {best[m]:9.2f} {med[m]['work']:8.2f} "
                      f"{max(r['rss_gb'] for r in runs[m]):11.2f} {gbs:7.2f} {floor_best:12.2f} {floor_med:11.2f} "
                      f"{vs_naive:10.2f} {wall_floor:12.2f}", flush=True)
            for m in methods:
                p = out_dir / f"bench-soup-{m}.safetensors"
                if p.exists():
                    p.unlink()
    results = Path(__file__).resolve().parent / "results" / "bench_soup.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
