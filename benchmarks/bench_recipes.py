"""Benchmark: the mergekit recipe corpus (tests/recipes/*.yml) through papa-merge and mergekit 0.1.5.

Run (from the repository root)::

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_recipes.py --install-mergekit   # side by side
    .venv/bin/python benchmarks/bench_recipes.py --recipes slerp_lazymergekit,two_stage       # a few
    .venv/bin/python benchmarks/bench_recipes.py --no-mergekit                                # papa-merge only
    .venv/bin/python benchmarks/bench_recipes.py --hidden 768 --recipes lora,ties_gradient --append  # larger

Each recipe runs on tiny Llama-, Mistral- or Qwen2-shaped models (its ``# arch:`` line) that this script
builds with transformers: a base and three fine-tunes of it (the base plus seeded noise), 8 layers, hidden size
``--hidden``, float32. ``papa-merge run recipe.yml -o out/`` and ``mergekit-yaml recipe.yml out/`` (a
multi-document recipe: ``mergekit-multi``) run in child processes; for each the wall time and the peak RSS
(``wait4``) are reported, and the outputs are compared tensor by tensor: the max |papa - mergekit|, and for
the random methods (DARE), whose draws cannot match, the fraction of elements equal to the base and the mean
|output - base| of each. mergekit comes from its own virtualenv (``--mergekit-venv``; ``--install-mergekit``
creates it with ``pip install mergekit==0.1.5``): it pins its own torch and transformers.

Recipes marked ``# expect: refused FIELD`` are run through papa-merge only, which must refuse them by name.
The table goes to stdout and to benchmarks/results/bench_recipes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import safetensors_tensors  # benchmarks/ is the script's folder, first on the path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = ROOT / "tests" / "recipes"
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
PLACEHOLDERS = {"BASE": "base", "MODEL_A": "m0", "MODEL_B": "m1", "MODEL_C": "m2", "ADAPTER_A": "adapter"}


def header(text: str, key: str) -> str | None:
    m = re.search(rf"^# {key}: (.+)$", text, re.M)
    return m.group(1).strip() if m else None


def substitute(text: str, models: dict[str, str]) -> str:
    """The recipe with its placeholders replaced by the model folders (longest first: MODEL_A before BASE)."""
    for key in sorted(PLACEHOLDERS, key=len, reverse=True):
        text = re.sub(rf"\b{key}\b", models[PLACEHOLDERS[key]], text)
    return text


def build(root: Path, hidden: int, archs: list[str] | None = None) -> None:
    """Child: the model families under ``root/<arch>/`` (``archs``: those the chosen recipes use; default all three)."""
    sys.path.insert(0, str(ROOT))
    from tests.mergekit_models import ARCHS, family

    for arch in archs or ARCHS:
        if not (root / arch / f"{arch}-m2" / "model.safetensors").exists():
            family(root / arch, arch, n=3, layers=8, hidden=hidden)
        if not (root / arch / f"{arch}-adapter" / "adapter_config.json").exists():  # a PEFT LoRA of m0 (ADAPTER_A)
            from tests.test_lora import write_adapter

            write_adapter(root / arch / f"{arch}-adapter", root / arch / f"{arch}-m0")
        if not (root / arch / f"{arch}-m2" / "tokenizer.json").exists():  # tiny tokenizers that differ
            from tests.test_vocab import add_tokenizers

            add_tokenizers({v: root / arch / f"{arch}-{v}" for v in ("base", "m0", "m1", "m2")})


def token_order(a: Path, b: Path) -> list[int] | None:
    """Where each token of ``a``'s tokenizer is in ``b``'s (``None``: same ids, or no tokenizers): mergekit's union
    gives new tokens ids in a hash map's order, which changes from run to run."""
    if not ((a / "tokenizer.json").exists() and (b / "tokenizer.json").exists()):
        return None
    from transformers import AutoTokenizer

    va, vb = (AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in (a, b))
    if va == vb or va.keys() != vb.keys():
        return None
    return [vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])]


