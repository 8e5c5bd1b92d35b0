"""Fuzzing: mutated safetensors headers and small pickles (issue 11, "must show"); mergekit recipes and selection
manifests (issue 25, "must show").

A seeded mutation loop (deterministic; ``PAPA_FUZZ_CASES`` raises the count, ``PAPA_FUZZ_SEED`` moves it)
over valid seed files. Every case is soup'ed, and the outcome must be one of:

- a correct merge: the output opens with ``safetensors.safe_open`` and holds exactly what the input
  holds, as the format's own reader (``safe_open``) or weights-only ``torch.load`` reads it;
- a one-line :class:`merge.MergeError` naming the file;

never another exception, and never an output safetensors cannot open. For safetensors inputs the
verdict must also agree with ``safe_open``: what it refuses, papa-merge refuses; what it accepts,
papa-merge merges, or refuses for one of the documented reasons (dtypes it cannot merge, forms no
writer produces, a file with no tensor to merge).

Recipes (YAML: odd values and tags, alias bombs, deep nesting, bytes that are not UTF-8) are loaded, planned and
run with ``--dry-run``; manifests (odd JSON values, 1e400, 1.5 picks, 100,000 nested lists, cut files) are read
and used as a soup's weights. Each gives a result or a one-line MergeError of bounded length, under an alarm;
a manifest read is never a weight changed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merge
from merge.errors import MergeError

CASES = int(os.environ.get("PAPA_FUZZ_CASES", "150"))
SEED = int(os.environ.get("PAPA_FUZZ_SEED", "11"))
# Valid files papa-merge may still refuse, on purpose (tests/test_io_headers.py, STRICTER), or because
# there is nothing to merge.
DOCUMENTED_REFUSALS = re.compile(r"share no tensor|nothing to merge|papa-merge cannot merge|not an object with dtype|"
                                 r"which is not a safetensors dtype|prefixes are stripped|no tensors found")
TOKENS = ["-1", "1e400", "Infinity", "NaN", "2.0", "-0", "18446744073709551616", "0", "4294967296", "true", "null",
          '"x"', "[]", "{}", '"F16"', '"F4"', '"C64"', '"F8_E8M0"', '"__metadata__"', '"data_offsets"', '"shape"',
          '"\\ud800"', "\\u0041", ",", ":", "[", "]", "{", "}", " ", "\x00", "\xff"]


def _seed_files(folder: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    seeds = {
        "plain": {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
        "dtypes": {"h": torch.randn(5, generator=g).half(), "bf": torch.randn(2, 2, generator=g).bfloat16(),
                   "n": torch.arange(3), "m": torch.tensor([True, False]), "d": torch.randn(2, generator=g).double()},
        "odd": {"empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5), "module.x": torch.ones(2), "\u00e9": torch.ones(1)},
    }
    paths = []
    for name, sd in seeds.items():
        p = folder / f"{name}.safetensors"
        save_file(sd, str(p), metadata={"format": "pt", "note": name})
        paths.append(p)
    return paths


def _mutate_header(blob: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    text, data = bytearray(blob[8:8 + n]), blob[8 + n:]
    # Mostly mutations that keep the JSON well formed, so the format's rules (not the JSON syntax) are what is probed.
    op = rng.choices(range(11), weights=[1, 3, 1, 2, 1, 2, 1, 1, 2, 2, 2])[0]
    if op == 9:  # repeat a whole entry, under the same name or a prefixed one
        entries = list(re.finditer(rb'"([^"\\]*)":(\{"dtype":[^}]*\})', bytes(text)))
        if entries:
            e = rng.choice(entries)
            name = rng.choice([e.group(1), b"module." + e.group(1), b"_orig_mod." + e.group(1), b"__metadata__"])
            entry = b'"' + name + b'":' + e.group(2)
            if rng.random() < 0.5:
                text[1:1] = entry + b","
            else:
                end = bytes(text).rfind(b"}")
                text[end:end] = b"," + entry
    elif op == 10:  # another shape
        shapes = [m.span(1) for m in re.finditer(rb'"shape":(\[[^\]]*\])', bytes(text))]
        if shapes:
            a, b = rng.choice(shapes)
            dims = [rng.choice([0, 1, 2, 3, 4, 5, 6, 12, 2**32, 2**62]) for _ in range(rng.randrange(0, 4))]
            text[a:b] = json.dumps(dims).encode()
    elif op == 0:  # flip a byte of the header
        i = rng.randrange(len(text))
        text[i] = rng.randrange(256)
    elif op == 1:  # replace a number with an odd token
        nums = [m.span() for m in re.finditer(rb"\d+", bytes(text))]
        if nums:
            a, b = rng.choice(nums)
            text[a:b] = rng.choice(TOKENS).encode("utf-8", "surrogatepass")
    elif op == 2:  # insert a token anywhere
        i = rng.randrange(len(text) + 1)
        text[i:i] = rng.choice(TOKENS).encode("utf-8", "surrogatepass")
    elif op == 3:  # duplicate a slice (repeated keys, entries, values)
        a = rng.randrange(len(text))
        b = min(len(text), a + rng.randrange(1, 60))
        text[b:b] = text[a:b]
    elif op == 4:  # delete a slice
        a = rng.randrange(len(text))
        del text[a:a + rng.randrange(1, 20)]
    elif op == 5:  # swap a dtype
        dts = [m.span(1) for m in re.finditer(rb'"dtype":"([A-Z0-9_]+)"', bytes(text))]
        if dts:
            a, b = rng.choice(dts)
            text[a:b] = rng.choice([b"F32", b"F16", b"BF16", b"I64", b"U8", b"BOOL", b"F4", b"C64", b"F8_E8M0", b"X"])
    elif op == 6:  # change the data's length
        data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(rng.randrange(1, 9))
    elif op == 7:  # lie about the header's length
        return struct.pack("<Q", max(0, n + rng.choice([-9, -1, 1, 7, 8, 2**40]))) + bytes(text) + data
    else:  # shift an offset by a few bytes
        offs = [m.span() for m in re.finditer(rb"\d+(?=\])", bytes(text))]
        if offs:
            a, b = rng.choice(offs)
            text[a:b] = str(max(0, int(text[a:b]) + rng.choice([-4, -1, 1, 2, 4]))).encode()
    return struct.pack("<Q", len(text)) + bytes(text) + data


def _safe_open_reads(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal by the format's reader
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values (NaN where NaN; a one-member soup may quiet a NaN's payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


def _soup(path: Path, out: Path) -> dict[str, torch.Tensor] | MergeError:
    """The merge's output read back with safe_open, or the MergeError it raised (anything else fails the test)."""
    try:
        res = merge.soup([path], out=out)
    except MergeError as e:
        assert "\n" not in str(e), f"{path}: a MergeError of more than one line: {e}"
        assert str(path) in str(e) or e.path is not None or "share no tensor" in str(e), str(e)
        assert not out.exists(), "an output appeared although the merge failed"
        return e
    got = _safe_open_reads(res.path)
    assert got is not None, f"{path}: papa-merge wrote {res.path}, which safetensors cannot open"
    return got


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def test_mutated_safetensors_headers(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    seeds = [p.read_bytes() for p in _seed_files(tmp_path)]
    verdicts = {"merged": 0, "refused": 0}
    for i in range(CASES):
        blob = _mutate_header(rng.choice(seeds), rng)
        if rng.random() < 0.3:
            blob = _mutate_header(blob, rng)  # two mutations
        path = tmp_path / f"case{i}.safetensors"
        path.write_bytes(blob)
        reference = _safe_open_reads(path)
        outcome = _soup(path, tmp_path / f"out{i}.safetensors")
        if isinstance(outcome, MergeError):
            verdicts["refused"] += 1
            assert reference is None or DOCUMENTED_REFUSALS.search(str(outcome)), \
                f"case {i}: safe_open reads {path} but papa-merge refused it: {outcome}"
            continue
        verdicts["merged"] += 1
        assert reference is not None, f"case {i}: safe_open refuses {path} but papa-merge merged it"
        expected = {_strip(k): v for k, v in reference.items()}
        assert set(outcome) == set(expected), f"case {i}"
        for k in expected:
            assert _same(outcome[k], expected[k]), f"case {i}: tensor {k!r}"
        path.unlink()
    assert verdicts["merged"] and verdicts["refused"], verdicts  # the loop explored both sides


# --- pickles ----------------------------------------------------------------------------------------------
def _seed_pickles() -> list[bytes]:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3), "h": torch.ones(2).half()}
    out = []
    for kwargs in ({}, {"_use_new_zipfile_serialization": False}):
        buf = io.BytesIO()
        torch.save(sd, buf, **kwargs)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"epoch": 3, "state_dict": {"module.w": sd["w"]}, 7: "x"}, buf, _use_new_zipfile_serialization=False)
    out.append(buf.getvalue())
    return out


