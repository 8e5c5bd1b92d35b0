"""Benchmark: every merge operator through papa-merge and (optionally) mergekit, on the same YAML recipes.

Run (under the shared CPU lock on the development machines):
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_operators.py                  # papa-merge only
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_operators.py --with-mergekit  # side by side
    .venv/bin/python benchmarks/bench_operators.py --gb 0.05 --methods ties,slerp --with-mergekit  # a quick look

Inputs: synthetic Llama-like checkpoints (a base and ``--members`` fine-tunes of about ``--gb`` GB each,
bf16, Hugging Face folders with a LlamaForCausalLM config.json): member i = base + (0.05 + 0.01 i) *
0.02 N(0, 1) (base ~ 0.02 N(0, 1)), written once under ``--dir`` and removed at the end unless ``--keep``. Every method runs from
one mergekit YAML recipe (``dtype: float32``, ``out_dtype: bfloat16``, so both tools compute in
float32): ``papa-merge run recipe.yml -o out/`` and, with ``--with-mergekit``, ``mergekit-yaml
recipe.yml out/`` from a separate virtualenv (``--mergekit-venv``; created with ``pip install
mergekit`` by ``--install-mergekit``: it pins its own torch and transformers and is never a
dependency of papa-merge). Each run is a fresh process with its inputs read into the page cache
right before; the table shows wall time and peak RSS (``ru_maxrss`` from ``wait4``) of each tool.

Equivalence: for each deterministic method, the largest absolute difference between the two outputs
over all tensors (in float32, of bf16 values) and how many elements differ. For DARE and DELLA the
random draws cannot match (mergekit draws from torch's global generator), so the statistics are
compared instead: the fraction of elements left equal to the base and the mean |output - base|.

Memory in N: the TIES merge is also run with 2 and 8 members (``--memory-sizes``) and its peak RSS
reported for each. The table goes to stdout and to benchmarks/results/bench_operators.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from benchlib import safetensors_tensors  # noqa: E402 - benchmarks/ is on the path from here

DETERMINISTIC = ["linear", "task_arithmetic", "slerp", "multislerp", "karcher", "model_stock", "ties", "breadcrumbs",
                 "breadcrumbs_ties"]
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]
# cheapest for mergekit first, so a time budget cuts the sorting methods last
ALL = DETERMINISTIC[:7] + ["dare_ties"] + DETERMINISTIC[7:] + ["dare_linear", "della", "della_linear"]


def recipe(method: str, base: Path, members: list[Path]) -> str:
    """The YAML both tools run: mergekit's schema, as its users write it."""
    lines = [f"merge_method: {method}", "dtype: float32", "out_dtype: bfloat16"]
    per_member = ""
    if method == "linear":
        per_member = "{weight: 1.0}"
    elif method in ("task_arithmetic",):
        per_member = "{weight: 0.5}"
    elif method in ("ties", "dare_ties", "dare_linear"):
        per_member = "{weight: 0.5, density: 0.5}"
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        per_member = "{weight: 0.5, density: 0.8, gamma: 0.01}"
    elif method in ("della", "della_linear"):
        per_member = "{weight: 0.5, density: 0.5, epsilon: 0.1}"
    elif method == "multislerp":
        per_member = "{weight: 1.0}"
    if method == "slerp":
        members = members[:1]
        lines.append("parameters: {t: 0.3}")
    if method not in ("linear", "karcher"):
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for m in members:
        lines.append(f"  - model: {m}")
        if per_member:
            lines.append(f"    parameters: {per_member}")
    return "\n".join(lines) + "\n"


def make_models(folder: Path, n: int, gb: float) -> tuple[Path, list[Path]]:
    """A base and n members as HF folders (reused when present), written in a child process."""
    stamp = folder / f"layout-{gb}-{n}.json"
    base = folder / "base"
    members = [folder / f"member{i}" for i in range(n)]
    if not stamp.exists():
        subprocess.run([sys.executable, __file__, "--child", "make", "--dir", str(folder), "--gb", str(gb),
                        "--members", str(n)], check=True)
    return base, members


