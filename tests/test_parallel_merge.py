"""A merge split by tensors across processes (``jobs``, torch.distributed ranks) writes the one-process bits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from ckpt_factory import save_members
from merge.engine import NonFiniteError
from merge.errors import InvalidArgumentError
from merge.keys import RECIPE_KEY
from merge.parallel import SingleWriterWarning, WorkerFailedError, balanced_cuts, split_tensors

ROOT = Path(__file__).resolve().parents[1]

METHODS = {  # method -> (uses a base, members, options)
    "uniform": (False, 3, {}),
    "linear": (False, 3, {"weights": [0.5, 0.3, 0.2]}),
    "ties": (True, 3, {"params": {"density": 0.5}}),
    "dare_ties": (True, 3, {"params": {"density": 0.5}, "seed": 7}),
    "slerp": (True, 1, {"params": {"t": 0.3}}),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", merge.errors.DifferentStartsWarning)
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("members")
    paths, _ = save_members(d, 3)
    base, _ = save_members(d, 1, prefix="base")
    return [str(p) for p in paths], str(base[0])


def _members(ckpts, method: str) -> tuple[list[str], dict]:
    paths, base = ckpts
    uses_base, n, options = METHODS[method]
    return paths[:n], {"method": method, **options, **({"base": base} if uses_base else {})}


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def assert_same_output(one: Path, split: Path, processes: int) -> None:
    """Every file of the split output is the one-process file: tensor bytes and headers equal, the recipe equal but
    for ``processes``, the card equal but for the line that says how many processes merged it."""
    files = sorted(p.relative_to(one) for p in one.rglob("*")) if one.is_dir() else [Path()]
    assert files == (sorted(p.relative_to(split) for p in split.rglob("*")) if split.is_dir() else [Path()])
    for rel in files:
        a, b = one / rel, split / rel
        if a.suffix == ".safetensors":
            (ha, da), (hb, db) = _header(a), _header(b)
            assert da == db, f"{rel}: tensor bytes differ"
            ra, rb = json.loads(ha["__metadata__"].pop(RECIPE_KEY)), json.loads(hb["__metadata__"].pop(RECIPE_KEY))
            assert "processes" not in ra and rb.pop("processes") == processes
            assert ra == rb and ha == hb
        elif a.name == "README.md":
            extra = [line for line in b.read_text().splitlines() if line not in a.read_text().splitlines()]
            # the recipe shown in full, and the card's signature (a hash of its text), differ by the same field
            assert extra[0] == f"- merged by {processes} processes, split by tensors (the same bits as one process)"
            assert [x.strip() for x in extra[1:-1]] == [f'"processes": {processes},'] and extra[-1].startswith("<!--")
        else:
            assert a.read_bytes() == b.read_bytes(), f"{rel} differs"


def _no_temporaries(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("jobs", [2, 3])
def test_jobs_write_the_one_process_bits(ckpts, tmp_path, method, jobs):
    members, options = _members(ckpts, method)
    for out, shard in (("folder", "1KB"), ("one.safetensors", "5GB")):
        ref = merge.soup(members, out=tmp_path / "ref" / out, shard_size=shard, **options)
        got = merge.soup(members, out=tmp_path / f"j{jobs}" / out, shard_size=shard, jobs=jobs, **options)
        assert_same_output(ref.path, got.path, jobs)
        assert [w.rank for w in got.workers] == list(range(jobs)) and not ref.workers
        assert sum(w.tensors for w in got.workers) == ref.tensors == got.tensors
        assert got.read_bytes == ref.read_bytes and got.written_bytes == ref.written_bytes
        assert got.recipe["processes"] == jobs
    _no_temporaries(tmp_path / f"j{jobs}")


def test_the_shard_index_of_a_split_folder_is_valid_and_loads(ckpts, tmp_path):
    members, options = _members(ckpts, "ties")
    ref = merge.soup(members, out=tmp_path / "ref", shard_size="1KB", **options)
    got = merge.soup(members, out=tmp_path / "got", shard_size="1KB", jobs=2, **options)
    index = json.loads((got.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in got.path.glob("model-*.safetensors"))
    loaded = {}
    for name in shards:
        part = load_file(got.path / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(part)
        loaded.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    with merge.open_checkpoint(ref.path) as src:
        expected = src.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_the_split_balances_work_and_keeps_whole_shards(ckpts, tmp_path):
    members, options = _members(ckpts, "uniform")
    plan = merge.plan_soup(members, **options)
    names = [t.name for t in plan.tensors]
    out = merge.io.writer.plan_output([t.out for t in plan.tensors], tmp_path / "f", shard_size="1KB")
    for world in (2, 3, len(names), len(names) + 2):
        shares = split_tensors(plan, None, world)
        assert len(shares) == world and [n for s in shares for n in s] == names
        assert all(shares[: min(world, len(names))])  # every process has work while tensors last
        by_shard = split_tensors(plan, out, world)
        assert [n for s in by_shard for n in s] == [t.name for t in out.tensors]
        if len(out.files) >= world:  # each process writes whole files of its own
            owner = {t.name: f.name for f in out.files for t in f.tensors}
            files = [{owner[n] for n in s} for s in by_shard]
            assert all(not (a & b) for i, a in enumerate(files) for b in files[i + 1:])
    assert balanced_cuts([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_cuts([10, 1, 1, 1], 2) == [0, 1, 4] and balanced_cuts([1, 1, 1, 10], 2) == [0, 3, 4]
    assert balanced_cuts([1, 2, 3, 4, 5, 6], 3) == [0, 3, 5, 6]  # running sums 6 and 15 are nearest 7 and 14
    assert balanced_cuts([5, 5], 4) == [0, 1, 2, 2, 2]  # more processes than tensors: the last ones idle


def test_a_bad_tensor_one_worker_meets_stops_the_merge_with_one_error(tmp_path):
    paths, sds = save_members(tmp_path / "m", 2)
    sds[1]["classifier.weight"][0, 0] = float("nan")
    save_file(sds[1], str(paths[1]))
    plan = merge.plan_soup(paths)
    worker = next(r for r, s in enumerate(split_tensors(plan, None, 2)) if "classifier.weight" in s)
    with pytest.raises(NonFiniteError) as e:
        merge.soup(paths, out=tmp_path / "out" / "soup.safetensors", strict=True, jobs=2)
    assert e.value.message.startswith(f"worker {worker} of 2: member 1 (")
    assert "holds NaN or infinite values in tensor 'classifier.weight'" in e.value.message
    assert e.value.tensor == "classifier.weight" and e.value.member == 1
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary


def _grandchildren(me: int | None = None) -> list[int]:
    """Processes whose parent is a child of ``me`` (this process): the workers (children of the forkserver)."""
    me, parents = me or os.getpid(), {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    kids = {p for p, pp in parents.items() if pp == me}
    return sorted(p for p, pp in parents.items() if pp in kids)


def _big_members(folder: Path) -> list[Path]:
    """Three members big enough that a TIES worker runs for a good fraction of a second."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(folder / f"m{i}.safetensors")
        save_file({f"w{k}": torch.randn(1 << 20, generator=g) for k in range(4)}, str(paths[-1]))
    return paths


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_a_worker_killed_mid_merge_stops_everything_and_leaves_nothing(tmp_path):
    paths = _big_members(tmp_path / "m")
    merge.soup(paths[:1], out=tmp_path / "warm.safetensors", jobs=2)  # the forkserver started before timing
    before = set(_grandchildren())
    out = tmp_path / "out"
    caught: list[BaseException] = []

    def run() -> None:
        try:
            merge.soup(paths[1:], base=paths[0], method="ties", params={"density": 0.3}, out=out / "soup",
                       shard_size="4MB", jobs=2)
        except BaseException as e:  # noqa: BLE001
            caught.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = [p for p in _grandchildren() if p not in before]
        if len(workers) == 2:
            time.sleep(0.05)
            os.kill(workers[1], signal.SIGKILL)
            break
        time.sleep(0.002)
    t.join(60)
    assert caught and isinstance(caught[0], WorkerFailedError), caught
    assert "was killed by signal 9 before finishing its share of the merge" in str(caught[0])
    assert str(caught[0]).startswith("worker ")
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_sigterm_to_the_parent_stops_the_workers_and_leaves_nothing(tmp_path):
    paths = _big_members(tmp_path / "m")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "soup", "--method", "ties", "--base", str(paths[0]),
                             *map(str, paths[1:]), "--density", "0.3", "--jobs", "2", "--no-progress", "-o",
                             str(out / "soup")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = _grandchildren(proc.pid)
        time.sleep(0.005)
    assert len(workers) == 2, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    time.sleep(0.5)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()
                .rsplit(")", 1)[1].split()[0]]  # no worker still running
    assert not out.exists() or list(out.iterdir()) == []


