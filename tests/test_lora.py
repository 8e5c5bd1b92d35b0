"""LoRA inputs (base+adapter): the adapter's delta applied per tensor while the merge streams, checked against peft's
merge_and_unload on a tiny Llama; recipes with model+lora; bad adapters refused in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.errors import CheckpointFormatError, CheckpointNotFoundError, MismatchError
from merge.lora import LoraSource, split_reference
from tests.mergekit_models import tiny_base

ROOT = Path(__file__).resolve().parent.parent


def write_adapter(folder: Path, base: Path, *, targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 4,
                  alpha: float = 8, seed: int = 0, scale: float = 0.05, **config: object) -> Path:
    """A PEFT-format LoRA folder for the model folder ``base``, written by hand (no peft): random non-zero A and B."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in load_file(str(base / "model.safetensors")).items():
        if name.endswith(".weight") and any(f".{t}." in name for t in targets):
            stem = "base_model.model." + name[:-len(".weight")]
            tensors[f"{stem}.lora_A.weight"] = scale * torch.randn(r, w.shape[1], generator=g)
            tensors[f"{stem}.lora_B.weight"] = scale * torch.randn(w.shape[0], r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("lora") / "base", "llama", layers=2)


def _peft_adapter(base: Path, folder: Path, *, use_rslora: bool = False, seed: int = 1):
    """An adapter trained by nobody but saved by peft (r=4, alpha=8, q_proj/v_proj, B non-zero), and peft's merged
    model of it."""
    peft = pytest.importorskip("peft")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    lm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lm.save_pretrained(folder)
    return lm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def peft_pair(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    return folder, _peft_adapter(base, folder)


def test_split_reference() -> None:
    assert split_reference("a/+b/") == ("a/", "b/")
    assert split_reference("a/") is None and split_reference("+b") is None


def test_weights_equal_peft_merge_and_unload(base, peft_pair) -> None:
    adapter, merged = peft_pair
    want = merged.state_dict()
    with LoraSource(base, adapter) as src:
        assert len(src.targets) == 4 and all(("q_proj" in t or "v_proj" in t) for t in src.targets)
        for name in src.names:
            torch.testing.assert_close(src.read(name), want[name], rtol=0, atol=1e-6)
        plain = load_file(str(base / "model.safetensors"))
        assert all(not torch.equal(src.read(t), plain[t]) for t in src.targets)  # the delta is not zero


@pytest.mark.parametrize("block", [1 << 15, 40])
def test_chunked_reads_at_odd_offsets_equal_the_whole_tensor(base, peft_pair, monkeypatch, block) -> None:
    adapter, merged = peft_pair
    monkeypatch.setattr("merge.lora._BLOCK_ELEMS", block)  # 40: two rows a block, so reads span several blocks
    with LoraSource(base, adapter) as src:
        name = src.targets[0]
        whole = src.read(name).reshape(-1).view(torch.uint8)
        torch.testing.assert_close(whole.view(torch.float32).reshape(src.infos[name].shape), merged.state_dict()[name],
                                   rtol=0, atol=1e-6)
        for start, n in [(0, 4), (12, 40), (60, 200), (whole.numel() - 36, 36)]:
            buf = torch.empty(n, dtype=torch.uint8)
            src.read_into(name, start, memoryview(buf.numpy()))
            assert torch.equal(buf, whole[start:start + n]), (start, n)


def test_soup_cli_logits_equal_peft(tmp_path, base, peft_pair) -> None:
    import transformers

    adapter, merged = peft_pair
    res = CliRunner().invoke(cli, ["soup", f"{base}+{adapter}", "--method", "uniform", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)


def test_two_members_average_the_adapted_weights(tmp_path, base, peft_pair) -> None:
    adapter, merged = peft_pair
    merge.soup([f"{base}+{adapter}", str(base)], out=tmp_path / "two.safetensors")
    out = load_file(str(tmp_path / "two.safetensors"))
    plain = load_file(str(base / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj.weight"
    want = (merged.state_dict()[name].double() + plain[name].double()) / 2
    torch.testing.assert_close(out[name].double(), want, rtol=0, atol=1e-6)


def test_two_jobs_give_the_same_bytes(tmp_path, base, peft_pair) -> None:
    adapter, _ = peft_pair
    members = [f"{base}+{adapter}", str(base)]
    merge.soup(members, out=tmp_path / "j1.safetensors")
    merge.soup(members, out=tmp_path / "j2.safetensors", jobs=2)  # each worker reopens base+adapter
    one, two = load_file(str(tmp_path / "j1.safetensors")), load_file(str(tmp_path / "j2.safetensors"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_rslora_scaling(tmp_path, base) -> None:
    merged = _peft_adapter(base, tmp_path / "rs", use_rslora=True, seed=2)
    with LoraSource(base, tmp_path / "rs") as src:
        assert src.scaling(src.targets[0]) == pytest.approx(8 / math.sqrt(4))
        for name in src.targets:
            torch.testing.assert_close(src.read(name), merged.state_dict()[name], rtol=0, atol=1e-6)


def test_fan_in_fan_out_transposes_the_delta_float64_reference(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=g)  # stored (in, out), as GPT-2's Conv1D
    save_file({"h.0.c_attn.weight": w}, str(tmp_path / "m.safetensors"))
    a, b = torch.randn(2, 6, generator=g), torch.randn(10, 2, generator=g)
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.h.0.c_attn.lora_A.weight": a, "base_model.model.h.0.c_attn.lora_B.weight": b},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3, "fan_in_fan_out": True}))
    with LoraSource(tmp_path / "m.safetensors", tmp_path / "ad") as src:
        want = w.double() + 1.5 * (b.double() @ a.double()).T
        torch.testing.assert_close(src.read("h.0.c_attn.weight").double(), want, rtol=0, atol=1e-5)


def test_recipe_with_model_plus_lora_runs(tmp_path, base, peft_pair) -> None:
    adapter, merged = peft_pair
    for i, model in enumerate([f"{base}+{adapter}", {"model": str(base), "lora": str(adapter)}]):
        recipe = tmp_path / f"r{i}.yml"
        recipe.write_text(json.dumps({"models": [{"model": model, "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear", "dtype": "float32"}))
        res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / f"out{i}")])
        assert res.exit_code == 0, res.output
        out = load_file(str(tmp_path / f"out{i}" / "model.safetensors"))
        for name, t in merged.state_dict().items():
            torch.testing.assert_close(out[name], t, rtol=0, atol=1e-6)


def test_recipe_reads_a_hub_adapter_and_fetches_it_as_it_runs(tmp_path, base) -> None:
    """``model+org/adapter`` names an adapter on the Hub (tests/test_lora_hub.py fetches them from a local Hub);
    offline and not in the cache, the run stops in one line before writing."""
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"models": [{"model": f"{base}+org/some-lora"}], "merge_method": "linear"}))
    assert merge.load_recipe(recipe).members == [f"{base}+hf://org/some-lora"]
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "hf://org/some-lora: HF_HUB_OFFLINE is set and this adapter is not in the local " \
        "cache" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, error, words", [
    ("no_config", CheckpointNotFoundError, "adapter_config.json"),
    ("missing_target", MismatchError, "lacks"),
    ("shape", MismatchError, "do not fit"),
    ("dora", CheckpointFormatError, "'use_dora' is not supported"),
    ("alpha_pattern", CheckpointFormatError, "'alpha_pattern' is not supported"),
])
def test_bad_adapters_are_refused_in_one_line(tmp_path, base, case, error, words) -> None:
    ad = write_adapter(tmp_path / "ad", base, **({"use_dora": True} if case == "dora" else {}),
                       **({"alpha_pattern": {"q_proj": 4}} if case == "alpha_pattern" else {}))
    if case == "no_config":
        (ad / "adapter_config.json").unlink()
    if case in ("missing_target", "shape"):
        t = load_file(str(ad / "adapter_model.safetensors"))
        key = next(k for k in t if k.endswith("lora_B.weight"))
        if case == "missing_target":
            t = {k.replace("q_proj", "x_proj"): v for k, v in t.items()}
        else:
            t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
        save_file(t, str(ad / "adapter_model.safetensors"))
    with pytest.raises(error, match=words):
        LoraSource(base, ad)
    res = CliRunner().invoke(cli, ["soup", f"{base}+{ad}", "-o", str(tmp_path / "out.safetensors")])
    assert res.exit_code == 1 and words.split()[0].strip("'") in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "out.safetensors").exists()


