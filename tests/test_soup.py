"""The streaming soup against float64 references, across formats, dtypes, weights and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge
from merge.engine import plan_merge
from merge.io.sources import StateDictSource, open_checkpoint
from merge.ops import OPERATORS, get_operator
from tests.ckpt_factory import accumulation_bound, member_state, reference, save_members, ulp

# The factory's random members share no start: averaging them warns, as it should; no test here checks that.
pytestmark = pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")

EPS32 = 2.0**-24
EPS64 = 2.0**-53


def _check_fp32(out: dict[str, torch.Tensor], sds, weights=None, eps=EPS32) -> None:
    ref = reference(sds, weights)
    for k, r in ref.items():
        got = out[k]
        if not sds[0][k].is_floating_point():
            assert torch.equal(got, sds[0][k]), k
            continue
        err = np.abs(got.double().numpy() - r)
        bound = accumulation_bound(sds, k, weights, eps) + ulp(r, torch.float32) / 2
        assert (err <= bound).all(), f"{k}: max error {err.max()} exceeds float32 rounding bound"


@pytest.mark.parametrize("n", [1, 2, 5])
def test_fp32_soup_matches_float64_reference_within_rounding(tmp_path: Path, n: int) -> None:
    paths, sds = save_members(tmp_path, n)
    res = merge.soup(paths, out=tmp_path / "soup.safetensors")
    out = load_file(str(res.path))
    assert set(out) == set(sds[0])
    _check_fp32(out, sds)
    assert out["classifier.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_within_one_output_ulp(tmp_path: Path, dtype: torch.dtype) -> None:
    paths, sds = save_members(tmp_path, 4, dtype=dtype)
    out = load_file(str(merge.soup(paths, out=tmp_path / "soup.safetensors").path))
    ref = reference(sds)
    for k, r in ref.items():
        if not sds[0][k].is_floating_point():
            continue
        assert out[k].dtype == dtype
        err = np.abs(out[k].double().numpy() - r)
        assert (err <= ulp(r, dtype)).all(), f"{k}: off by more than one {dtype} ulp"


def test_chunked_path_equals_whole_tensor_path(tmp_path: Path) -> None:
    # 4 KiB chunks cut classifier.weight (70k floats) into many pieces and across the pool of buffers.
    paths, sds = save_members(tmp_path, 3, big=True)
    whole = merge.soup(paths, out=tmp_path / "whole.safetensors")
    chunked = merge.soup(paths, out=tmp_path / "chunked.safetensors", chunk_bytes=4096)
    a, b = load_file(str(whole.path)), load_file(str(chunked.path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _check_fp32(b, sds)


def test_float64_accumulation_is_tighter(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 5)
    out = load_file(str(merge.soup(paths, out=tmp_path / "s.safetensors", accumulate="float64").path))
    ref = reference(sds)
    for k, r in ref.items():
        if sds[0][k].is_floating_point():
            # accumulated in float64 then rounded once: within half a float32 ulp (plus float64 error)
            err = np.abs(out[k].double().numpy() - r)
            assert (err <= ulp(r, torch.float32) / 2 + accumulation_bound(sds, k, None, EPS64)).all(), k


def test_weights_are_normalised_and_per_entry(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    res = merge.soup(paths, out=tmp_path / "w.safetensors", weights=[0.5, 0.3, 0.2])
    _check_fp32(load_file(str(res.path)), sds, [0.5, 0.3, 0.2])
    assert res.recipe["method"] == "weighted" and res.recipe["weights"] == [0.5, 0.3, 0.2]
    # the same file listed twice counts twice: [a, a, b] == weights [2, 1]
    dup = merge.soup([paths[0], paths[0], paths[1]], out=tmp_path / "dup.safetensors")
    _check_fp32(load_file(str(dup.path)), [sds[0], sds[0], sds[1]])
    _check_fp32(load_file(str(dup.path)), [sds[0], sds[1]], [2, 1])


def test_properties_identity_unit_weight_and_order(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3, dtype=torch.bfloat16)
    same = load_file(str(merge.soup([paths[1]] * 3, out=tmp_path / "same.safetensors").path))
    assert all(torch.equal(same[k], sds[1][k]) for k in sds[1]), "soup of identical members must return them"
    first = load_file(str(merge.soup(paths[:2], weights=[1, 0], out=tmp_path / "first.safetensors").path))
    assert all(torch.equal(first[k], sds[0][k]) for k in sds[0]), "weights [1, 0] must return the first"
    fwd = load_file(str(merge.soup(paths, out=tmp_path / "fwd.safetensors").path))
    rev = load_file(str(merge.soup(paths[::-1], out=tmp_path / "rev.safetensors").path))
    for k in fwd:
        if fwd[k].is_floating_point():  # order changes fp32 rounding only, far below a bf16 ulp
            r = reference(sds)[k]
            assert (np.abs(rev[k].double().numpy() - fwd[k].double().numpy()) <= ulp(r, torch.bfloat16)).all()
    fp32_paths, fp32 = save_members(tmp_path / "f32", 2)
    ident = load_file(str(merge.soup([fp32_paths[0]] * 3, out=tmp_path / "i64.safetensors",
                                     accumulate="float64").path))
    assert all(torch.equal(ident[k], fp32[0][k]) for k in fp32[0])


def test_integer_and_bool_buffers_are_copied_from_first(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    out = load_file(str(merge.soup(paths[::-1], out=tmp_path / "s.safetensors").path))
    assert out["features.1.num_batches_tracked"].item() == 102  # member paths[2] came first
    assert torch.equal(out["mask"], sds[2]["mask"])


def test_output_dtype_override(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    out = load_file(str(merge.soup(paths, out=tmp_path / "bf.safetensors", dtype="bf16").path))
    ref = reference(sds)
    for k, r in ref.items():
        if sds[0][k].is_floating_point():
            assert out[k].dtype == torch.bfloat16
            assert (np.abs(out[k].double().numpy() - r) <= ulp(r, torch.bfloat16)).all(), k
        else:
            assert out[k].dtype == sds[0][k].dtype


def test_rerun_is_bit_identical(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 3, dtype=torch.bfloat16)
    a = merge.soup(paths, out=tmp_path / "a.safetensors")
    b = merge.soup(paths, out=tmp_path / "b.safetensors")
    assert a.path.read_bytes() == b.path.read_bytes()


def test_recipe_metadata_is_recorded(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    res = merge.soup(paths, out=tmp_path / "s.safetensors", weights=[3, 1], dtype="float16")
    with safe_open(str(res.path), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["papa_merge.recipe"])
    assert meta["format"] == "pt"
    assert recipe["method"] == "weighted" and recipe["weights"] == [3.0, 1.0] and recipe["dtype"] == "float16"
    assert recipe["version"] == merge.__version__ and recipe["accumulate"] == "float32"
    # Members outside the working folder are recorded by name: the recipe travels with the output, and
    # an absolute path would publish the user's folders.
    assert [m["path"] for m in recipe["members"]] == [p.name for p in paths] and str(tmp_path) not in json.dumps(recipe)
    assert recipe["members"][0]["size"] == paths[0].stat().st_size
    import hashlib
    raw = paths[0].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    # The header's hash, named for what it is: the layout (names, dtypes, shapes, metadata), not the weights.
    assert recipe["members"][0]["layout_sha256"] == hashlib.sha256(raw[8:8 + n]).hexdigest()
    assert "header_sha256" not in recipe["members"][0]


def test_sharded_folder_in_and_out(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3, big=True)
    # members 0 and 1 as sharded Hugging Face folders, member 2 as a single file
    for i in range(2):
        folder = tmp_path / f"hf{i}"
        merge.soup([paths[i]], out=folder, shard_size="100kB")
        assert (folder / "model.safetensors.index.json").exists()
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "member": i}))
    members = [tmp_path / "hf0", tmp_path / "hf1", paths[2]]
    out_dir = tmp_path / "soup"
    res = merge.soup(members, out=out_dir, shard_size="120kB")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out_dir / s).exists() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out_dir / "config.json").read_text())["member"] == 0  # carried from member 0
    total = sum(v.numel() * v.element_size() for v in sds[0].values())
    assert index["metadata"]["total_size"] == total
    out = {}
    for s in shards:
        out.update(load_file(str(out_dir / s)))
    assert set(out) == set(sds[0]) and index["weight_map"].keys() == out.keys()
    _check_fp32(out, sds)
    assert res.path == out_dir and not list(tmp_path.glob(".soup.tmp-*"))
    # a folder output small enough for one file is model.safetensors, and reads back through open_checkpoint
    merge.soup(paths, out=tmp_path / "single")
    # + its card, and the record of what papa-merge wrote (what force may replace later)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [".papa-merge.json", "README.md",
                                                                       "model.safetensors"]
    with open_checkpoint(tmp_path / "soup") as src:
        assert src.kind == "sharded" and set(src.infos) == set(sds[0])


def test_pickled_checkpoints_are_read_weights_only(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    # member 1 as a training checkpoint: wrapped, DataParallel-prefixed, torch.compile-prefixed
    torch.save({"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in sds[1].items()}},
               tmp_path / "m1.pt")
    # member 2 as a legacy (pre-zip) pickle
    torch.save(sds[2], tmp_path / "m2.bin", _use_new_zipfile_serialization=False)
    res = merge.soup([paths[0], tmp_path / "m1.pt", tmp_path / "m2.bin"], out=tmp_path / "s.safetensors")
    _check_fp32(load_file(str(res.path)), sds)
    assert res.recipe["members"][1]["format"] == "pytorch" and len(res.recipe["members"][1]["sha256"]) == 64
    # the EMA weights of a timm-style checkpoint are chosen by key
    torch.save({"state_dict": sds[0], "state_dict_ema": sds[1]}, tmp_path / "ema.pth")
    with open_checkpoint(tmp_path / "ema.pth", key="state_dict_ema") as src:
        assert torch.equal(src.read("classifier.weight"), sds[1]["classifier.weight"])


def test_average_in_memory_matches_soup_on_disk(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 3)
    mem = merge.average(sds, weights=[1, 2, 3])
    disk = load_file(str(merge.soup(paths, out=tmp_path / "s.safetensors", weights=[1, 2, 3]).path))
    assert all(torch.equal(mem[k], disk[k]) for k in disk)
    _check_fp32(mem, sds, [1, 2, 3])


def test_working_memory_does_not_grow_with_members(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 8, big=True)
    small = merge.plan_soup(paths[:2])
    large = merge.plan_soup(paths)
    assert small.buffer_bytes == large.buffer_bytes
    assert large.read_bytes == 4 * small.read_bytes - 3 * sum(  # copied tensors are read once
        t.out.nbytes for t in small.tensors if t.action == "copy")


def test_interrupted_run_leaves_nothing_under_the_final_name(tmp_path: Path, monkeypatch) -> None:
    paths, _ = save_members(tmp_path, 3, big=True)
    precious = merge.soup(paths[:1], out=tmp_path / "old.safetensors").path.read_bytes()  # force may replace it
    from merge.io import sources

    calls = {"n": 0}
    real = sources.SafetensorsSource.read_into

    def flaky(self, name, offset, out):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk unplugged")
        return real(self, name, offset, out)

    monkeypatch.setattr(sources.SafetensorsSource, "read_into", flaky)
    for out in ("new.safetensors", "old.safetensors"):
        with pytest.raises(OSError, match="disk unplugged"):
            calls["n"] = 0
            merge.soup(paths, out=tmp_path / out, force=True, chunk_bytes=4096)
    assert not (tmp_path / "new.safetensors").exists()
    assert (tmp_path / "old.safetensors").read_bytes() == precious
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_replaces_only_when_complete(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 2)
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(merge.OutputExistsError, match=r"pass force=True"):
        merge.soup(paths, out=out)
    # force replaces only what papa-merge wrote (issue 11): these bytes are not, so they stay
    with pytest.raises(merge.OutputExistsError, match=r"is a file papa-merge did not write"):
        merge.soup(paths, out=out, force=True)
    assert out.read_bytes() == b"old"
    out.unlink()
    merge.soup(paths[:1], out=out)
    merge.soup(paths, out=out, force=True)
    _check_fp32(load_file(str(out)), sds)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_operator_streams_like_its_reference(tmp_path: Path, name: str) -> None:
    """Generated from the registry: the engine's chunked result equals the operator on whole tensors."""
    op = get_operator(name)
    n = op.max_members or 3
    sds = [member_state(i, big=True) for i in range(n)]
    base_sd = member_state(99, big=True) if op.base == "required" else None
    weights = [0.2, 0.5, 0.3][:n] if any(p.name == "weight" for p in op.params) else None
    takes = {p.name for p in op.params}
    params = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.04}, "sce": {"select_topk": 0.5}}.get(name) \
        or ({"density": 0.6} if "density" in takes else {})
    srcs = [StateDictSource(sd) for sd in sds]
    base = StateDictSource(base_sd) if base_sd is not None else None
    plan = plan_merge(srcs, op, weights=weights, params=params, base=base, accumulate=torch.float64,
                      chunk_bytes=8192, seed=7)
    from merge.engine import MemorySink, run_merge

    sink = MemorySink()
    run_merge(plan, sink)
    for k, v in sds[0].items():
        if v.is_floating_point():
            b = base_sd[k].double() if base_sd is not None else None
            expect = op([sd[k].double() for sd in sds], weights, base=b, seed=7, name=k, **params).float()
            assert torch.equal(sink.tensors[k], expect), k


def test_recipe_records_paths_relative_to_the_working_folder_never_absolute(tmp_path: Path, monkeypatch) -> None:
    """A recipe is published with the output (push): members inside the working folder by relative path."""
    paths, _ = save_members(tmp_path / "ckpts", 2)
    monkeypatch.chdir(tmp_path)
    absolute = [str(p.resolve()) for p in paths]
    res = merge.soup(absolute, out=tmp_path / "out" / "soup.safetensors", base=absolute[0], method="task_arithmetic")
    recipe = json.loads(merge.read_safetensors_metadata(res.path)["papa_merge.recipe"])
    assert [m["path"] for m in recipe["members"]] == ["ckpts/" + p.name for p in paths]
    assert recipe["base"]["path"] == "ckpts/" + paths[0].name
    assert str(tmp_path) not in json.dumps(recipe)