def _rezip(blob: bytes, rng: random.Random) -> bytes:
    """A torch.save zip whose data.pkl is mutated, with valid CRCs (so the pickle itself is what is fuzzed)."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = _mutate_bytes(data, rng)
            dst.writestr(info, data)
    return buf.getvalue()


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and i < len(b):
            b[i] = rng.randrange(256)
        elif op == 1:
            b[i:i] = bytes([rng.choice(b"cX\x8c\x93RbK]}q(.")])  # opcodes: GLOBAL, BINUNICODE, REDUCE, ...
        elif op == 2:
            del b[i:i + rng.randrange(1, 8)]
        else:
            b = b[:i]
    return bytes(b)


def _reference_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """What a weights-only torch.load finds as the state dict (top level, or the first wrapper holding tensors)."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(obj, dict):
        return None
    for candidate in [obj] + [obj.get(k) for k in ("state_dict", "model", "model_state_dict", "module", "net",
                                                    "network", "ema", "state_dict_ema", "model_ema", "ema_state_dict")]:
        if isinstance(candidate, dict) and any(isinstance(v, torch.Tensor) for v in candidate.values()):
            return {_strip(k): v for k, v in candidate.items() if isinstance(v, torch.Tensor)}
    return None


def test_mutated_pickles(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    seeds = _seed_pickles()
    verdicts = {"merged": 0, "refused": 0}
    marker = tmp_path / "ran"
    for i in range(max(20, CASES // 2)):
        seed = rng.choice(seeds)
        blob = _rezip(seed, rng) if seed[:2] == b"PK" and rng.random() < 0.7 else _mutate_bytes(seed, rng)
        if rng.random() < 0.1:  # a pickle that would run code if it were ever unpickled unsafely
            blob = pickle.dumps({"w": torch.ones(2), "x": _Touch(marker)}, protocol=rng.choice([2, 4]))
        path = tmp_path / f"case{i}.pt"
        path.write_bytes(blob)
        outcome = _soup(path, tmp_path / f"out{i}.safetensors")
        assert not marker.exists(), f"case {i}: pickled code ran"
        if isinstance(outcome, MergeError):
            verdicts["refused"] += 1
            continue
        verdicts["merged"] += 1
        expected = _reference_tensors(path)
        assert expected is not None and set(outcome) == set(expected), f"case {i}"
        for k in expected:
            assert _same(outcome[k], expected[k].contiguous()), f"case {i}: tensor {k!r}"
    assert verdicts["refused"], verdicts


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.slow
def test_a_longer_fuzz_run(tmp_path: Path) -> None:
    """The same loops, ten times longer (CI's slow run)."""
    global CASES
    saved, CASES = CASES, CASES * 10
    try:
        for name, loop in (("st", test_mutated_safetensors_headers), ("pk", test_mutated_pickles),
                           ("mf", test_mutated_selection_manifests)):
            (tmp_path / name).mkdir()
            loop(tmp_path / name)
        (tmp_path / "rc").mkdir()
        with pytest.MonkeyPatch.context() as mp:
            test_mutated_recipes(tmp_path / "rc", mp)
    finally:
        CASES = saved


# --- recipes (mergekit YAML) and selection manifests (issue 25, "must show") --------------------------------
# The same rule as for headers: any input gives a result or a one-line MergeError of bounded length, in bounded
# time (an alarm fails a case that runs away; no timing is asserted); nothing is written, no YAML tag runs code.
CASE_SECONDS = 30  # a runaway case (a billion-laughs document was minutes) fails instead of hanging the suite
MAX_MESSAGE = 600  # characters of an error (a path of the test's folder, the problem, a bounded preview)
YAML_TOKENS = ["1e400", "-1", "0", "1.5", ".inf", ".nan", "~", "null", "[]", "{}", "9" * 400, "9" * 5000, "'x'",
               "true", "5", "2024-01-01", "!!binary aGk=", "!!set {a, b}", "!!omap [{a: 1}]", "*nowhere",
               '"\\0"', '"\\ud800"', '"a\\u00e9"', "org/name", "org/name+org/lora", "~nouser/x", "a" * 300,
               "{filter: mlp, value: 0.5}", "[{filter: 5, value: 1}]", "[0.1, 0.5]", "{value: [1, 2]}",
               "{model: {path: org/x, revision: [1]}}", "{lora: x}", "{path: 7}", "[a, [b, [c]]]",
               "!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system",
               "'{long}'", "&self [*self]"]


class _Runaway(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Runaway


def _bounded(call, what: str):
    """``call()`` under an alarm: its value, or the MergeError it raised (anything else fails the test)."""
    import signal

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        return call()
    except _Runaway:
        raise AssertionError(f"{what}: ran past {CASE_SECONDS} s") from None
    except MergeError as e:
        assert "\n" not in str(e) and len(str(e)) < MAX_MESSAGE, f"{what}: {str(e)[:2000]!r}"
        return e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _alias_bomb(levels: int) -> str:
    s = "&l0 [" + ", ".join(["lol"] * 9) + "]"
    for k in range(1, levels + 1):
        s = f"&l{k} [{s}" + f", *l{k - 1}" * 8 + "]"
    return s


def _seed_recipes(folder: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    base = {"model.mlp.weight": torch.randn(4, 4, generator=g), "model.norm.weight": torch.ones(4)}
    for name in ("base", "m0", "m1"):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} if name != "base" else base
        save_file(sd, str(folder / f"{name}.safetensors"))
    return [
        "merge_method: linear\nmodels:\n  - model: m0.safetensors\n    parameters:\n      weight: 0.7\n"
        "  - model: m1.safetensors\n    parameters:\n      weight: 0.3\ndtype: float32\n",
        "merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - model: m0.safetensors\n    parameters:\n"
        "      weight: [{filter: mlp, value: 0.7}, {value: 0.4}]\n      density: 0.5\n  - model: m1.safetensors\n"
        "    parameters: {weight: 0.5, density: 0.5}\nparameters:\n  normalize: true\n  lambda: 1.0\n"
        "out_dtype: bfloat16\ntokenizer_source: base\n",
        "merge_method: slerp\nbase_model: base.safetensors\nmodels:\n  - model: base.safetensors\n"
        "  - model: m1.safetensors\nparameters:\n  t: 0.3\n",
        "merge_method: karcher\nmodels:\n  - model: {model: {path: m0.safetensors}}\n  - model: m1.safetensors\n"
        "parameters: {max_iter: 10, tol: 1.0e-5}\n",
        "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n  - model: m0.safetensors\n"
        "    parameters: &p {weight: 1.0}\n  - model: m1.safetensors\n    parameters: *p\n",
    ]


def _mutate_recipe(text: str, rng: random.Random, marker: Path) -> bytes:
    lines = text.splitlines(keepends=True)
    values = [(i, m) for i, line in enumerate(lines) for m in re.finditer(r"(?<=: )[^\s{\[][^\n,}\]]*|(?<=- )\S[^\n]*",
                                                                          line)]
    op = rng.choices(range(9), weights=[5, 2, 2, 1, 1, 1, 2, 1, 1])[0]
    if op <= 2 and values:  # a value replaced: an odd token, an alias bomb, or deep nesting
        i, m = rng.choice(values)
        if op == 0:
            new = rng.choice(YAML_TOKENS).replace("{marker}", str(marker)).replace("{long}", "x" * 5000)
        elif op == 1:
            new = _alias_bomb(rng.choice([1, 2, 4, 6, 8, 9]))
        else:
            n = rng.choice([3, 63, 64, 65, 1000, 10_000])
            new = rng.choice(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "[" * n])
        lines[i] = lines[i][:m.start()] + new + lines[i][m.end():]
    elif op == 3 and values:  # a legitimate alias: one value anchored, another replaced by it
        (i, m), (j, n) = rng.sample(values, 2) if len(values) > 1 else (values[0], values[0])
        if (i, m.start()) != (j, n.start()):
            lines[j] = lines[j][:n.start()] + "*v" + lines[j][n.end():]
            lines[i] = lines[i][:m.start()] + "&v " + lines[i][m.start():]
    elif op == 4:  # a line repeated (duplicate keys, entries)
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif op == 5:  # a line dropped
        del lines[rng.randrange(len(lines))]
    elif op == 6:  # a top-level field added
        lines.append(rng.choice(["slices: []\n", "name: x\n", "extra: 1\n", f"dtype: {_alias_bomb(8)}\n",
                                 "parameters: {weight: 0.5}\n", "chat_template: x\n", "tokenizer_source: union\n",
                                 "<<: {merge_method: linear}\n", "? [a]\n: 1\n", "--- \n", "1: 2\n"]))
    elif op == 7:  # indentation shifted
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(["", " ", "    "]) + lines[i].lstrip()
    data = bytearray("".join(lines).encode("utf-8", "surrogatepass"))
    if op == 8 or rng.random() < 0.05:  # bytes that are not UTF-8, or control characters
        k = rng.randrange(len(data) + 1)
        data[k:k] = rng.choice([b"\xff", b"\xe9", b"\x00", b"\x07", b"\xef\xbb\xbf", b"\t"])
    return bytes(data)


def test_mutated_recipes(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from cli.main import cli
    from merge.mergekit_recipe import Recipe, load_recipe, plan_recipe

    rng = random.Random(SEED + 2)
    seeds = _seed_recipes(tmp_path)
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)  # relative model paths resolve here; Hub references are never fetched
    verdicts = {"loaded": 0, "planned": 0, "refused": 0}
    for i in range(CASES):
        text = rng.choice(seeds)
        blob = _mutate_recipe(text, rng, marker)
        if rng.random() < 0.3:
            blob = _mutate_recipe(blob.decode("utf-8", "replace"), rng, marker)
        path = tmp_path / f"case{i}.yml"
        path.write_bytes(blob)
        recipe = _bounded(lambda path=path: load_recipe(path), f"case {i} ({blob[:200]!r})")
        assert not marker.exists(), f"case {i}: a YAML tag ran code"
        if isinstance(recipe, MergeError):
            verdicts["refused"] += 1
            continue
        assert isinstance(recipe, Recipe), f"case {i}: {recipe!r}"
        verdicts["loaded"] += 1
        if any(str(m).startswith("hf://") for m in [*recipe.members, recipe.base or ""]):
            continue
        plan = _bounded(lambda recipe=recipe: plan_recipe(recipe), f"case {i}: plan")
        verdicts["planned" if not isinstance(plan, MergeError) else "refused"] += 1
        # Through the command as a user runs it: a result or one line, never "this is a bug".
        res = _bounded(lambda path=path: CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "o.safetensors"),
                                                        "--dry-run"]), f"case {i}: run --dry-run")
        assert res.exit_code in (0, 1, 2) and "this is a bug" not in res.output, f"case {i}: {res.output[:2000]}"
        assert res.exit_code == 0 or res.output.count("\n") == 1, f"case {i}: {res.output[:2000]}"
        assert not (tmp_path / "o.safetensors").exists()
    assert verdicts["refused"] and verdicts["planned"], verdicts


