"""Benchmark: the GPU streaming path (``--device cuda``) against the CPU path in the same run, and their agreement.

For a uniform soup and the operators that take a base, on synthetic Llama-like bf16 checkpoints
(``bench_soup``'s layout: member i = base * (1 + i/100); member 0 is the base of the task methods),
each merge runs on the CPU and on the GPU in this process, inputs warm in the page cache before each
run, output to ``--out-dir``. Reported: work time of each (CUDA initialised before the clock), input
GB/s, the floor (read every input once, write one output of the soup's size), and the largest
absolute difference between the two outputs with the share of elements that differ.

Run on a machine with a GPU (figures in benchmarks/results/bench_gpu.md)::

    python benchmarks/bench_gpu.py                       # 1 GB members
    python benchmarks/bench_gpu.py --gb 0.05 --members 2 # a quick look (CPU rows only without CUDA)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import merge  # noqa: E402
from bench_soup import child_floor, make_members, warm  # noqa: E402

# (method, members used, takes member 0 as the base, params)
CASES = [
    ("uniform", 8, False, {}),
    ("task_arithmetic", 4, True, {"lambda": 1.0}),
    ("ties", 4, True, {"density": 0.5}),
    ("dare_ties", 4, True, {"density": 0.5}),
    ("della", 4, True, {"density": 0.6, "epsilon": 0.1}),  # keyed draws on the device too (issue 22 part 3)
    ("slerp", 1, True, {"t": 0.3}),
    ("karcher", 4, False, {}),
    ("multislerp", 4, True, {}),
    ("model_stock", 4, True, {}),
]


def compare(a: Path, b: Path) -> tuple[float, float]:
    """(largest |a - b| in float32, share of elements that differ) over every tensor."""
    worst, differ, total = 0.0, 0, 0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for name in fa.keys():
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
            d = (x - y).abs()
            worst = max(worst, float(d.max())) if d.numel() else worst
            differ += int((d != 0).sum())
            total += d.numel()
    return worst, differ / max(total, 1)


def timed(paths: list[Path], base: Path | None, method: str, params: dict, out: Path, device: str) -> float:
    warm(paths + ([base] if base else []))
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    merge.soup(paths, base=base, method=method, params=params or None, out=out, force=True, device=device, seed=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of each member in GB (bf16)")
    ap.add_argument("--members", type=int, default=8, help="members made (cases use at most this many)")
    ap.add_argument("--methods", default=",".join(c[0] for c in CASES))
    ap.add_argument("--dir", default=str(HERE / "out" / "gpu-members"))
    ap.add_argument("--out-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else str(HERE / "out"))
    ap.add_argument("--results", default=str(HERE / "results" / "bench_gpu.md"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA starts before any clock, as in a long-lived process
    gpu = torch.cuda.get_device_name() if cuda else "none"
    members = make_members(Path(args.dir), args.members + 1, "bf16", args.gb)
    size = members[0].stat().st_size
    out_dir = Path(args.out_dir)
    lines = ["# bench_gpu: the GPU streaming path against the CPU path, same run", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}, torch {torch.__version__}. "
             f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`. Members: bf16, "
             f"{size / 1e9:.2f} GB each, synthetic Llama-like layout; inputs warm in the page cache before every run; "
             f"outputs to {args.out_dir}. Work time in this process (CUDA initialised first); one run each.", "",
             "| method | members (+ base) | input GB | floor s | CPU s | GPU s | GPU / CPU speed-up | GPU input GB/s "
             "| max abs diff GPU vs CPU | elements differing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for method, n, with_base, params in CASES:
        if method not in args.methods.split(","):
            continue
        base = members[0] if with_base else None
        paths = members[1:1 + n] if with_base else members[:n]
        read_gb = (len(paths) + (1 if base else 0)) * size / 1e9
        warm(paths + ([base] if base else []))
        floor = child_floor([str(p) for p in paths + ([base] if base else [])], str(out_dir / "floor.bin"), size)
        (out_dir / "floor.bin").unlink()
        cpu_out, gpu_out = out_dir / f"{method}-cpu.safetensors", out_dir / f"{method}-gpu.safetensors"
        cpu_s = timed(paths, base, method, params, cpu_out, "cpu")
        row = f"| {method} | {len(paths)}{' + 1' if base else ''} | {read_gb:.1f} | {floor:.2f} | {cpu_s:.2f} | "
        if cuda:
            gpu_s = timed(paths, base, method, params, gpu_out, "cuda:0")
            worst, share = compare(cpu_out, gpu_out)
            row += (f"{gpu_s:.2f} | {cpu_s / gpu_s:.1f}x | {read_gb / gpu_s:.2f} | {worst:.3g} | {100 * share:.4f}% |")
            gpu_out.unlink()
        else:
            row += "- | - | - | - | - |"
        cpu_out.unlink()
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