# VmHWM after clear_refs: the peak over the baseline after the imports, glibc's mmap threshold fixed so that it is
# the live memory's (as tests/test_ops_mergekit_methods.py, LIVE_MEMORY_ENV, says why).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
_RSS = """
import json, sys
import torch
import merge
def status(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field + ":"))
paths, out = json.loads(sys.argv[1]), sys.argv[2]
torch.randn(1000).sum()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
merge.soup(paths, out=out, force=True)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_peak_memory_for_8_lora_members_equals_2_within_20_percent(tmp_path) -> None:
    """8 MB base tensors, one adapter per member on both: a merged copy per member would add 8 MB each."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"l.0.q_proj.weight": torch.randn(1024, 1024, generator=g),
               "l.0.v_proj.weight": torch.randn(1024, 1024, generator=g)}, str(tmp_path / "base" / "model.safetensors"))
    paths = [f"{tmp_path / 'base'}+{write_adapter(tmp_path / f'ad{i}', tmp_path / 'base', seed=i, r=8)}"
             for i in range(8)]
    grown = {}
    for n in (2, 8):
        peaks = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", _RSS, json.dumps(paths[:n]), str(tmp_path / f"o{n}.safetensors")],
                                 capture_output=True, text=True, cwd=ROOT, check=True,
                                 env={**os.environ, **LIVE_MEMORY_ENV})
            rss = json.loads(res.stdout.strip().splitlines()[-1])
            peaks.append(rss["peak"] - rss["before"])
        grown[n] = min(peaks)
    assert grown[8] <= 1.2 * grown[2] + 2048, grown  # kB; 2 MB of slack for allocator noise