def _seed_manifest(folder: Path) -> dict:
    for name in ("m0", "m1", "m2"):
        save_file({"w": torch.full((3,), float(len(name)))}, str(folder / f"{name}.safetensors"))
    from merge.manifest import selection_from_picks, write_manifest

    sel = selection_from_picks([str(folder / f"m{i}.safetensors") for i in range(3)], [1, 0, 1, 2], size=3,
                               scores={"val": {"acc": 0.9, "nll": 0.3, "ece": 0.02}},
                               member_scores=[{"val": {"acc": 0.8, "nll": 0.5, "ece": 0.1}}] * 3,
                               steps=[{"member": str(folder / "m1.safetensors"), "acc": 0.5, "nll": 1.0}],
                               stopped="size", data={"dataset": "digits", "seed": 0})
    return json.loads(write_manifest(sel, folder / "seed.json").read_text())


_JSON_ODD = ["1e400", "-1e400", "NaN", "Infinity", "-1", "0", "1.5", "2.0", "null", "true", '"abc"', '""', "[]", "{}",
             "9" * 5000, '"' + "x" * 100_000 + '"', "[" * 100_000 + "]" * 100_000, '{"path": 1}', '["m0.safetensors"]',
             '"\\ud800"', '"../../../etc/passwd"', '"hf://org/name"']