def child_make(folder: Path, n: int, gb: float) -> None:
    import torch

    from bench_soup import HIDDEN, INTER, VOCAB, _layout
    from merge.io.writer import write_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    layout = _layout(int(gb * 1e9), 2)
    layers = 1 + max(int(name.split(".")[2]) for name, _ in layout if name.startswith("model.layers."))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    g = torch.Generator().manual_seed(0)
    base = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in layout}
    for i, name in enumerate(["base"] + [f"member{j}" for j in range(n)]):
        d = folder / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config, indent=1))
        if i == 0:
            sd = base
        else:
            s = 0.05 + 0.01 * (i - 1)  # fine-tune-sized task vectors: 5-10% of the weights' scale
            sd = {k: (v.float() + s * 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                  for k, v in base.items()}
        write_state_dict(sd, d / "model.safetensors")
        del sd
    (folder / f"layout-{gb}-{n}.json").write_text(json.dumps({"n": n, "gb": gb}))


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def run(cmd: list[str], env: dict | None = None, out: Path | None = None, cwd: Path | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = proc.stdout.read() + proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        # mergekit ends by copying the base model's tokenizer; these synthetic models have none, so it fails
        # after writing the merged weights. The weights are what is compared.
        tokenizer_only = "tokenizer" in text.lower() and out is not None and any(out.glob("*.safetensors"))
        if not tokenizer_only:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{text[-3000:]}")
    return {"wall": wall, "rss_gb": usage.ru_maxrss * 1024 / 1e9}


def papa_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "run", str(cfg), "-o", str(out), "--force", "--no-progress"]


def mergekit_cmd(venv: Path, cfg: Path, out: Path) -> list[str]:
    return [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--lazy-unpickle", "--quiet",
            "--random-seed", "0"]


def compare(a: Path, b: Path, base: Path) -> dict:
    """Max |a - b| over all tensors, elements that differ, and each output's statistics against the base."""
    import torch

    bt = dict(safetensors_tensors(base))
    bb = dict(safetensors_tensors(b))
    worst, differ, total = 0.0, 0, 0
    stats = {"a_same": 0, "b_same": 0, "a_abs": 0.0, "b_abs": 0.0}
    for k, x in safetensors_tensors(a):
        y = bb[k]
        if not x.is_floating_point():
            continue
        xf, yf, z = x.float(), y.float(), bt[k].float()
        d = (xf - yf).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += x.numel()
        stats["a_same"] += int((xf == z).sum())
        stats["b_same"] += int((yf == z).sum())
        stats["a_abs"] += float((xf - z).abs().sum(dtype=torch.float64))
        stats["b_abs"] += float((yf - z).abs().sum(dtype=torch.float64))
    return {"max_diff": worst, "differ": differ / max(total, 1), "a_same": stats["a_same"] / total,
            "b_same": stats["b_same"] / total, "a_abs": stats["a_abs"] / total, "b_abs": stats["b_abs"] / total}


def compare_in_child(a: Path, b: Path, base: Path) -> dict:
    """:func:`compare` in a fresh process: this (measuring) process must stay small, because a child's peak
    RSS as ``wait4`` reports it starts from the parent's RSS when it is spawned."""
    res = subprocess.run([sys.executable, __file__, "--child", "compare", "--dir", str(a), "--results", str(b),
                          "--mergekit-venv", str(base)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of each member in GB (bf16)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--with-mergekit", action="store_true", help="run mergekit on the same recipes")
    ap.add_argument("--mergekit-venv", default=str(HERE / "out" / "mergekit-venv"))
    ap.add_argument("--install-mergekit", action="store_true", help="create --mergekit-venv with pip install mergekit")
    ap.add_argument("--memory-sizes", default="2,8", help="member counts for the TIES memory rows ('' to skip)")
    ap.add_argument("--mergekit-budget", type=float, default=25.0,
                    help="minutes of mergekit runs; methods after that run through papa-merge only")
    ap.add_argument("--memory-mergekit", action="store_true", help="run mergekit for the memory rows too")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool and method (medians shown)")
    ap.add_argument("--dir", default=str(HERE / "out" / "operators"))
    ap.add_argument("--keep", action="store_true", help="keep the generated members")
    ap.add_argument("--results", default=str(HERE / "results" / "bench_operators.md"))
    ap.add_argument("--baseline-root", help="another papa-merge tree (e.g. `git archive REV | tar -x -C DIR`): each "
                    "method also runs from it, alternating with this tree, as a row 'METHOD @ baseline'")
    ap.add_argument("--child")
    args = ap.parse_args()
    folder = Path(args.dir)
    if args.child == "make":
        child_make(folder, args.members, args.gb)
        return
    if args.child == "compare":
        print(json.dumps(compare(folder, Path(args.results), Path(args.mergekit_venv))))
        return
    venv = Path(args.mergekit_venv)
    if args.install_mergekit and not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    with_mk = args.with_mergekit and (venv / "bin" / "mergekit-yaml").exists()
    methods = [m for m in args.methods.split(",") if m]
    sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    n_make = max([args.members, *sizes])
    lines = [f"# machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{os.uname().release}",
             f"# command: {' '.join(sys.argv)}",
             f"# members: {args.members} x {args.gb} GB bf16 + a base (Llama-like); dtype float32, out_dtype bfloat16; "
             f"{args.repeat} run(s) each, inputs warm in page cache"]
    if args.with_mergekit and not with_mk:
        lines.append(f"# mergekit: not installed at {venv} (pass --install-mergekit), skipped")
    elif with_mk:
        ver = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m;"
                              "print(m.version('mergekit'), m.version('torch'))"], capture_output=True, text=True)
        lines.append(f"# mergekit {ver.stdout.split()[0]} (torch {ver.stdout.split()[1]}) from {venv}")
    for line in lines:
        print(line, flush=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)

    def save(*parts: list[str]) -> None:  # after every row, so an interrupted run keeps what it measured
        results.write_text("\n".join(lines + [""] + [x for part in parts for x in part]) + "\n")

    base, members = make_models(folder, n_make, args.gb)
    work = folder / "runs"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    mem_rows = []
    if sizes:
        mem_rows = ["| TIES, members | papa-merge s | papa-merge peak RSS GB | mergekit s | mergekit peak RSS GB |",
                    "|---|---|---|---|---|"]
        print("\n".join(mem_rows), flush=True)
        for n in sizes:
            cfg = work / f"ties-{n}.yml"
            cfg.write_text(recipe("ties", base, members[:n]))
            out = work / f"ties-{n}"
            warm([base, *members[:n]])
            p = run(papa_cmd(cfg, out), env)
            shutil.rmtree(out, ignore_errors=True)
            mk = "- | -"
            if with_mk and args.memory_mergekit:
                warm([base, *members[:n]])
                m = run(mergekit_cmd(venv, cfg, out), None, out)
                shutil.rmtree(out, ignore_errors=True)
                mk = f"{m['wall']:.1f} | {m['rss_gb']:.2f}"
            row = f"| {n} | {p['wall']:.1f} | {p['rss_gb']:.2f} | {mk} |"
            mem_rows.append(row)
            print(row, flush=True)
            save(mem_rows)
    header = ("| method | papa-merge s | papa-merge peak RSS GB | mergekit s | mergekit peak RSS GB | speed-up | "
              "max abs diff | elements differing | equal to base (papa / mergekit) | mean abs change (papa / mergekit) |")
    rows = ["", header, "|" + "---|" * 10]
    print(header, flush=True)
    t_start = time.perf_counter()
    for method in methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(recipe(method, base, members[: args.members]))
        res: dict[str, list[dict]] = {"papa": [], "mk": [], "baseline": []}
        use_mk = with_mk and (time.perf_counter() - t_start) / 60 < args.mergekit_budget
        if with_mk and not use_mk:
            print(f"# {method}: mergekit skipped (its {args.mergekit_budget:g}-minute budget is spent)", flush=True)
        for _ in range(args.repeat):
            for tool in (["papa", "mk"] if use_mk else ["papa"]) + (["baseline"] if args.baseline_root else []):
                out = work / f"{method}-{tool}"
                if out.exists():
                    shutil.rmtree(out)
                warm([base, *members[: args.members]])
                cmd = mergekit_cmd(venv, cfg, out) if tool == "mk" else papa_cmd(cfg, out)
                # `python -m` puts the working directory first on sys.path: run each tree from its own root
                root = Path(args.baseline_root) if tool == "baseline" else ROOT
                tool_env = None if tool == "mk" else {**os.environ, "PYTHONPATH": str(root)}
                try:
                    res[tool].append(run(cmd, tool_env, out, cwd=root if tool != "mk" else None))
                except RuntimeError as e:
                    print(f"# {method}: {tool} failed: {str(e)[-500:]}", flush=True)
        if not res["papa"] or (use_mk and not res["mk"]):
            row = f"| {method} | failed (see log) |"
            rows.append(row)
            print(row, flush=True)
            continue
        p = {k: statistics.median(r[k] for r in res["papa"]) for k in ("wall", "rss_gb")}
        if use_mk:
            m = {k: statistics.median(r[k] for r in res["mk"]) for k in ("wall", "rss_gb")}
            c = compare_in_child(work / f"{method}-papa", work / f"{method}-mk", base)
            row = (f"| {method} | {p['wall']:.1f} | {p['rss_gb']:.2f} | {m['wall']:.1f} | {m['rss_gb']:.2f} | "
                   f"{m['wall'] / p['wall']:.1f}x | {c['max_diff']:.3g} | {100 * c['differ']:.4f}% | "
                   f"{100 * c['a_same']:.2f}% / {100 * c['b_same']:.2f}% | {c['a_abs']:.4g} / {c['b_abs']:.4g} |")
        else:
            skipped = "skipped (time budget)" if with_mk else "-"
            row = f"| {method} | {p['wall']:.1f} | {p['rss_gb']:.2f} | {skipped} | - | - | - | - | - | - |"
        rows.append(row)
        print(row, flush=True)
        if res["baseline"]:
            bl = {k: statistics.median(r[k] for r in res["baseline"]) for k in ("wall", "rss_gb")}
            row = f"| {method} @ baseline | {bl['wall']:.1f} | {bl['rss_gb']:.2f} | - | - | - | - | - | - | - |"
            rows.append(row)
            print(row, flush=True)
        save(mem_rows, rows)
        for tool in ("papa", "mk", "baseline"):
            shutil.rmtree(work / f"{method}-{tool}", ignore_errors=True)
    save(mem_rows, rows)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