def compare(a: Path, b: Path, base: Path) -> dict:
    """Child: max |a - b| over the tensors of both, the names only one has, statistics against the base; the rows
    of vocabulary tensors matched by token when the two tokenizers number the same tokens differently."""
    import torch

    sys.path.insert(0, str(ROOT))
    from merge.vocab import VOCAB_SUFFIXES

    bt = dict(safetensors_tensors(base))
    bb = dict(safetensors_tensors(b))
    order = token_order(a, b)
    if order is not None:
        for k in [k for k in bb if k.endswith(VOCAB_SUFFIXES)]:
            bb[k] = torch.cat([bb[k][order], bb[k][len(order):]])
    worst, n, total = 0.0, 0, 0
    stats = {"a_same": 0, "b_same": 0, "a_abs": 0.0, "b_abs": 0.0, "cmp": 0}
    only_a = []
    for k, x in safetensors_tensors(a):
        if k not in bb:
            only_a.append(k)
            continue
        y = bb.pop(k)
        if not x.is_floating_point():
            continue
        xf, yf = x.double(), y.double()
        worst = max(worst, float((xf - yf).abs().max()))
        n += int(((xf - yf).abs() > 0).sum())
        total += x.numel()
        z = bt.get(k)
        if z is not None and z.shape == x.shape:
            z = z.double()
            stats["a_same"] += int((xf == z).sum())
            stats["b_same"] += int((yf == z).sum())
            stats["a_abs"] += float((xf - z).abs().sum())
            stats["b_abs"] += float((yf - z).abs().sum())
            stats["cmp"] += x.numel()
    c = max(stats["cmp"], 1)
    return {"max_diff": worst, "differ": n / max(total, 1), "only_papa": only_a[:3], "only_mergekit": list(bb)[:3],
            "a_same": stats["a_same"] / c, "b_same": stats["b_same"] / c, "a_abs": stats["a_abs"] / c,
            "b_abs": stats["b_abs"] / c}


def child(args: list[str]) -> dict:
    """A measured child process (its own peak RSS): this process stays small."""
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}


def measured(cmd: list[str], out: Path | None = None) -> dict:
    """``cmd`` in a fresh child whose peak RSS is its own (``wait4`` on a grandchild spawned from a small parent)."""
    return child(["measure", json.dumps({"cmd": cmd, "out": str(out) if out else None})])


def measure(spec: dict) -> dict:
    cmd, out = spec["cmd"], spec["out"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    ok = rc == 0
    if not ok and out and any(Path(out).rglob("*.safetensors")) and "tokenizer" in text.lower():
        ok = True  # mergekit ends by building a tokenizer; these models have none, after writing the weights
    return {"wall": wall, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "ok": ok, "rc": rc, "text": text[-1500:]}


def papa_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "run", str(cfg), "-o", str(out), "--force", "--no-progress"]