def _mutate_manifest(doc: dict, rng: random.Random) -> bytes:
    doc = json.loads(json.dumps(doc))
    # Every position in the document, then one of them replaced (or removed) by a raw JSON token.
    spots: list[tuple[object, object]] = []
    stack: list[object] = [doc]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for k in keys:
            spots.append((node, k))
            stack.append(node[k])
    op = rng.choices(range(4), weights=[6, 1, 1, 2])[0]
    if op == 0 and spots:
        node, k = rng.choice(spots)
        node[k] = "@@ODD@@"
        return json.dumps(doc).replace('"@@ODD@@"', rng.choice(_JSON_ODD)).encode("utf-8", "surrogatepass")
    if op == 1 and spots:
        node, k = rng.choice(spots)
        del node[k]
    text = bytearray(json.dumps(doc).encode())
    if op == 2:  # picks and weights out of step: one more pick of a member
        doc["picks"].append(rng.choice(doc["picks"]))
        text = bytearray(json.dumps(doc).encode())
    elif op == 3:  # bytes: one flipped, a slice dropped, or the file cut short
        k = rng.randrange(len(text))
        choice = rng.randrange(3)
        if choice == 0:
            text[k] = rng.randrange(256)
        elif choice == 1:
            del text[k:k + rng.randrange(1, 20)]
        else:
            del text[k:]
    return bytes(text)


