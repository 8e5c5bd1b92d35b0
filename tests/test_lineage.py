"""merge.lineage and the shared start: members for merging share one, record it, and soups warn otherwise."""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
from merge.errors import InvalidArgumentError, MismatchError
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.keys import TRAIN_KEY
from merge.lineage import (
    INDEPENDENT_DISTANCE,
    DifferentStartsWarning,
    check_starts,
    checkpoint_sha256,
    population_start,
    relative_distance,
    start_of,
    start_record,
    state_dict_sha256,
)


def _member(path, tensors, start_sha=None):
    meta = {TRAIN_KEY: json.dumps({"seed": 0, "start": start_record("warm-start", start_sha)})} if start_sha else None
    save_file(tensors, str(path), metadata=meta)
    return path


def _net(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, 3, generator=g) * scale, "fc.weight": torch.randn(10, 32, generator=g),
            "fc.bias": torch.randn(10, generator=g), "bn.running_var": torch.rand(8, generator=g) + 0.5,
            "bn.num_batches_tracked": torch.tensor(7)}


# --- fingerprints -------------------------------------------------------------------------------------------


def test_state_dict_sha256_is_the_documented_hash_and_sees_every_byte():
    sd = {"b": torch.arange(3, dtype=torch.int64), "a": torch.tensor([[1.5, -2.0]], dtype=torch.float32)}
    # The documented recipe, spelled out independently: per name in sorted order, [name, dtype, shape] as
    # JSON, then the raw little-endian bytes.
    h = hashlib.sha256()
    h.update(b'["a", "float32", [1, 2]]' + np.array([[1.5, -2.0]], dtype="<f4").tobytes())
    h.update(b'["b", "int64", [3]]' + np.arange(3, dtype="<i8").tobytes())
    assert state_dict_sha256(sd) == h.hexdigest()
    assert state_dict_sha256(dict(reversed(list(sd.items())))) == h.hexdigest()  # key order does not matter
    changed = {**sd, "a": torch.tensor([[1.5, -2.0000002]])}
    assert state_dict_sha256(changed) != h.hexdigest()
    assert state_dict_sha256({**sd, "a": sd["a"].double()}) != h.hexdigest()  # dtype is part of it
    assert state_dict_sha256({**sd, "a": sd["a"].reshape(2, 1)}) != h.hexdigest()  # so is the shape


def test_checkpoint_sha256_equals_the_in_memory_hash(tmp_path):
    sd = _net(0)
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"anything": "else"})
    assert checkpoint_sha256(tmp_path / "m.safetensors") == state_dict_sha256(sd)
    torch.save(sd, tmp_path / "m.pt")
    assert checkpoint_sha256(tmp_path / "m.pt") == state_dict_sha256(sd)