def mergekit_cmd(venv: Path, cfg: Path, out: Path, multi: bool) -> list[str]:
    # model+lora: mergekit writes each adapted model in full to this cache first (counted in its time)
    lora = ["--lora-merge-cache", str(out.parent / (out.name + "-lora-cache"))]
    if multi:
        return [str(venv / "bin" / "mergekit-multi"), str(cfg), "--out-path", str(out), "--intermediate-dir",
                str(out.parent / (out.name + "-intermediate")), "--no-lazy", "--random-seed", "0", "--quiet", *lora]
    return [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0", "--quiet", *lora]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny models")
    ap.add_argument("--work", default=str(HERE / "out" / "recipes"))
    ap.add_argument("--mergekit-venv", default=str(HERE / "out" / "mergekit-venv"))
    ap.add_argument("--install-mergekit", action="store_true", help="create --mergekit-venv: pip install mergekit==0.1.5")
    ap.add_argument("--no-mergekit", action="store_true", help="papa-merge only")
    ap.add_argument("--results", default=str(HERE / "results" / "bench_recipes.md"))
    ap.add_argument("--append", action="store_true",
                    help="add the table to --results as a dated section (default: replace the file)")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            build(Path(rest[0]), int(rest[1]), rest[2].split(",") if len(rest) > 2 else None)
            print("{}")
        elif kind == "compare":
            print(json.dumps(compare(Path(rest[0]), Path(rest[1]), Path(rest[2]))))
        elif kind == "measure":
            print(json.dumps(measure(json.loads(rest[0]))))
        return

    venv = Path(args.mergekit_venv)
    if args.install_mergekit and not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit==0.1.5"], check=True)
    with_mk = not args.no_mergekit and (venv / "bin" / "mergekit-yaml").exists()
    work = Path(args.work)
    models_root = work / f"models-h{args.hidden}"
    wanted = [r for r in args.recipes.split(",") if r]
    files = sorted(p for p in RECIPES.glob("*.yml") if not wanted or p.stem in wanted)
    archs = sorted({header(p.read_text(), "arch") or "llama" for p in files})  # larger --hidden: build only these
    t0 = time.perf_counter()
    child(["build", str(models_root), str(args.hidden), ",".join(archs)])
    build_s = time.perf_counter() - t0

    lines = [f"# bench_recipes: {len(files)} recipes of tests/recipes/, papa-merge vs mergekit",
             f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}",
             f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; models: 8 layers, "
             f"hidden {args.hidden}, float32 (built in {build_s:.1f}s)"]
    if with_mk:
        ver = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('mergekit'), m.version('torch'))"], capture_output=True, text=True)
        lines.append(f"# mergekit {ver.stdout.split()[0]} (torch {ver.stdout.split()[1]}) from {venv}")
    else:
        lines.append("# mergekit: not run (--no-mergekit, or not installed: pass --install-mergekit)")
    lines += ["", "| recipe | arch | method | papa-merge s | papa-merge peak RSS GB | mergekit s | mergekit peak RSS GB "
              "| max abs diff | note |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        print(line, flush=True)
    rows = []
    for path in files:
        text = path.read_text()
        arch = header(text, "arch") or "llama"
        refused = header(text, "expect")
        folder = models_root / arch
        models = {v: str(folder / f"{arch}-{v}") for v in PLACEHOLDERS.values()}
        cfg = work / "cfg" / path.name
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(substitute(text, models))
        method = re.findall(r"^merge_method: (\S+)", text, re.M)[-1]
        multi = "\n---" in text
        out_p = work / "papa" / path.stem
        out_m = work / "mergekit" / path.stem
        for o in (out_p, out_m, out_m.parent / (out_m.name + "-intermediate"), out_m.parent / (out_m.name + "-lora-cache")):
            shutil.rmtree(o, ignore_errors=True)
        p = measured(papa_cmd(cfg, out_p))
        if refused:
            said = p["text"].strip().splitlines()[-1] if p["text"].strip() else ""
            verdict = "refused" if p["rc"] == 2 and refused.split()[-1] in said else f"NOT REFUSED (rc {p['rc']})"
            row = f"| {path.stem} | {arch} | {method} | {p['wall']:.2f} | {p['rss_gb']:.2f} | - | - | - | " \
                  f"{verdict}: {said[:110]} |"
            rows.append(row)
            print(row, flush=True)
            continue
        if not p["ok"]:
            row = f"| {path.stem} | {arch} | {method} | FAILED | | | | | {p['text'].strip().splitlines()[-1][:140]} |"
            rows.append(row)
            print(row, flush=True)
            continue
        mk_cells, diff, note = "- | -", "-", ""
        if with_mk:
            m = measured(mergekit_cmd(venv, cfg, out_m, multi), out_m)
            if m["ok"]:
                mk_cells = f"{m['wall']:.2f} | {m['rss_gb']:.2f}"
                c = child(["compare", str(out_p), str(out_m), models["base"]])
                diff = f"{c['max_diff']:.3g}"
                if c["max_diff"] > 1e-5 and method not in RANDOM:
                    note = f"{c['differ']:.2e} of elements differ"
                if method in RANDOM:
                    note = (f"random: equal to base {c['a_same']:.3f} / {c['b_same']:.3f}, mean abs change "
                            f"{c['a_abs']:.4f} / {c['b_abs']:.4f} (papa / mergekit)")
                if c["only_papa"] or c["only_mergekit"]:
                    note += f" names only in papa: {c['only_papa']}, only in mergekit: {c['only_mergekit']}"
                speed = m["wall"] / p["wall"] if p["wall"] else float("nan")
                note = (note + f" speed-up x{speed:.1f}").strip()
            else:
                mk_cells = "failed | -"
                note = m["text"].strip().splitlines()[-1][:140] if m["text"].strip() else f"rc {m['rc']}"
        layers = header(text, "layers")
        if layers and (out_p / "config.json").exists():
            got = json.loads((out_p / "config.json").read_text()).get("num_hidden_layers")
            note += f" layers {got}" + ("" if str(got) == layers else f" (expected {layers})")
        row = f"| {path.stem} | {arch} | {method} | {p['wall']:.2f} | {p['rss_gb']:.2f} | {mk_cells} | {diff} | " \
              f"{note.strip()} |"
        rows.append(row)
        print(row, flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    if args.append and Path(args.results).exists():
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(args.results, "a") as f:
            f.write("\n".join(["", f"## {stamp}: {', '.join(p.stem for p in files)} at hidden {args.hidden}", "",
                               *lines, *rows]) + "\n")
    else:
        Path(args.results).write_text("\n".join(lines + rows) + "\n")


if __name__ == "__main__":
    main()