def test_mutated_selection_manifests(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.main import cli
    from merge.manifest import Selection, read_manifest

    rng = random.Random(SEED + 3)
    seed = _seed_manifest(tmp_path)
    verdicts = {"read": 0, "refused": 0}
    for i in range(CASES):
        blob = _mutate_manifest(seed, rng)
        path = tmp_path / f"case{i}.json"
        path.write_bytes(blob)
        sel = _bounded(lambda path=path: read_manifest(path), f"case {i} ({blob[:200]!r})")
        if isinstance(sel, MergeError):
            verdicts["refused"] += 1
            continue
        verdicts["read"] += 1
        assert isinstance(sel, Selection)
        # Never a weight changed on the way in: each is exactly the pick count the file gives.
        doc = json.loads(blob)
        assert [float(m["weight"]) for m in doc["members"]] == [float(w) for w in sel.weights], f"case {i}"
        assert all(isinstance(w, int) and w >= 1 for w in sel.weights), f"case {i}"
        if i % 4 == 0:  # and as a soup's weights, through the command
            out = tmp_path / "o.safetensors"
            argv = ["soup", "--weights-from", str(path), "-o", str(out)]
            res = _bounded(lambda argv=argv: CliRunner().invoke(cli, argv), f"case {i}: soup --weights-from")
            assert res.exit_code in (0, 1, 2) and "this is a bug" not in res.output, f"case {i}: {res.output[:2000]}"
            assert res.exit_code == 0 or res.output.count("\n") == 1, f"case {i}: {res.output[:2000]}"
            out.unlink(missing_ok=True)
    assert verdicts["read"] and verdicts["refused"], verdicts