def test_a_torch_file_is_written_by_one_process_with_a_warning(ckpts, tmp_path):
    members, options = _members(ckpts, "uniform")
    ref = merge.soup(members, out=tmp_path / "ref.pt")
    with pytest.warns(SingleWriterWarning, match="merged in one process, not 2; write NAME.safetensors or a folder"):
        got = merge.soup(members, out=tmp_path / "got.pt", jobs=2)
    assert "processes" not in got.recipe and not got.workers
    a, b = torch.load(ref.path, weights_only=True), torch.load(got.path, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_jobs_need_members_given_as_paths_and_a_count(ckpts, tmp_path):
    members, _ = _members(ckpts, "uniform")
    sds = [load_file(m) for m in members]
    with pytest.raises(InvalidArgumentError, match="needs every member .* given as a path") as e:
        merge.soup(sds, out=tmp_path / "x.safetensors", jobs=2)
    assert e.value.option == "jobs"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="jobs must be a whole number of processes") as e:
            merge.soup(members, out=tmp_path / "x.safetensors", jobs=bad)
        assert e.value.option == "jobs"
    assert not (tmp_path / "x.safetensors").exists()


def test_the_cli_splits_with_jobs_and_records_it_in_the_card(ckpts, tmp_path):
    from cli.main import cli

    members, _ = _members(ckpts, "ties")
    base = ckpts[1]
    args = ["soup", "--method", "ties", "--base", base, *members, "--density", "0.5", "--shard-size", "1KB",
            "--no-progress"]
    one = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "one" / "soup")])
    two = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "two" / "soup"), "--jobs", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert f"\nwrote {tmp_path / 'two' / 'soup'} (" in two.output
    assert two.output.count("warning: ") == one.output.count("warning: ") == 1  # the workers do not warn again
    assert_same_output(tmp_path / "one" / "soup", tmp_path / "two" / "soup", 2)
    bad = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "three"), "--jobs", "0"])
    assert bad.exit_code == 2 and "--jobs" in bad.output
    assert "--jobs N" in CliRunner().invoke(cli, ["soup", "--help"]).output