@pytest.mark.parametrize("chunk_bytes", [7, 64 << 20])
def test_source_sha256_of_a_numpy_source_equals_the_in_memory_hash(tmp_path, chunk_bytes):
    """A checkpoint opened for the numpy backend (a CPU task merge's base) hashes as its tensors do in memory:
    bfloat16, int64 and empty tensors, read in chunks that split tensors anywhere."""
    from merge.lineage import source_sha256

    sd = {**_net(1), "emb": torch.randn(5, 3).bfloat16(), "empty": torch.zeros(0, 4)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors", numpy=True) as src:
        assert source_sha256(src, chunk_bytes=chunk_bytes) == state_dict_sha256(sd)
    with open_checkpoint(tmp_path / "m.safetensors") as src:
        assert source_sha256(src, chunk_bytes=chunk_bytes) == state_dict_sha256(sd)


def test_start_records_and_population_start():
    rec = start_record("pretrained", "ab" * 32, seed=3)
    assert rec == {"kind": "pretrained", "sha256": "ab" * 32, "seed": 3}
    assert start_of({TRAIN_KEY: json.dumps({"start": rec})}) == rec
    assert start_of({TRAIN_KEY: json.dumps({"seed": 1})}) is None and start_of({}) is None
    assert start_of({TRAIN_KEY: "not json"}) is None
    with pytest.raises(InvalidArgumentError, match="unknown start kind 'random'; choose one of warm-start, "):
        start_record("random", "00")
    a, b = _net(0), _net(1)
    pop = population_start([a, b])
    want = hashlib.sha256((state_dict_sha256(a) + state_dict_sha256(b)).encode()).hexdigest()
    assert pop["kind"] == "population" and pop["sha256"] == want and pop["members"] == 2
    assert population_start([b, a])["sha256"] != want  # member order is part of a population


# --- relative distance ---------------------------------------------------------------------------------------


def test_relative_distance_matches_a_float64_reference(tmp_path):
    a, b = _net(0), _net(1)
    b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    # Only matrices (ndim >= 2) count: conv.weight and fc.weight.
    x = np.concatenate([a[k].double().numpy().ravel() for k in ("conv.weight", "fc.weight")])
    y = np.concatenate([b[k].double().numpy().ravel() for k in ("conv.weight", "fc.weight")])
    want = np.linalg.norm(x - y) / math.sqrt((x @ x + y @ y) / 2)
    with open_checkpoint(tmp_path / "a.safetensors") as sa, open_checkpoint(tmp_path / "b.safetensors") as sb:
        assert relative_distance(sa, sb) == pytest.approx(want, rel=1e-12)
        assert relative_distance(sa, sa) == 0.0
    # Independent random matrices are nearly orthogonal: about sqrt(2), far above the threshold.
    assert 1.3 < want < 1.5 and want > INDEPENDENT_DISTANCE


# --- the check ------------------------------------------------------------------------------------------------


def test_recorded_starts_group_members_and_name_them(tmp_path):
    s1, s2 = "1" * 64, "2" * 64
    a = _member(tmp_path / "a.safetensors", _net(0), s1)
    b = _member(tmp_path / "b.safetensors", _net(1), s1)  # far apart in weights, but the record says one start
    c = _member(tmp_path / "c.safetensors", _net(2), s2)
    same = check_starts([a, b])
    assert same.shared and same.message == "" and same.groups == [[0, 1]] and same.distances == {}
    mixed = check_starts([a, b, c])
    assert not mixed.shared and mixed.groups == [[0, 1], [2]]
    assert mixed.message.startswith("the members come from 2 different starts, so their weight average is likely "
                                    "far worse than each of them")
    assert f"start {s1[:12]}: {a}, {b}; start {s2[:12]}: {c}" in mixed.message


def test_without_records_the_weight_distance_decides(tmp_path):
    base = _net(0)
    tuned = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
    a = _member(tmp_path / "a.safetensors", base)
    b = _member(tmp_path / "b.safetensors", tuned)
    stranger = _member(tmp_path / "c.safetensors", _net(5))
    near = check_starts([a, b])
    assert near.shared and near.distances[1] < 0.1
    far = check_starts([a, b, stranger])
    assert not far.shared and far.groups == [[0, 1], [2]] and far.distances[2] > INDEPENDENT_DISTANCE
    assert (f"no recorded start: {stranger} (relative weight distance {far.distances[2]:.2f} to {a}; independent "
            f"training measures about 1.4, above {INDEPENDENT_DISTANCE:g} counts)") in far.message
    assert far.references == {1: 0, 2: 0} and 0 not in far.distances  # member 0 is the reference
    # Member 0 without a record, among recorded members, is compared with the first recorded one.
    rec = _member(tmp_path / "r.safetensors", _net(7), "3" * 64)
    first = check_starts([stranger, rec, rec])
    assert not first.shared and first.references == {0: 1} and first.groups == [[0], [1, 2]]
    assert f"no recorded start: {stranger} (relative weight distance {first.distances[0]:.2f} to {rec};" in first.message
    assert f"start {'3' * 12}: {rec}, {rec}" in first.message
    kin = _member(tmp_path / "k.safetensors", {k: v + 0.01 for k, v in _net(7).items()})
    assert check_starts([kin, rec]).shared  # close to the recorded member: the same start


def test_soup_warns_naming_the_members_and_still_writes(tmp_path):
    a = _member(tmp_path / "a.safetensors", _net(0), "1" * 64)
    b = _member(tmp_path / "b.safetensors", _net(1), "2" * 64)
    with pytest.warns(DifferentStartsWarning, match=r"2 different starts, .*a\.safetensors.*b\.safetensors") as rec:
        result = merge.soup([a, b], out=tmp_path / "soup.safetensors")
    assert result.path.exists()
    assert rec[0].filename == __file__  # the warning points at the caller's line, not inside papa-merge
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one start: no warning at all
        merge.soup([a, a], out=tmp_path / "same.safetensors")


def test_cli_soup_prints_the_warning_as_one_line(tmp_path):
    from cli.main import cli

    a = _member(tmp_path / "a.safetensors", _net(0), "1" * 64)
    b = _member(tmp_path / "b.safetensors", _net(1), "2" * 64)
    res = CliRunner().invoke(cli, ["soup", str(a), str(b), "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 1 and "2 different starts" in lines[0] and str(a) in lines[0] and str(b) in lines[0]
    assert "warnings.warn" not in res.stderr  # papa-merge's own warnings print without Python's source line


# --- training: members share a start by default ---------------------------------------------------------------


def _starts(paths):
    return [json.loads(read_safetensors_metadata(p)[TRAIN_KEY])["start"] for p in paths]


@pytest.mark.slow
def test_default_members_share_a_warm_start_and_their_soup_works(tmp_path):
    """The README's workflow (members, then their uniform soup) on digits: the soup scores like its members.

    Trained with independent initialisations instead, the same recipe's soup is far worse: the test can fail.
    """
    from merge.evaluate import evaluate_checkpoints
    from merge.train import train_members

    kw = dict(model="small_cnn", data="digits", diversity="augment", progress=False)
    paths = train_members(3, out_dir=tmp_path / "shared", **kw)
    starts = _starts(paths)
    start_file = tmp_path / "shared" / "start" / "member-00.safetensors"
    assert start_file.exists()
    assert {s["sha256"] for s in starts} == {checkpoint_sha256(start_file)}
    assert {s["kind"] for s in starts} == {"warm-start"}
    soup = merge.soup(paths, out=tmp_path / "shared.safetensors").path
    rows = evaluate_checkpoints([*paths, soup], split="val", ensemble=False)
    members = [r.metrics["val"]["acc"] for r in rows[:-1]]
    assert rows[-1].metrics["val"]["acc"] >= np.mean(members) - 0.05, (rows[-1].metrics, members)

    alone = train_members(3, out_dir=tmp_path / "alone", independent_init=True, **kw)
    assert len({s["sha256"] for s in _starts(alone)}) == 3 and {s["kind"] for s in _starts(alone)} == {"independent"}
    with pytest.warns(DifferentStartsWarning):
        bad = merge.soup(alone, out=tmp_path / "alone.safetensors").path
    rows = evaluate_checkpoints([*alone, bad], split="val", ensemble=False)
    assert rows[-1].metrics["val"]["acc"] < np.mean([r.metrics["val"]["acc"] for r in rows[:-1]]) - 0.2


def test_shared_init_without_warm_start_and_the_options(tmp_path):
    from merge.train import Recipe, train_members

    kw = dict(model="small_cnn", data="digits", progress=False, base=Recipe(epochs=0.2))
    paths = train_members(2, out_dir=tmp_path / "a", warm_start=0, **kw)
    starts = _starts(paths)
    assert starts[0] == starts[1] and starts[0]["kind"] == "shared-init" and starts[0]["seed"] == 0
    assert not (tmp_path / "a" / "start").exists()
    # The recorded fingerprint is that of the weights the member was built with: seed 0's initialisation.
    from merge.models import build_model

    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, in_chans=1, image_size=8)
    assert starts[0]["sha256"] == state_dict_sha256(net.state_dict())
    # Members written before starts were recorded are kept when their own record shows the same start
    # (no init, and the start's seed), refused otherwise.
    from safetensors.torch import load_file

    def drop_start(p):
        meta = read_safetensors_metadata(p)
        train = json.loads(meta[TRAIN_KEY])
        del train["start"]
        save_file(load_file(str(p)), str(p), metadata={**meta, TRAIN_KEY: json.dumps(train)})

    drop_start(paths[0])
    assert train_members(2, out_dir=tmp_path / "a", warm_start=0, **kw) == paths  # member 0 had seed 0: kept
    drop_start(paths[1])
    with pytest.raises(MismatchError, match=r"member-01\.safetensors: exists but was trained without a recorded "
                                            r"start, while this run's members share the shared-init start"):
        train_members(2, out_dir=tmp_path / "a", warm_start=0, **kw)
    train_members(2, out_dir=tmp_path / "a", warm_start=0, force=True, **kw)
    # Resuming with another start is refused, naming the file and why.
    with pytest.raises(MismatchError, match=r"member-00\.safetensors: exists but was trained from a shared start "
                                            r"\(shared-init\), not from its own initialisation"):
        train_members(2, out_dir=tmp_path / "a", independent_init=True, **kw)
    with pytest.raises(MismatchError, match=r"exists but was trained from another start \(shared-init\), while this "
                                            r"run's members share the warm-start start"):
        train_members(2, out_dir=tmp_path / "a", warm_start=0.1, **kw)
    with pytest.raises(InvalidArgumentError, match=r"independent_init starts every member from its own "
                                                   r"initialisation; it cannot be combined with init or "
                                                   r"warm_start \(drop one\)"):
        train_members(2, out_dir=tmp_path / "b", independent_init=True, warm_start=0.5, **kw)
    with pytest.raises(InvalidArgumentError, match=r"warm_start must be >= 0 epochs, got -1"):
        train_members(2, out_dir=tmp_path / "b", warm_start=-1, **kw)


def test_cli_flags_for_the_start(tmp_path):
    from cli.main import cli

    common = ["train", "--model", "small_cnn", "--data", "digits", "--members", "2", "--epochs", "0.2",
              "--no-progress"]
    res = CliRunner().invoke(cli, [*common, "--independent-init", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "a" / "start").exists()
    starts = _starts(sorted((tmp_path / "a").glob("member-*.safetensors")))
    assert [s["kind"] for s in starts] == ["independent"] * 2 and starts[0]["sha256"] != starts[1]["sha256"]
    assert [s["seed"] for s in starts] == [0, 1]
    res = CliRunner().invoke(cli, [*common, "--warm-start", "0.1", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    starts = _starts(sorted((tmp_path / "b").glob("member-*.safetensors")))
    assert starts[0] == starts[1] and starts[0]["kind"] == "warm-start"
    start_file = tmp_path / "b" / "start" / "member-00.safetensors"
    assert starts[0]["sha256"] == checkpoint_sha256(start_file) and starts[0]["path"] == str(start_file)
    assert json.loads(read_safetensors_metadata(start_file)[TRAIN_KEY])["epochs"] == 0.1
    assert f"members share one start (warm-start {start_file}, sha256 {starts[0]['sha256'][:12]})" in res.stderr
    res = CliRunner().invoke(cli, [*common, "--independent-init", "--warm-start", "1", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and ("--independent-init starts each member from its own initialisation; drop --init "
                                   "and --warm-start (or --independent-init)") in res.stderr
    res = CliRunner().invoke(cli, [*common, "--method", "papa", "--independent-init", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "training method 'papa' does not take independent_init" in res.stderr


def test_with_a_base_members_are_measured_against_the_base(tmp_path):
    # Task vectors as large as the base (|delta| = 1.2 |base|): each member is 0.92 from the base but two
    # members are 1.09 apart, so measured against member 0 they would look independently trained.
    base_sd = _net(0)
    fine = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        fine.append({k: (v + 1.2 * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=g))
                     if v.is_floating_point() else v for k, v in base_sd.items()})
    base = _member(tmp_path / "base.safetensors", base_sd)
    a, b = (_member(tmp_path / f"{n}.safetensors", sd) for n, sd in zip("ab", fine))
    assert not check_starts([a, b]).shared  # against member 0 they look like strangers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # against the base they are its fine-tunes: no warning
        merge.soup([a, b], base=base, method="task_arithmetic", out=tmp_path / "task.safetensors")
    stranger = _member(tmp_path / "c.safetensors", _net(5))
    with pytest.warns(DifferentStartsWarning, match=rf"{base} \(base\), .*a\.safetensors.*; no recorded start: {stranger} "
                                                     r"\(relative weight distance [0-9.]+ to .*base\.safetensors \(base\)"):
        merge.soup([a, stranger], base=base, method="task_arithmetic", out=tmp_path / "task2.safetensors")


def test_a_base_that_is_the_members_warm_start_is_their_start(tmp_path):
    # The warm start records its own initialisation as its start; the members record the warm start's weights.
    start_sd = _net(0)
    base = _member(tmp_path / "start.safetensors", start_sd, "9" * 64)
    members = [_member(tmp_path / f"m{i}.safetensors", _net(0, 1.0 + 0.01 * (i + 1)), state_dict_sha256(start_sd))
               for i in range(2)]
    assert not check_starts([base, *members]).shared  # by the records alone, two starts
    check = check_starts([base, *members], base=True)
    assert check.shared and check.groups == [[0, 1, 2]] and check.starts[0] == state_dict_sha256(start_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge.soup(members, base=base, method="ties", out=tmp_path / "ties.safetensors")
    other = _member(tmp_path / "other.safetensors", _net(3), "9" * 64)  # a base the members did not start from
    assert not check_starts([other, *members], base=True).shared
