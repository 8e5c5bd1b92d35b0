"""Issue 22 part 2: CPU soups of safetensors members run on numpy (merge.backend.arrays) without importing torch.

Every soup here runs twice through the ``papa-merge`` command in a subprocess: as the command picks (the numpy
backend where the inputs and options allow it) and with ``PAPA_MERGE_TORCH_ONLY=1`` (torch, as before). The
outputs must be the same bytes (tensors, header, recipe, card, carried config), the messages the same, and the
first run must end without ``torch`` in ``sys.modules``. The numpy primitives are also checked against torch
directly, on the cases the emulation is built for (a fused multiply-add's double rounding, NaN bit patterns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merge.backend.arrays import NUMPY
from merge.io.writer import write_state_dict

ROOT = Path(__file__).resolve().parents[1]
# The command as the console script runs it, reporting at exit whether torch was imported.
_RUN = ("import atexit, sys\n"
        "atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr))\n"
        "from cli.main import main\n"
        "sys.argv = ['papa-merge', *sys.argv[1:]]\n"
        "main()\n")


def papa(args: list[str], cwd: Path, *, torch_only: bool = False) -> tuple[int, str, str, bool]:
    """``papa-merge ARGS`` in a subprocess: exit code, stdout, stderr (less the report line), torch imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PAPA_MERGE_TORCH_ONLY", None)
    if torch_only:
        env["PAPA_MERGE_TORCH_ONLY"] = "1"
    p = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = p.stderr.splitlines()
    report = [ln for ln in lines if ln.startswith("TORCH_IMPORTED ")]
    assert report, p.stderr
    err = "\n".join(ln for ln in lines if not ln.startswith("TORCH_IMPORTED "))
    return p.returncode, p.stdout, err, report[-1].endswith("True")


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of an output (one file, or a folder's files by name)."""
    if out.is_file():
        return {"file": out.read_bytes()}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def both(args: list[str], out: str, cwd: Path) -> tuple[dict[str, bytes], str, str]:
    """Run the soup on numpy (checking torch stays out) and on torch, into ``np-OUT`` and ``torch-OUT``; the outputs
    must be byte-identical and the messages the same. Returns the files, stdout and stderr of the numpy run."""
    rc, so, se, imported = papa([*args, "-o", f"np-{out}"], cwd)
    assert rc == 0, se
    assert not imported, "the numpy backend imported torch"
    rc_t, so_t, se_t, imported_t = papa([*args, "-o", f"torch-{out}"], cwd, torch_only=True)
    assert rc_t == 0, se_t
    assert imported_t
    a, b = files_of(cwd / f"np-{out}"), files_of(cwd / f"torch-{out}")
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".md"):  # the card names the output it was written to (and hashes its own text)
            a[name], b[name] = (b"\n".join(ln for ln in text.replace(f"{who}-{out}".encode(), b"OUT").split(b"\n")
                                            if not ln.startswith(b"<!-- papa-merge model card, sha256:"))
                                for who, text in (("np", a[name]), ("torch", b[name])))
        assert a[name] == b[name], f"{name} differs between the numpy and the torch backends"
    norm = [s.replace(f"np-{out}", "OUT").replace(f"torch-{out}", "OUT") for s in (so, so_t, se, se_t)]
    strip = [ln.split(" in ")[0] if ln.startswith("wrote ") else ln for ln in norm[0].splitlines()]
    strip_t = [ln.split(" in ")[0] if ln.startswith("wrote ") else ln for ln in norm[1].splitlines()]
    assert strip == strip_t
    assert norm[2] == norm[3]
    return a, so, se