# --- torch.distributed ranks -------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init: str, members: list[str], base: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = merge.soup(members, base=base, method="dare_ties", params={"density": 0.5}, seed=3, out=out,
                           shard_size="1KB", ranks=True)
        assert r.recipe["processes"] == world and len(r.workers) == world
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_of_a_process_group_write_the_one_process_bits(ckpts, tmp_path, world):
    import torch.multiprocessing as mp

    members, base = ckpts
    ref = merge.soup(members, base=base, method="dare_ties", params={"density": 0.5}, seed=3,
                     out=tmp_path / "ref" / "soup", shard_size="1KB")
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), members, base, str(tmp_path / "got" / "soup")),
             nprocs=world, join=True)
    assert_same_output(ref.path, tmp_path / "got" / "soup", world)
    _no_temporaries(tmp_path / "got")


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_one_process_bits(ckpts, tmp_path):
    """The documented command: ``torchrun ... --no-python papa-merge soup ...`` (here through ``-m cli.main``)."""
    members, base = ckpts
    args = ["soup", "--method", "ties", "--base", base, *members, "--density", "0.5", "--shard-size", "1KB",
            "--no-progress"]
    from cli.main import cli

    assert CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "one" / "soup")]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cli.main", *args, "-o", str(tmp_path / "two" / "soup")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert_same_output(tmp_path / "one" / "soup", tmp_path / "two" / "soup", 2)
    _no_temporaries(tmp_path / "two")


def test_run_splits_a_recipe_with_per_tensor_parameters_with_jobs(ckpts, tmp_path):
    """``papa-merge run --jobs 2``: a mergekit recipe whose density depends on the tensor name (a filter list)."""
    from cli.main import cli

    (m0, m1, _), base = ckpts
    recipe = tmp_path / "ties.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {m0}\n    parameters:\n"
                      "      density:\n        - filter: classifier\n          value: 0.3\n        - value: 0.8\n"
                      f"      weight: 0.6\n  - model: {m1}\n    parameters:\n      density: 0.5\n      weight: 0.4\n")
    one = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "one" / "soup"), "--shard-size", "1KB"])
    two = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "two" / "soup"), "--shard-size", "1KB",
                                   "--jobs", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert_same_output(tmp_path / "one" / "soup", tmp_path / "two" / "soup", 2)