def member(seed: int, dtypes: dict[str, torch.dtype] | None = None, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors of odd sizes (chunk tails: 1_000_003 float32 elements are two 2 MiB chunks and a tail)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"emb.weight": torch.randn(1_000_003, generator=g), "fc.weight": torch.randn(37, 13, generator=g),
          "fc.bias": torch.randn(13, generator=g) * 1e-3, "tiny": torch.randn(1, generator=g) * 1e-40,
          "norm.num_batches_tracked": torch.tensor(100 + seed)}
    for k, dt in (dtypes or {}).items():
        sd[k] = sd[k].to(dt)
    sd.update(extra)
    return sd


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> Path:
    """float32, bfloat16, float16 and mixed-dtype members; a sharded folder; a pickle."""
    d = tmp_path_factory.mktemp("lane")
    for i in range(3):
        write_state_dict(member(i), d / f"f32-{i}.safetensors")
        write_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in member(i).items()},
                         d / f"bf16-{i}.safetensors")
        write_state_dict({k: v.half() if v.is_floating_point() else v for k, v in member(i).items()},
                         d / f"f16-{i}.safetensors")
        write_state_dict(member(i, {"emb.weight": torch.bfloat16, "fc.weight": torch.float16}),
                         d / f"mixed-{i}.safetensors")
        folder = d / f"sharded-{i}"
        folder.mkdir()
        sd = member(i)
        write_state_dict({k: sd[k] for k in ("emb.weight",)}, folder / "model-00001-of-00002.safetensors")
        write_state_dict({k: sd[k] for k in sd if k != "emb.weight"}, folder / "model-00002-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if k == 'emb.weight' else 2}-of-00002.safetensors"
                                                for k in sd}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "torch_dtype": "float32"}))
    torch.save(member(0), d / "f32-0.bin")
    write_state_dict(member(0, {"fc.weight": torch.float64}), d / "f64-0.safetensors")
    write_state_dict(member(1, {"fc.weight": torch.float64}), d / "f64-1.safetensors")
    nan = member(1)
    nan["fc.weight"][3, 4] = float("nan")
    nan["fc.bias"][0] = float("inf")
    write_state_dict(nan, d / "nan-1.safetensors")
    big = member(1)
    big["fc.bias"][1] = 1e6
    write_state_dict(big, d / "big-1.safetensors")
    return d


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("weights", [None, "0.7,0.2,0.1"])
def test_soup_same_bytes_without_torch(members, kind, weights):
    args = ["soup", *(f"{kind}-{i}.safetensors" for i in range(3))] + (["--weights", weights] if weights else [])
    files, out, _ = both(args, f"{kind}-{weights is not None}.safetensors", members)
    assert out.startswith("wrote ")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_casts(members, dtype):
    both(["soup", "f32-0.safetensors", "f32-1.safetensors", "--weights", "0.3,0.7", "--dtype", dtype],
         f"cast-{dtype}.safetensors", members)
    both(["soup", "bf16-0.safetensors", "f16-1.safetensors", "--dtype", dtype, "--on-mismatch", "first"],
         f"first-{dtype}.safetensors", members)


def test_sharded_folders_into_a_sharded_folder(members):
    files, _, _ = both(["soup", "sharded-0", "sharded-1/model.safetensors.index.json", "sharded-2",
                        "--shard-size", "1MB", "--dtype", "bfloat16"], "folder", members)
    assert "model.safetensors.index.json" in files and "config.json" in files and "README.md" in files
    assert json.loads(files["config.json"])["dtype"] == "bfloat16"


def test_dry_run_without_torch(members):
    args = ["soup", "f32-0.safetensors", "bf16-1.safetensors", "--on-mismatch", "skip", "--dry-run",
            "-o", "dry.safetensors"]
    rc, out, err, imported = papa(args, members)
    assert rc == 0 and not imported, err
    rc_t, out_t, err_t, _ = papa(args, members, torch_only=True)
    assert rc_t == 0 and (out, err) == (out_t, err_t)
    assert "peak memory" in out and not (members / "dry.safetensors").exists()


@pytest.mark.parametrize("dry", [False, True])
def test_linear_recipe_runs_without_torch(members, dry):
    """``papa-merge run`` on a mergekit linear recipe takes the same lane (a recipe module imported torch once)."""
    (members / "linear.yml").write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n"
                                        "  - model: f32-0.safetensors\n    parameters: {weight: 0.25}\n"
                                        "  - model: f32-1.safetensors\n    parameters: {weight: 0.75}\n")
    if dry:
        args = ["run", "linear.yml", "--dry-run", "-o", "rdry"]
        rc, out, err, imported = papa(args, members)
        assert rc == 0 and not imported, err
        assert (out, err) == papa(args, members, torch_only=True)[1:3]
        assert not (members / "rdry").exists()
        return
    files, _, _ = both(["run", "linear.yml"], "recipe", members)
    assert any(name.endswith(".safetensors") for name in files)


def test_verify_without_torch(members):
    """``--verify`` reads the published file back and checks every tensor's sha256 without torch; a folder with a
    transformers config also has its keys checked (which builds the model, with torch)."""
    files, out, _ = both(["soup", "bf16-0.safetensors", "bf16-1.safetensors", "--verify"], "verified.safetensors",
                         members)
    assert "verified" in out, out
    rc, out, err, imported = papa(["soup", "sharded-0", "sharded-1", "--verify", "-o", "verified-folder"], members)
    assert rc == 0 and "verified" in out, err


def test_nonfinite_members_warn_and_fail_alike(members):
    _, _, err = both(["soup", "f32-0.safetensors", "nan-1.safetensors"], "nan.safetensors", members)
    assert "holds NaN or infinite values in tensor 'fc.weight'" in err and "'fc.bias'" in err
    for args in (["--strict"], ["--dtype", "float16"]):
        src = "nan-1.safetensors" if args == ["--strict"] else "big-1.safetensors"
        full = ["soup", "f32-0.safetensors", src, *args, "-o", "bad.safetensors"]
        rc, out, err, imported = papa(full, members)
        rc_t, out_t, err_t, _ = papa(full, members, torch_only=True)
        assert rc != 0 and rc == rc_t and not imported
        assert (out, err) == (out_t, err_t) and ("NaN" in err or "largest float16" in err), err
        assert not (members / "bad.safetensors").exists()