def test_disk_and_memory_are_checked_before_any_worker_starts(ckpts, tmp_path, monkeypatch):
    import errno
    import shutil

    import merge.parallel as parallel

    members, _ = _members(ckpts, "uniform")
    usage, disk_usage = shutil.disk_usage(tmp_path), shutil.disk_usage
    monkeypatch.setattr(parallel.shutil, "disk_usage", lambda p: usage._replace(free=100))
    with pytest.raises(OSError) as e:
        merge.soup(members, out=tmp_path / "out" / "soup", jobs=2)
    assert e.value.errno == errno.ENOSPC and "file system has 100 bytes free; free some space" in e.value.strerror
    assert e.value.filename == str(tmp_path / "out" / "soup")
    monkeypatch.setattr(parallel.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(parallel, "WORKER_OVERHEAD_BYTES", 1 << 60)
    with pytest.raises(InvalidArgumentError, match=r"2 workers need about .* GiB of memory .* use at most 1") as e:
        merge.soup(members, out=tmp_path / "out" / "soup", jobs=2)
    assert e.value.option == "jobs" and e.value.choices == (1,)
    assert list((tmp_path / "out").iterdir()) == []


def test_greedy_refuses_jobs(ckpts, tmp_path):
    from cli.main import cli

    members, _ = _members(ckpts, "uniform")
    r = CliRunner().invoke(cli, ["soup", "--greedy", *members, "--jobs", "2", "-o", str(tmp_path / "g.safetensors")])
    assert r.exit_code == 2 and "--greedy merges and scores its candidate soups in one process; drop --jobs" in r.output


def _soup_as_rank(rank: int, world: int, init: str, members: list[str], out: str, caught: type[BaseException],
                  record=lambda e: str(e)) -> None:
    """Join a gloo group of ``world`` ranks, soup ``members`` split over it, and write the error of type ``caught``
    this rank ended with (as ``record`` tells it) to ``OUT.rankR.txt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merge.soup(members, out=out, shard_size="1KB", ranks=True)
    except caught as e:
        Path(f"{out}.rank{rank}.txt").write_text(record(e))
    finally:
        dist.destroy_process_group()


def _os_error_line(e: OSError) -> str:
    return f"{e.errno} {e.strerror}"


def _rank_full_disk(rank: int, world: int, init: str, members: list[str], out: str) -> None:
    import shutil

    import merge.parallel as parallel

    usage = shutil.disk_usage(out.rsplit("/", 2)[0])
    parallel.shutil = type("FullDisk", (), {"disk_usage": staticmethod(lambda p: usage._replace(free=10))})
    _soup_as_rank(rank, world, init, members, out, OSError, _os_error_line)


def test_a_check_that_fails_on_rank_0_stops_every_rank_with_its_error(ckpts, tmp_path):
    import errno

    import torch.multiprocessing as mp

    members, _ = ckpts
    out = tmp_path / "out" / "soup"
    out.parent.mkdir()
    mp.spawn(_rank_full_disk, args=(2, str(tmp_path / "init"), members, str(out)), nprocs=2, join=True)
    for r in range(2):
        got = (out.parent / f"soup.rank{r}.txt").read_text()
        assert got.startswith(f"{errno.ENOSPC} rank 0 of 2: the output needs ") and "10 bytes free" in got
    assert sorted(p.name for p in out.parent.iterdir()) == ["soup.rank0.txt", "soup.rank1.txt"]


def _rank_unwritable(rank: int, world: int, init: str, members: list[str], out: str) -> None:
    import merge.soups

    def refuse(path, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    if rank == 0:  # only rank 0 opens the output: the others must not wait for it forever
        merge.soups.AtomicOutput = refuse
    _soup_as_rank(rank, world, init, members, out, OSError, _os_error_line)


def test_an_output_rank_0_cannot_open_stops_every_rank(ckpts, tmp_path):
    import torch.multiprocessing as mp

    members, _ = ckpts
    out = tmp_path / "out" / "soup"
    out.parent.mkdir()
    mp.spawn(_rank_unwritable, args=(2, str(tmp_path / "init"), members, str(out)), nprocs=2, join=True)
    for r in range(2):
        assert (out.parent / f"soup.rank{r}.txt").read_text() == "13 rank 0 of 2: Permission denied"


def _rank_other_inputs(rank: int, world: int, init: str, members: list[str], out: str) -> None:
    # rank 1 lost a member
    _soup_as_rank(rank, world, init, members[: 3 if rank == 0 else 2], out, WorkerFailedError)


def test_ranks_that_plan_different_merges_are_refused_before_any_tensor_is_read(ckpts, tmp_path):
    import torch.multiprocessing as mp

    members, _ = ckpts
    out = tmp_path / "out" / "soup"
    out.parent.mkdir()
    mp.spawn(_rank_other_inputs, args=(2, str(tmp_path / "init"), members, str(out)), nprocs=2, join=True)
    for r in range(2):
        assert (out.parent / f"soup.rank{r}.txt").read_text().startswith(
            "rank 1 of 2 planned a different merge than rank 0 (its members differ: another copy, or another version); "
            "give every rank the same inputs")
    assert sorted(p.name for p in out.parent.iterdir()) == ["soup.rank0.txt", "soup.rank1.txt"]


def _rank_0_alone(rank: int, world: int, init: str, members: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        if rank == 0:  # as training does: rank 0 writes the population's average while the group is up
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merge.soup(members, out=out, shard_size="1KB")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_soup_rank_0_writes_alone_inside_a_group_stays_one_process(ckpts, tmp_path):
    import torch.multiprocessing as mp

    members, _ = ckpts
    ref = merge.soup(members, out=tmp_path / "ref" / "soup", shard_size="1KB")
    mp.spawn(_rank_0_alone, args=(2, str(tmp_path / "init"), members, str(tmp_path / "got" / "soup")), nprocs=2,
             join=True)
    for f in ref.path.iterdir():
        assert (tmp_path / "got" / "soup" / f.name).read_bytes() == f.read_bytes(), f.name


def _rank_stopped(rank: int, world: int, init: str, members: list[str], base: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merge.soup(members, base=base, method="ties", params={"density": 0.3}, out=out, strict=True, ranks=True)
    except NonFiniteError as e:
        cause = e.__cause__
        Path(f"{out}.rank{rank}.txt").write_text(json.dumps([e.message, None if cause is None else str(cause)]))
    finally:
        dist.destroy_process_group()


def test_a_rank_that_fails_stops_the_others_before_they_finish(tmp_path):
    """Rank 1 meets a NaN in its first tensor (strict); rank 0, with its share barely begun, stops at once."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    names = [f"w{k:02d}" for k in range(12)]
    sds = [{n: torch.randn(1 << 20, generator=g) for n in names} for _ in range(3)]
    plan_dir = tmp_path / "m"
    plan_dir.mkdir()
    paths = [plan_dir / f"m{i}.safetensors" for i in range(3)]
    for sd, p in zip(sds, paths):
        save_file(sd, str(p))
    plan = merge.plan_soup(paths[1:], base=paths[0], method="ties", params={"density": 0.3})
    first_of_rank_1 = split_tensors(plan, None, 2)[1][0]
    sds[2][first_of_rank_1][0] = float("nan")
    save_file(sds[2], str(paths[2]))
    out = tmp_path / "out" / "soup.safetensors"
    out.parent.mkdir()
    mp.spawn(_rank_stopped, args=(2, str(tmp_path / "init"), [str(p) for p in paths[1:]], str(paths[0]), str(out)),
             nprocs=2, join=True)
    for r in range(2):
        message, cause = json.loads((out.parent / f"soup.safetensors.rank{r}.txt").read_text())
        assert message.startswith("rank 1 of 2: member 1 (") and f"tensor {first_of_rank_1!r}" in message
        assert cause == ("rank 0 of 2 stopped its share: rank 1 failed" if r == 0 else None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["soup.safetensors.rank0.txt", "soup.safetensors.rank1.txt"]


@pytest.mark.slow
def test_a_split_folder_soup_of_transformers_members_loads_with_from_pretrained(tmp_path):
    """Two tiny BERT members saved by transformers; the --jobs 2 sharded soup loads with from_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = transformers.BertModel(config)
        model.save_pretrained(tmp_path / f"m{seed}")
        members.append(tmp_path / f"m{seed}")
    got = merge.soup(members, out=tmp_path / "soup", shard_size="20KB", jobs=2)
    assert len(list(got.path.glob("model-*.safetensors"))) > 2
    loaded = transformers.BertModel.from_pretrained(got.path).state_dict()
    want = [transformers.BertModel.from_pretrained(m).state_dict() for m in members]
    for name, value in loaded.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), (want[0][name].double() + want[1][name].double()) / 2,
                                       rtol=0, atol=1e-6)