@pytest.mark.parametrize("args", [
    ["f32-0.bin", "f32-1.safetensors"],
    ["f64-0.safetensors", "f64-1.safetensors"],
    ["f32-0.safetensors", "f32-1.safetensors", "--accumulate", "float64"],
    ["f32-1.safetensors", "--method", "slerp", "--t", "0.3", "--base", "f32-2.safetensors"],
])
def test_ineligible_soups_run_on_torch(members, args, tmp_path):
    rc, out, err, imported = papa(["soup", *args, "-o", str(tmp_path / "o.safetensors")], members)
    assert rc == 0, err
    assert imported and (tmp_path / "o.safetensors").exists()


def test_cuda_device_falls_back_to_torch(members):
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA merges there")
    args = ["soup", "f32-0.safetensors", "f32-1.safetensors", "--device", "cuda", "-o", "gpu.safetensors"]
    rc, _, err, imported = papa(args, members)
    assert rc != 0 and imported and "CUDA is not available" in err


# ---- the numpy primitives against torch --------------------------------------------------------------------

def _fused_torch(a: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    t = torch.from_numpy(a.copy())
    t.add_(torch.from_numpy(x), alpha=c)
    return t.numpy()


def _fused_numpy(a: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    acc = a.copy()
    NUMPY.add_scaled_(acc, x, c)
    return acc


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool((a.view(np.uint32) == b.view(np.uint32)).all())


@pytest.mark.parametrize("scale", [1.0, 2.0 ** -100, 2.0 ** 100])
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_fused_add_double_rounding_case(scale, signs):
    """a + x*c whose float64 sum lands exactly on a float32 midpoint though the exact sum does not: rounding
    the float64 sum to float32 goes the wrong way; the emulation must not."""
    sa, sx, sc = signs
    a = np.full(37, sa * scale * (1 + 2.0 ** -23), np.float32)   # odd last bit: a tie would round away from a
    x = np.full(37, sx * scale * 2.0 ** -24 * (1 + 2.0 ** -23), np.float32)
    c = sc * float(np.float32(1 - 2.0 ** -23))                   # x*c = 2^-24 - 2^-70 (times the scale)
    f64 = a.astype(np.float64) + x.astype(np.float64) * c
    assert ((f64.view(np.uint64) & 0x1FFFFFFF) == 0x10000000).all()  # the float64 sum is a float32 midpoint
    want = _fused_torch(a, x, c)
    assert not _same_bits(f64.astype(np.float32), want)              # so naive double rounding is wrong here
    assert _same_bits(_fused_numpy(a, x, c), want)


@pytest.mark.parametrize("c", [0.3, 0.25, 1 / 3, 2.0, -0.7, 1e-30])
def test_fused_add_matches_torch(c):
    rng = np.random.default_rng(7)
    n = 100_003
    for a, x in [(rng.standard_normal(n), rng.standard_normal(n)),
                 (rng.standard_normal(n) * 2.0 ** -130, rng.standard_normal(n) * 2.0 ** -128),  # subnormal results
                 (rng.standard_normal(n) * 1e38, rng.standard_normal(n) * 1e38)]:               # overflow
        with np.errstate(over="ignore"):
            a, x = a.astype(np.float32), x.astype(np.float32)
        assert _same_bits(_fused_numpy(a, x, c), _fused_torch(a, x, c))
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 3e38], np.float32)
    a, x = (g.ravel().copy() for g in np.meshgrid(special, special))
    assert _same_bits(_fused_numpy(np.tile(a, 4), np.tile(x, 4), c), _fused_torch(np.tile(a, 4), np.tile(x, 4), c))


def test_conversions_match_torch():
    """float32 -> bfloat16 / float16 on random and edge patterns (NaNs, infinities, subnormals, values that round to
    infinity), and every bfloat16 / float16 pattern back to float32."""
    rng = np.random.default_rng(3)
    edges = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x477FF000, 0x477FEFFF, 0x00000001,
             0x807FFFFF, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000]
    u = np.concatenate([rng.integers(0, 2 ** 32, 1 << 20, dtype=np.uint64).astype(np.uint32),
                        np.arange(0x7F800000, 0x7F800000 + 4096, dtype=np.uint32),                 # NaNs
                        np.arange(0xFFC00000 - 2048, 0xFFC00000 + 2048, dtype=np.uint32),
                        np.array(edges, np.uint32)])
    f = u.view(np.float32)
    for dtype, held in ((torch.bfloat16, np.uint16), (torch.float16, np.float16)):
        want = torch.from_numpy(f).to(dtype).view(torch.int16).numpy().view(np.uint16)
        got = np.empty(f.size, held)
        NUMPY.convert_into(got, f)
        assert (got.view(np.uint16) == want).all(), dtype
    bits = np.arange(1 << 16, dtype=np.uint16)
    for dtype, held in ((torch.bfloat16, bits), (torch.float16, bits.view(np.float16))):
        want = torch.from_numpy(bits.view(np.int16).copy()).view(dtype).float().numpy()
        got = np.empty(bits.size, np.float32)
        NUMPY.convert_into(got, held)
        assert _same_bits(got, want), dtype
